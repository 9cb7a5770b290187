"""Named kill points for the kill-and-resume harness (``tests/test_kill_resume.py``).

The pipeline's promise is that a run killed at any instant resumes to the same outputs. A
test can only hold that at instants it can name, so the places where a crash is most likely to
leave a half-done state call :func:`checkpoint` with a name (see :data:`POINTS`). When the
environment variable ``VCT_TEST_KILL_AT=<point>:<n>`` names that point, the n-th call (1-based,
counted per process) sends SIGKILL to the process itself: no ``finally``, no ``atexit``, exactly
what the OOM killer or a lost node does. Several points may be given, comma-separated.

Without the variable a checkpoint is one dictionary lookup; nothing else in the library reads
it. This module imports nothing of vct, so storage (the lowest layer) can call it too.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

ENV = "VCT_TEST_KILL_AT"

POINTS: dict[str, str] = {
    "concept.stored": "after a concept job's result is in the cache",
    "content.step": "inside a content job, after each of its progress steps",
    "content.stored": "after a content job's result is in the cache",
    "fusion.stored": "after a fusion job's result is in the cache",
    "output.png": "between a pair's PNG and its sidecar",
    "output.pair": "after a pair's sidecar (so after some PNGs)",
    "run.json": "before run.json is written",
    "report.page": "after each report page (HTML) is written",
    "success": "before _SUCCESS is written",
    "storage.rename": "inside a local write: temp file complete, not yet renamed",
    "storage.put": "inside an S3 write: before the PUT",
}
"""Every named point and where it is; a test asking for another name is refused."""

_hits: Counter[str] = Counter()


def _targets(spec: str) -> dict[str, int]:
    targets = {}
    for item in spec.split(","):
        name, _, count = item.strip().rpartition(":")
        if name not in POINTS or not count.isdigit() or int(count) < 1:
            raise ValueError(f"{ENV}={spec!r}: expected <point>:<n> with n >= 1 and a point "
                             f"in {', '.join(POINTS)}")
        targets[name] = int(count)
    return targets


def checkpoint(name: str) -> None:
    """SIGKILL this process if ``VCT_TEST_KILL_AT`` asks for this call of ``name``."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    targets = _targets(spec)
    if name not in POINTS:
        raise ValueError(f"unknown kill point {name!r}")
    _hits[name] += 1
    if targets.get(name) == _hits[name]:
        os.kill(os.getpid(), signal.SIGKILL)
