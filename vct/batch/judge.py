"""The fleet's decisions about a shard flow run, as pure functions of what was observed.

Why here: the Prefect layer (flows/fleet.py) only reads states and makes client calls; what a
state means (a dead machine, a result that never came, a run no worker takes) is decided
here, where a table of cases tests it in milliseconds. States are Prefect's state types.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

FINAL_BAD = frozenset({"CRASHED", "CANCELLED", "FAILED"})
FINAL = FINAL_BAD | {"COMPLETED"}
WAITING = frozenset({"SCHEDULED", "PENDING"})  # no worker has started it (Late is Scheduled)
RETRIES = 1
"""A shard that ended badly is dispatched once more: its finished jobs are in the cache."""

Action = Literal["wait", "record", "retry", "give_up"]


@dataclass(frozen=True)
class Verdict:
    """What to do with one shard flow run: ``state`` is what it counts as (a RUNNING run whose
    lease expired is CRASHED, a COMPLETED one without its result is FAILED); ``mark_crashed``
    says the parent must set that state itself (nobody else ever will)."""

    state: str
    action: Action
    mark_crashed: bool = False


def judge(state: str, attempt: int, *, lease_expired: bool = False,
          has_result: bool = True, retries: int = RETRIES) -> Verdict:
    """One shard run's state as seen now, its attempt, whether its liveness lease has expired
    (read for RUNNING runs) and whether its result file exists (read for final ones)."""
    if state == "RUNNING" and lease_expired:
        return Verdict("CRASHED", "retry" if attempt < retries else "record", mark_crashed=True)
    if state not in FINAL:
        return Verdict(state, "wait")
    if state == "COMPLETED" and not has_result:
        state = "FAILED"  # finished without its result: as good as a crash
    if state != "COMPLETED" and attempt < retries:
        return Verdict(state, "retry")
    return Verdict(state, "record")


def phase_is_idle(live_states: list[str]) -> bool:
    """No live shard of the phase has been taken by a worker: all are still waiting."""
    return all(state in WAITING for state in live_states)


def gives_up(live_states: list[str], since_dispatch_s: float, since_moved_s: float,
             timeout_s: float) -> bool:
    """A shard no worker takes is given up (cancelled, its jobs failed) only when no shard of
    its phase runs and neither its dispatch nor anything in the phase moved for the timeout:
    a shard queued behind running siblings is waiting, not lost."""
    return phase_is_idle(live_states) and min(since_dispatch_s, since_moved_s) >= timeout_s
