"""The kill points the reliability harness uses (vct/faults.py): inert without the variable,
a SIGKILL of the process itself at exactly the n-th call of the named point."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from vct import faults

ROOT = Path(__file__).resolve().parents[1]
THREE_CALLS = ("from vct.faults import checkpoint\n"
               "for i in range(1, 4):\n"
               "    checkpoint('run.json')\n"
               "    print(i, flush=True)\n")


def _run(spec: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != faults.ENV}
    if spec is not None:
        env[faults.ENV] = spec
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-c", THREE_CALLS], env=env, capture_output=True,
                          text=True, timeout=60)


def test_without_the_variable_a_checkpoint_does_nothing(monkeypatch):
    monkeypatch.delenv(faults.ENV, raising=False)
    faults.checkpoint("success")
    assert _run(None).stdout.split() == ["1", "2", "3"]


def test_the_nth_call_of_the_named_point_kills_the_process():
    proc = _run("run.json:2")
    assert proc.returncode == -signal.SIGKILL and proc.stdout.split() == ["1"]
    assert _run("success:1").stdout.split() == ["1", "2", "3"]  # another point: untouched


def test_a_bad_spec_or_an_unknown_point_is_refused(monkeypatch):
    monkeypatch.setenv(faults.ENV, "nowhere:1")
    with pytest.raises(ValueError, match="expected <point>:<n>"):
        faults.checkpoint("success")
    monkeypatch.setenv(faults.ENV, "success:0")
    with pytest.raises(ValueError, match="n >= 1"):
        faults.checkpoint("success")
    monkeypatch.setenv(faults.ENV, "success:5")
    with pytest.raises(ValueError, match="unknown kill point"):
        faults.checkpoint("typo")
