"""``run.json``: what one pair's outcome is (:class:`PairResult`), the summary built from the
outcomes (:func:`build_run_summary`) and its bytes (:func:`run_json_bytes`)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
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


def build_run_summary(
    *,
    run_id: str,
    flow_run_id: str | None,
    manifest_uri: str,
    output_uri: str,
    status: str,
    counts: dict[str, int],
    outcomes: list[PairResult],
    row_errors: list[dict],
    started_at: str,
    finished_at: str,
    extra: dict | None = None,
) -> dict:
    """Build the ``run.json`` content.

    ``status`` is the engine's verdict (``"complete"`` / ``"partial"`` / ``"failed"``), written
    as is: the engine knows what a run is allowed to lose, this module does not. ``failures``
    joins manifest row errors (dicts with ``line``, ``pair_id``, ``reason``) and failed pairs,
    sorted by manifest line, because whoever fixes the CSV wants every bad line in one list.
    ``output_uri`` is the run folder; ``extra`` lands under ``details`` so caller-specific keys
    can never shadow the documented ones.
    """
    full_counts: dict[str, int] = {key: 0 for key in REQUIRED_COUNTS}
    full_counts.update({str(k): v for k, v in (counts or {}).items()})

    failures: list[dict[str, Any]] = []
    for err in row_errors or []:
        failures.append({
            "line": err.get("line"),
            "pair_id": err.get("pair_id"),
            "reason": err.get("reason"),
            "stage": "manifest",
        })
    for outcome in outcomes:
        if outcome.status == "failed":
            failures.append({
                "line": outcome.line,
                "pair_id": outcome.pair_id,
                "reason": outcome.reason or "unknown error",
                "stage": "pair",
            })
    failures.sort(key=_failure_sort_key)

    return {
        "schema_version": SUMMARY_SCHEMA_VERSION,
        "run_id": run_id,
        "flow_run_id": flow_run_id,
        "manifest_uri": manifest_uri,
        "output_uri": output_uri,
        "status": status,
        "started_at": started_at,
        "finished_at": finished_at,
        "duration_s": _duration_s(started_at, finished_at),
        "counts": full_counts,
        "pairs": [_pair_entry(o, output_uri) for o in manifest_order(outcomes)],
        "failures": failures,
        "details": dict(extra or {}),
    }


def _failure_sort_key(failure: dict[str, Any]) -> tuple[int, int, str]:
    """Sort by line; failures without a usable line go last instead of crashing the sort."""
    line = failure.get("line")
    if isinstance(line, int) and not isinstance(line, bool):
        return (0, line, str(failure.get("pair_id") or ""))
    return (1, 0, str(failure.get("pair_id") or ""))


def run_json_bytes(summary: dict) -> bytes:
    """Serialise a summary for storage; ``default=str`` so an odd value cannot lose the whole
    report at the very end of a long run."""
    return (json.dumps(summary, indent=2, sort_keys=False, default=str) + "\n").encode("utf-8")
