"""`vct run` on embedded Prefect: its server dies with it, and a lost API is one line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import make_image
from vct.cli import EXIT_API_LOST, main

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--max-train-steps", "2", "--batch-microsteps", "--num-inference-steps", "4",
        "--num-inner-steps", "1", "--threads", "1"]


def embedded_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """A subprocess environment for embedded Prefect: no configured server, a home of its own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API_")}
    env.update({"PREFECT_HOME": str(tmp_path / "prefect-home"), "PYTHONPATH": str(ROOT),
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "HF_HUB_OFFLINE": "1", **extra})
    return env


def small_manifest(folder: Path) -> Path:
    for name, kind in (("s.png", 0), ("r.png", 1)):
        make_image(kind, (64, 64)).save(folder / name)
    (folder / "m.csv").write_text("source,reference\ns.png,r.png\n")
    return folder / "m.csv"


def children(pid: int) -> dict[int, str]:
    """Direct children of `pid` with their command lines (from /proc)."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                out[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ") \
                    .decode(errors="replace")
        except (OSError, IndexError, ValueError):
            continue
    return out


def alive(pid: int) -> bool:
    """Running, not a zombie waiting for its (dead) parent."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow  # make test-slow (in make check): see pyproject.toml
def test_the_embedded_server_does_not_outlive_a_killed_vct(tmp_path, tiny_model_dir):
    """SIGKILL the `vct run` process mid-run (a kill point after its first concept, and the
    kill comes from the process itself: no atexit, no finally runs): its uvicorn server is
    gone within seconds instead of staying orphaned."""
    manifest = small_manifest(tmp_path)
    log = (tmp_path / "vct.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "vct.cli", "run", str(manifest), "--output", str(tmp_path / "out"),
         "--model", str(tiny_model_dir), *FAST],
        env=embedded_env(tmp_path, VCT_TEST_KILL_AT="concept.stored:1"), stdout=log,
        stderr=subprocess.STDOUT)
    servers: dict[int, str] = {}
    try:
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            servers.update({pid: cmd for pid, cmd in children(proc.pid).items()
                            if "uvicorn" in cmd})
            time.sleep(0.2)
        assert proc.returncode == -signal.SIGKILL, (tmp_path / "vct.log").read_text()[-3000:]
        assert servers, "vct run never started its embedded server"
        gone_by = time.monotonic() + 15
        while any(alive(pid) for pid in servers) and time.monotonic() < gone_by:
            time.sleep(0.2)
        assert not [pid for pid in servers if alive(pid)], servers
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in servers:  # only the servers this test's vct started
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        log.close()


@pytest.fixture
def no_server(monkeypatch):
    """`vct run` in process without starting a server (the flow call is what each test fakes)."""
    import flows.embedded

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setattr(flows.embedded, "start_server", lambda: None)


def test_a_run_that_loses_its_api_says_so_in_one_line(no_server, tiny_model_dir, tmp_path,
                                                     monkeypatch, capsys):
    import flows.restyle

    def lost(**kwargs):
        raise httpx.ConnectError("All connection attempts failed")

    monkeypatch.setattr(flows.restyle, "restyle", lost)
    manifest = small_manifest(tmp_path)
    code = main(["run", str(manifest), "--output", str(tmp_path / "out"), "--model",
                 str(tiny_model_dir)])
    err = capsys.readouterr().err.strip()
    assert code == EXIT_API_LOST and "\n" not in err, err
    assert "lost the embedded Prefect server (ConnectError: All connection attempts failed)" \
        in err and "same command resumes" in err and "PREFECT_API_URL=" in err


def test_a_server_that_does_not_start_is_one_line_too(tiny_model_dir, tmp_path, monkeypatch,
                                                      capsys):
    import flows.embedded

    def slow() -> None:
        raise RuntimeError("Timed out while attempting to connect to ephemeral Prefect API "
                           "server. Ephemeral server process exited with code 1.")

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setattr(flows.embedded, "start_server", slow)
    code = main(["run", str(small_manifest(tmp_path)), "--output", str(tmp_path / "out"),
                 "--model", str(tiny_model_dir)])
    err = capsys.readouterr().err.strip()
    assert code == EXIT_API_LOST and "\n" not in err
    assert "(Timed out while attempting to connect to ephemeral Prefect API server.)" in err


def test_embedded_mode_sets_prefects_settings_and_reserves_a_core(no_server, tiny_model_dir,
                                                                  tmp_path, monkeypatch):
    """Set for the run (unless the user set them), gone after; none with a configured server."""
    import flows.restyle
    from vct import cli, threads

    seen: list[dict[str, str | None]] = []
    names = [*cli.EMBEDDED_PREFECT_SETTINGS, threads.RESERVED_ENV]

    def record(**kwargs):
        seen.append({name: os.environ.get(name) for name in names})
        raise httpx.ConnectError("stop here")

    monkeypatch.setattr(flows.restyle, "restyle", record)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    # A PREFECT_HOME whose parent is missing: Prefect would not create it, and its sqlite
    # database would fail to open only after the start-up timeout (minutes).
    home = tmp_path / "not" / "yet" / "prefect-home"
    monkeypatch.setenv("PREFECT_HOME", str(home))
    monkeypatch.setenv("PREFECT_CLIENT_MAX_RETRIES", "7")  # a user's own value wins
    for name in names:
        if name != "PREFECT_CLIENT_MAX_RETRIES":
            monkeypatch.delenv(name, raising=False)
    args = ["run", str(small_manifest(tmp_path)), "--output", str(tmp_path / "out"), "--model",
            str(tiny_model_dir)]
    assert main(args) == EXIT_API_LOST
    assert seen[0]["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] == "300"
    assert seen[0]["PREFECT_CLIENT_MAX_RETRIES"] == "7"
    assert seen[0][threads.RESERVED_ENV] == "1"
    assert os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS") is None
    assert home.is_dir()
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:1/api")
    assert main(args) == EXIT_API_LOST
    assert seen[1]["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] is None
    assert seen[1][threads.RESERVED_ENV] is None
