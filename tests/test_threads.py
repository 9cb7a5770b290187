"""The thread budget: a torch process's share of the cores it may use."""

from __future__ import annotations

import os

import pytest
import torch

from vct import threads
from vct.batch.settings import RunSettings


def test_budget_is_the_cores_of_the_affinity_mask_divided_by_the_ranks(monkeypatch):
    monkeypatch.delenv(threads.ENV, raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5})
    assert threads.available_cores() == 6
    assert threads.thread_budget() == 6
    assert threads.thread_budget(ranks=2) == 3
    assert threads.thread_budget(ranks=4) == 1
    assert threads.thread_budget(ranks=64) == 1  # never zero


def test_a_flag_beats_the_environment_which_beats_the_share(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setenv(threads.ENV, "3")
    assert threads.thread_budget(ranks=2) == 3
    assert threads.thread_budget(ranks=2, override=1) == 1
    monkeypatch.setenv(threads.ENV, "zero")
    with pytest.raises(threads.ThreadsError, match="VCT_THREADS: expected a positive integer"):
        threads.thread_budget()
    with pytest.raises(ValueError, match="threads"):
        RunSettings.build({"threads": 0})


def test_applying_sets_torch_and_the_executor_applies_it(monkeypatch, tiny_model_dir, tmp_path):
    from vct.batch.jobs import Job
    from vct.batch.workers import ExecutorSettings, local

    before = torch.get_num_threads()
    try:
        monkeypatch.delenv(threads.ENV, raising=False)
        assert threads.apply_thread_budget(override=1) == 1 == torch.get_num_threads()
        torch.set_num_threads(2)
        missing = Job("content", "ab" * 32, str(tmp_path / "missing.png"), {})
        local.run([missing], ExecutorSettings(model=str(tiny_model_dir),
                                              cache_uri=str(tmp_path), threads=1))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_reserved_cores_are_left_to_other_processes(monkeypatch):
    """`vct run` reserves one core for its embedded Prefect server (VCT_RESERVED_CORES)."""
    monkeypatch.delenv(threads.ENV, raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4})
    monkeypatch.setenv(threads.RESERVED_ENV, "1")
    assert threads.thread_budget() == 4 and threads.thread_budget(ranks=2) == 2
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    assert threads.thread_budget() == 1  # never zero
    monkeypatch.setenv(threads.RESERVED_ENV, "-1")
    with pytest.raises(threads.ThreadsError, match="VCT_RESERVED_CORES"):
        threads.thread_budget()
