"""The engine's verdicts on a run: the counts schema and the run status. The types they are
made of (PairResult, StageReport, RunSummary) are the report's (:mod:`vct.report.run_record`),
so the engine, run.json, the report, the flow's artifacts and the CLI share them.

Statuses of a pair: ``ok`` (written now), ``skipped`` (already done: same output key, PNG
verified), ``bad`` (a manifest row refused: at planning, or when a job found its image
undecodable) and ``failed`` (a computation failed).
The run is ``complete`` when every planned pair is ok or skipped (bad rows are reported but do
not fail it), ``failed`` when none is, and ``partial`` in between. Only a complete run gets
``_SUCCESS``; a run with a failed pair ends in a failed state.
"""

from __future__ import annotations

from vct.report.run_record import PairResult, PairStatus, RunStatus, RunSummary, StageReport

__all__ = ["PairResult", "PairStatus", "RunStatus", "RunSummary", "StageReport", "counts",
           "run_status"]

STAGE_KINDS = ("concept", "content", "fusion")


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
