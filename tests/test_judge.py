"""The fleet's decisions (vct/batch/judge.py) over a table of observed cases: no Prefect."""

from __future__ import annotations

import pytest

from vct.batch.judge import RETRIES, Verdict, gives_up, judge


@pytest.mark.parametrize(("state", "attempt", "expired", "has_result", "want"), [
    # still going: wait, whatever else is seen
    ("SCHEDULED", 0, False, False, Verdict("SCHEDULED", "wait")),
    ("PENDING", 0, False, False, Verdict("PENDING", "wait")),
    ("RUNNING", 0, False, False, Verdict("RUNNING", "wait")),
    # a running shard whose lease expired: its machine died; crashed, dispatched once more
    ("RUNNING", 0, True, False, Verdict("CRASHED", "retry", mark_crashed=True)),
    ("RUNNING", RETRIES, True, False, Verdict("CRASHED", "record", mark_crashed=True)),
    # finished with its result
    ("COMPLETED", 0, False, True, Verdict("COMPLETED", "record")),
    ("COMPLETED", RETRIES, False, True, Verdict("COMPLETED", "record")),
    # finished without its result: failed, as a crash is
    ("COMPLETED", 0, False, False, Verdict("FAILED", "retry")),
    ("COMPLETED", RETRIES, False, False, Verdict("FAILED", "record")),
    # ended badly: retried once, then recorded
    ("CRASHED", 0, False, False, Verdict("CRASHED", "retry")),
    ("FAILED", 0, False, True, Verdict("FAILED", "retry")),
    ("CANCELLED", 0, False, False, Verdict("CANCELLED", "retry")),
    ("CRASHED", RETRIES, False, False, Verdict("CRASHED", "record")),
    ("CANCELLED", RETRIES, False, True, Verdict("CANCELLED", "record")),
    # an expired lease only means something for a running shard
    ("SCHEDULED", 0, True, False, Verdict("SCHEDULED", "wait")),
])
def test_judge(state, attempt, expired, has_result, want) -> None:
    assert judge(state, attempt, lease_expired=expired, has_result=has_result) == want


@pytest.mark.parametrize(("live", "since_dispatch", "since_moved", "want"), [
    (["SCHEDULED"], 901, 901, True),  # nobody took it for the timeout
    (["SCHEDULED", "PENDING"], 1000, 1000, True),
    (["SCHEDULED"], 899, 901, False),  # dispatched (or re-dispatched) recently
    (["SCHEDULED"], 901, 10, False),  # the phase moved recently: queued, not lost
    (["SCHEDULED", "RUNNING"], 5000, 5000, False),  # a sibling runs: it waits its turn
    (["SCHEDULED"], 900, 900, True),  # the bound is inclusive
])
def test_gives_up_only_when_the_whole_phase_stands_still(live, since_dispatch, since_moved,
                                                         want) -> None:
    assert gives_up(live, since_dispatch, since_moved, 900.0) is want
