"""What a run did, typed, from the engine to every reader: one pair's outcome
(:class:`PairResult`), a stage's report (:class:`StageReport`) and the run's summary
(:class:`RunSummary`), which ``run.json`` (:meth:`RunSummary.to_json`,
:func:`run_json_bytes`), the report pages, the flow's artifacts and the CLI all read; and the
engine's verdicts on it, :func:`run_status` and :func:`counts`.

Statuses of a pair: ``ok`` (written now), ``skipped`` (already done: same output key, PNG
verified), ``bad`` (a manifest row refused: at planning, or when a job found its image
undecodable) and ``failed`` (a computation failed). The run is ``complete`` when every planned
pair is ok or skipped (bad rows are reported but do not fail it), ``failed`` when none is, and
``partial`` in between. Only a complete run gets ``_SUCCESS``; a run with a failed pair ends in
a failed state."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any, Literal

from vct.report.names import join_uri

REQUIRED_COUNTS: tuple[str, ...] = (
    "pairs_ok",
    "pairs_failed",
    "pairs_skipped",
    "concepts_computed",
    "concepts_cached",
    "contents_computed",
    "contents_cached",
)
"""Counters every ``run.json`` carries, so dashboards never have to special-case a missing key."""

SUMMARY_SCHEMA_VERSION = 2


PairStatus = Literal["ok", "skipped", "bad", "failed"]


@dataclass
class PairResult:
    """One manifest row's outcome: the one type the engine returns and the report, the flow's
    artifacts and the CLI read.

    ``status``: ``ok`` (written now), ``skipped`` (already done: same output key, PNG
    verified), ``bad`` (a manifest row refused, listed with the row errors) or ``failed`` (a
    computation failed). ``png_name`` / ``sidecar_name`` are relative to the run folder and
    come from the engine's one naming function (the manifest's ``output_name``, not the pair
    id), ``None`` when the pair has no output. ``timings`` maps a stage name to seconds.
    """

    pair_id: str
    line: int
    status: PairStatus
    source_uri: str
    reference_uri: str
    """One URI, or every reference image of a concept joined by REFERENCES_SHOWN."""
    png_name: str | None = None
    sidecar_name: str | None = None
    reason: str | None = None
    timings: dict[str, float] = field(default_factory=dict)


REFERENCES_SHOWN = "; "
"""Between the images of a concept learned from several, in ``reference_uri``."""


def first_reference(reference_uri: str) -> str:
    """The image a pair's reference thumbnail shows (the first of several)."""
    return reference_uri.split(REFERENCES_SHOWN)[0]


def _duration_s(started_at: str, finished_at: str) -> float | None:
    """Seconds between two ISO timestamps, or None if either does not parse (never fatal)."""
    try:
        start = datetime.fromisoformat(started_at)
        end = datetime.fromisoformat(finished_at)
        return round((end - start).total_seconds(), 3)
    except (TypeError, ValueError):
        return None


def manifest_order(outcomes: list[PairResult]) -> list[PairResult]:
    """Manifest order: the order whoever wrote the CSV reads it in."""
    return sorted(outcomes, key=lambda o: (o.line, o.pair_id))


def _pair_entry(outcome: PairResult, output_uri: str) -> dict[str, Any]:
    """One ``pairs`` entry: the outcome plus the names (and full URI) of its written files."""
    return {
        "pair_id": outcome.pair_id,
        "line": outcome.line,
        "status": outcome.status,
        "source_uri": outcome.source_uri,
        "reference_uri": outcome.reference_uri,
        "output_file": outcome.png_name,
        "sidecar_file": outcome.sidecar_name,
        "output_uri": join_uri(output_uri, outcome.png_name) if outcome.png_name else None,
        "reason": outcome.reason,
        "timings": outcome.timings,
    }


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


@dataclass(frozen=True)
class Failure:
    """One line of the failures list: a bad row (``stage`` "manifest") or a failed pair."""

    line: int | None
    pair_id: str | None
    reason: str
    stage: str


RunStatus = Literal["complete", "partial", "failed"]


@dataclass
class RunSummary:
    """The result of one run, typed: what the engine returns, what ``run.json`` is written
    from (:meth:`to_json`) and what the report, the flow's artifacts and the CLI read.

    ``pairs`` holds every row: the planned pairs and the bad rows (status ``bad``); ``status``
    is the engine's verdict. ``flow_run_id``, ``started_at`` and ``finished_at`` are filled
    in when the run ends (:func:`vct.batch.engine.finish`)."""

    run_id: str
    run_uri: str
    manifest_uri: str
    status: RunStatus
    counts: dict[str, int]
    pairs: list[PairResult]
    stages: dict[str, StageReport] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    flow_run_id: str | None = None
    started_at: str = ""
    finished_at: str = ""

    @property
    def message(self) -> str:
        """One line for logs, the flow's final state and the CLI."""
        c = self.counts
        return (f"run {self.run_id} {self.status}: {c.get('pairs_ok', 0)} ok, "
                f"{c.get('pairs_skipped', 0)} skipped, {c.get('pairs_failed', 0)} failed, "
                f"{c.get('pairs_bad', 0)} bad rows")

    @property
    def planned(self) -> list[PairResult]:
        """The pairs the run computed or kept (not the bad rows), in manifest order: the
        report's and the table's rows."""
        return manifest_order([p for p in self.pairs if p.status != "bad"])

    @property
    def failures(self) -> list[Failure]:
        """Every bad row and failed pair, by manifest line: whoever fixes the CSV wants every
        bad line in one list."""
        out = [Failure(p.line, p.pair_id, p.reason or "unknown error",
                       "manifest" if p.status == "bad" else "pair")
               for p in self.pairs if p.status in ("bad", "failed")]
        return sorted(out, key=_failure_sort_key)

    @property
    def duration_s(self) -> float | None:
        return _duration_s(self.started_at, self.finished_at)

    def all_counts(self) -> dict[str, int]:
        """The counts with every :data:`REQUIRED_COUNTS` key present."""
        return {**{key: 0 for key in REQUIRED_COUNTS}, **self.counts}

    def to_json(self) -> dict[str, Any]:
        """The ``run.json`` content. ``details`` holds the engine's details and the stage
        reports, so run-specific keys can never shadow the documented ones."""
        return {
            "schema_version": SUMMARY_SCHEMA_VERSION,
            "run_id": self.run_id,
            "flow_run_id": self.flow_run_id,
            "manifest_uri": self.manifest_uri,
            "output_uri": self.run_uri,
            "status": self.status,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "duration_s": self.duration_s,
            "counts": self.all_counts(),
            "pairs": [_pair_entry(o, self.run_uri) for o in self.planned],
            "failures": [asdict(f) for f in self.failures],
            "details": {**self.details,
                        "stages": {k: asdict(v) for k, v in self.stages.items()}},
        }


# ---------------------------------------------------------------- the engine's verdicts
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


def _failure_sort_key(failure: Failure) -> tuple[int, int, str]:
    """Sort by line; failures without a usable line go last instead of crashing the sort."""
    line = failure.line
    if isinstance(line, int) and not isinstance(line, bool):
        return (0, line, str(failure.pair_id or ""))
    return (1, 0, str(failure.pair_id or ""))


def run_json_bytes(summary: RunSummary) -> bytes:
    """Serialise a summary for storage; ``default=str`` so an odd value cannot lose the whole
    report at the very end of a long run."""
    return (json.dumps(summary.to_json(), indent=2, sort_keys=False, default=str)
            + "\n").encode("utf-8")
