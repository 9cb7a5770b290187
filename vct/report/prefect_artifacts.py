"""Payloads for the Prefect artifacts of a run: the markdown summary and the table rows, made
inert and bounded (user text is markdown-escaped and clipped)."""

from __future__ import annotations

import html
from typing import Any

from vct.report.bounds import CLIP_ID, CLIP_META, CLIP_REASON, MAX_FAILURES_SHOWN, clip
from vct.report.run_record import PairResult, RunSummary, manifest_order

_MD_SPECIAL = str.maketrans({ch: "\\" + ch for ch in "\\`*_[]|<>#!"})


def _md(value: Any, limit: int = CLIP_REASON) -> str:
    """Make user text inert in markdown: one clipped line, markdown specials and HTML escaped."""
    text = " ".join(("" if value is None else str(value)).split())
    return html.escape(clip(text, limit), quote=False).translate(_MD_SPECIAL)


def markdown_summary(summary: RunSummary) -> str:
    """Markdown for a Prefect artifact: status, the counts table and the failures list.

    Bounded for any run: at most :data:`MAX_FAILURES_SHOWN` failures, each reason clipped;
    the full list is in ``run.json``.
    """
    counts = summary.all_counts()
    failures = summary.failures
    lines = [f"# VCT run {_md(summary.run_id, CLIP_ID)}", ""]
    lines += [f"Status: **{_md(summary.status, 40)}**", ""]
    if summary.run_uri:
        lines += [f"Output: {_md(summary.run_uri, CLIP_META)}", ""]
    lines += ["| count | value |", "|---|---:|"]
    lines += [f"| {_md(k, 80)} | {_md(v, 40)} |" for k, v in counts.items()]
    lines += ["", f"## Failures ({len(failures)})", ""]
    if not failures:
        lines.append("No failures.")
    for f in failures[:MAX_FAILURES_SHOWN]:
        lines.append(f"- line {_md(f.line, 40)} {_md(f.pair_id, CLIP_ID)}: {_md(f.reason)}")
    if len(failures) > MAX_FAILURES_SHOWN:
        lines.append(f"- … and {len(failures) - MAX_FAILURES_SHOWN} more (see run.json)")
    return "\n".join(lines) + "\n"


def table_rows(outcomes: list[PairResult], limit: int = 200) -> list[dict]:
    """Rows for a Prefect table artifact, at most ``limit``, in manifest order.

    When there are more pairs than ``limit``, failed pairs are kept first (they are what the
    table is looked at for), then the others in manifest order; ``run.json`` has every pair.
    Missing values are empty strings rather than None so every row has the same column types.
    """
    ordered = manifest_order(outcomes)
    if len(ordered) > limit:
        failed = [o for o in ordered if o.status == "failed"]
        others = [o for o in ordered if o.status != "failed"]
        ordered = manifest_order((failed + others)[:max(0, limit)])
    return [
        {
            "pair_id": o.pair_id,
            "line": o.line,
            "status": o.status,
            "output_file": o.png_name or "",
            "reason": clip(o.reason or "", CLIP_REASON),
        }
        for o in ordered
    ]
