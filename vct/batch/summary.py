"""What a run did, typed: each pair's status, each stage's report, the counts, the run status.

Statuses of a pair: ``ok`` (written now), ``skipped`` (already done: same output key, PNG
verified), ``bad`` (a manifest row refused: at planning, or when a job found its image
undecodable) and ``failed`` (a computation failed).
The run is ``complete`` when every planned pair is ok or skipped (bad rows are reported but do
not fail it), ``failed`` when none is, and ``partial`` in between. Only a complete run gets
``_SUCCESS``; a run with a failed pair ends in a failed state.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from vct.report.run_record import PairResult, PairStatus

__all__ = ["PairResult", "PairStatus", "RunStatus", "RunSummary", "StageReport", "counts",
           "run_status"]

RunStatus = Literal["complete", "partial", "failed"]
STAGE_KINDS = ("concept", "content", "fusion")


@dataclass
class StageReport:
    """One stage's jobs: which keys came from the cache, which were computed, which failed
    (key -> one-line reason), the ranks that ran them and the UNet evaluations they counted;
    ``awaited``: keys another process held a claim on, whose results this one waited for;
    ``took_over``: keys whose expired claim (a dead owner's) this one took over and computed;
    ``bad``: failed keys whose input image could not be decoded (their rows are bad, not
    failed: the input is wrong, not the computation)."""

    kind: str
    cached: list[str] = field(default_factory=list)
    computed: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    ranks: list[int] = field(default_factory=list)
    unet_evals: dict[str, int] = field(default_factory=dict)
    awaited: list[str] = field(default_factory=list)
    took_over: list[str] = field(default_factory=list)
    bad: list[str] = field(default_factory=list)


def run_status(pairs: list[PairResult]) -> RunStatus:
    planned = [p for p in pairs if p.status != "bad"]
    good = sum(p.status in ("ok", "skipped") for p in planned)
    if planned and good == len(planned):
        return "complete"
    return "partial" if good else "failed"


def counts(pairs: list[PairResult], stages: dict[str, StageReport]) -> dict[str, int]:
    """The one counts schema of run.json, the report, the flow's state message and the CLI."""
    out = {f"pairs_{s}": sum(p.status == s for p in pairs)
           for s in ("ok", "skipped", "failed", "bad")}
    for kind in STAGE_KINDS:
        report = stages.get(kind) or StageReport(kind)
        out[f"{kind}s_computed"] = len(report.computed)
        out[f"{kind}s_cached"] = len(report.cached)
        out[f"{kind}s_failed"] = len(report.failed)
    return out


@dataclass
class RunSummary:
    """The result of one run: what the engine returns and what run.json is made from."""

    run_id: str
    run_uri: str
    manifest_uri: str
    status: RunStatus
    counts: dict[str, int]
    pairs: list[PairResult]
    stages: dict[str, StageReport]
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def message(self) -> str:
        """One line for logs, the flow's final state and the CLI."""
        c = self.counts
        return (f"run {self.run_id} {self.status}: {c['pairs_ok']} ok, {c['pairs_skipped']} "
                f"skipped, {c['pairs_failed']} failed, {c['pairs_bad']} bad rows")

    def to_dict(self) -> dict:
        return asdict(self)
