"""The temporary Prefect server `vct run` starts when no server is configured, made to die
with its process and to survive a busy machine.

Prefect starts an ephemeral server (``uvicorn`` in a subprocess) on the first API call when
``PREFECT_API_URL`` is unset, and stops it from ``atexit``. Two things go wrong with that:

- **Orphans.** A ``vct`` process that is SIGKILLed (the OOM killer, a lost terminal, a job
  scheduler's hard limit) runs no ``atexit``: the server keeps running, orphaned, holding
  ~200 MB and a sqlite database. :func:`start_server` starts the same server itself, from the
  main thread, with ``PR_SET_PDEATHSIG`` set in the child (Linux): the kernel kills the server
  when the ``vct`` process dies, however it dies. Prefect then finds the running server under
  the same key and uses it.
- **Load.** Under CPU load the server's start-up (migrations, imports) takes longer than
  Prefect's default 20 s, API calls time out, sqlite locks wait longer than 10 s. ``vct run``
  sets Prefect's own settings for this mode before Prefect is imported
  (:data:`vct.cli.EMBEDDED_PREFECT_SETTINGS`) and a torch thread budget that leaves a core
  to the server; :func:`api_failure` recognises a run that lost its API anyway so the CLI can
  say so in one line.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import httpx
from prefect.server.api import server as prefect_server
from prefect.settings import PREFECT_API_URL

PR_SET_PDEATHSIG = 1


def _die_with(parent: int) -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child receive SIGKILL when its parent dies (Linux), and
    exit at once if the parent already died between the fork and the prctl."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)

    return preexec


class _PopenDyingWithParent:
    """Stands in for the ``subprocess`` module inside Prefect's server module while it starts
    uvicorn: the same Popen, plus the parent-death signal."""

    def __init__(self, preexec: Callable[[], None]):
        self._preexec = preexec

    def Popen(self, *args: Any, **kwargs: Any) -> subprocess.Popen[Any]:  # noqa: N802
        return subprocess.Popen(*args, preexec_fn=self._preexec, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(subprocess, name)


class OwnedServer(prefect_server.SubprocessASGIServer):
    """Prefect's ephemeral server whose uvicorn process dies with this process."""

    def _run_uvicorn_command(self) -> subprocess.Popen[Any]:
        preexec = _die_with(os.getpid())
        if preexec is None:
            return super()._run_uvicorn_command()
        saved = prefect_server.subprocess
        prefect_server.subprocess = _PopenDyingWithParent(preexec)  # type: ignore[assignment]
        try:
            return super()._run_uvicorn_command()
        finally:
            prefect_server.subprocess = saved


def start_server() -> str | None:
    """Start the embedded server now (call from the main thread: the parent-death signal
    follows the thread that forked); returns its API URL, or None when a server is already
    configured (``PREFECT_API_URL``, a test harness) and nothing was started. Raises what
    Prefect raises when the server does not come up (see :func:`api_failure`)."""
    if PREFECT_API_URL.value():
        return None
    server = OwnedServer()  # Prefect's singleton: later SubprocessASGIServer() calls get it
    server.start()
    return server.api_url


def server_pid() -> int | None:
    """The embedded server's process id, when this process started one (for tests)."""
    with contextlib.suppress(KeyError, AttributeError):
        process = prefect_server.SubprocessASGIServer._instances[None].server_process
        return process.pid if process is not None else None
    return None


def api_failure(exc: BaseException | None) -> str | None:
    """A one-line description when ``exc`` (or what caused it) is the Prefect API going away
    or never coming up, else None: connection refused or reset, a timeout, a server error, or
    the ephemeral server's start-up time-out."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, httpx.TransportError):
            return f"{type(exc).__name__}: {str(exc).strip() or 'no response'}"
        if isinstance(exc, RuntimeError) and "ephemeral Prefect API server" in str(exc):
            return str(exc).strip().split(" Ephemeral server process")[0]
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if isinstance(status, int) and status >= 500 and "prefect" in type(exc).__module__:
            return f"{type(exc).__name__}: HTTP {status}"
        exc = exc.__cause__ or exc.__context__
    return None
