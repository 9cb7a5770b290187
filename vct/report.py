"""Run report artifacts: ``run.json``, a contact sheet PNG, a self-contained ``report.html``, and
the markdown / table payloads for Prefect artifacts.

Everything here is a pure function returning ``dict`` / ``str`` / ``bytes``: the flow decides where
the bytes go (local folder, S3, Prefect), so this module does no I/O and imports nothing from
Prefect or the storage layer. That keeps it testable without a bucket and usable from the CLI.

Pair ids, URIs and failure reasons come from a user-written CSV manifest, so every one of them is
treated as hostile text: HTML-escaped in the page, URL-quoted in links, markdown-escaped in the
Prefect artifact, and drawn (never interpreted) in the contact sheet.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any
from urllib.parse import quote

from PIL import Image, ImageDraw, ImageFont, ImageOps

__all__ = [
    "MAX_SHEET_ROWS",
    "REQUIRED_COUNTS",
    "PairOutcome",
    "build_run_summary",
    "contact_sheet",
    "markdown_summary",
    "report_html",
    "run_json_bytes",
    "table_rows",
]

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

MAX_SHEET_ROWS = 500
"""Rows drawn in the contact sheet (and pairs given thumbnails in the HTML page). A run of
thousands of pairs would otherwise make a multi-hundred-megapixel PNG / a huge HTML file that no
browser opens comfortably; the rest are still listed in run.json and the HTML table."""

SUMMARY_SCHEMA_VERSION = 1

_BACKGROUND = (255, 255, 255)
_LETTERBOX = (232, 232, 232)  # neutral, so letterbox bars do not read as part of the image
_PLACEHOLDER = (160, 160, 160)
_TEXT = (20, 20, 20)
_MUTED = (90, 90, 90)
_STATUS_COLOURS = {"ok": (30, 120, 40), "skipped": (40, 80, 150), "failed": (170, 30, 30)}
_COLUMNS = ("source", "reference", "output")
_PAD = 6
_MAX_LABEL_CHARS = 32
_MAX_MD_FAILURES = 200


@dataclass
class PairOutcome:
    """What happened to one manifest pair; the flow builds one per accepted manifest row.

    ``status`` is ``"ok"``, ``"failed"`` or ``"skipped"`` (skipped = the output already existed
    for the same inputs and settings, so nothing was recomputed). The ``*_png`` fields are any
    image bytes PIL can open and are only used for thumbnails; they never reach ``run.json``.
    """

    pair_id: str
    line: int
    status: str
    source_uri: str
    reference_uri: str
    output_uri: str | None
    reason: str | None = None
    sidecar: dict | None = None
    source_png: bytes | None = None
    reference_png: bytes | None = None
    output_png: bytes | None = None


# --------------------------------------------------------------------------------------------
# run.json
# --------------------------------------------------------------------------------------------


def _duration_s(started_at: str, finished_at: str) -> float | None:
    """Seconds between two ISO timestamps, or None if either does not parse (never fatal)."""
    try:
        start = datetime.fromisoformat(started_at)
        end = datetime.fromisoformat(finished_at)
        return round((end - start).total_seconds(), 3)
    except (TypeError, ValueError):
        return None


def _name(uri: str | None, suffix: str = ".png") -> str | None:
    """The output's file name in the run folder (the PNG's, or its sidecar's)."""
    name = (uri or "").rstrip("/").rsplit("/", 1)[-1]
    return name[: -len(".png")] + suffix if name.endswith(".png") else None


def _pair_entry(outcome: PairOutcome) -> dict[str, Any]:
    """One ``pairs`` entry: the outcome minus image bytes, plus the relative artifact names."""
    return {
        "pair_id": outcome.pair_id,
        "line": outcome.line,
        "status": outcome.status,
        "source_uri": outcome.source_uri,
        "reference_uri": outcome.reference_uri,
        "output_uri": outcome.output_uri,
        "reason": outcome.reason,
        "output_file": _name(outcome.output_uri) if _has_output(outcome) else None,
        "sidecar_file": _name(outcome.output_uri, ".json") if _has_output(outcome) else None,
        "sidecar": outcome.sidecar,
    }


def build_run_summary(
    run_id: str,
    flow_run_id: str | None,
    manifest_uri: str,
    output_uri: str,
    counts: dict[str, int],
    outcomes: list[PairOutcome],
    row_errors: list[dict],
    started_at: str,
    finished_at: str,
    extra: dict | None = None,
) -> dict:
    """Build the ``run.json`` content.

    ``failures`` joins manifest row errors (rows rejected before any work, dicts with ``line``,
    ``pair_id``, ``reason``) and failed pairs, sorted by manifest line, because whoever fixes
    the CSV needs every bad line in one place rather than two lists to cross-reference.
    ``output_uri`` is the run's output prefix (``<output_uri>/<run_id>/``). ``extra`` lands
    under ``details`` so caller-specific keys can never shadow the documented ones.
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
        "started_at": started_at,
        "finished_at": finished_at,
        "duration_s": _duration_s(started_at, finished_at),
        "status": "ok" if not failures else "completed_with_failures",
        "counts": full_counts,
        "pairs": [_pair_entry(o) for o in sorted(outcomes, key=lambda o: (o.line, o.pair_id))],
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
    """Serialise a summary for storage; ``default=str`` so an odd sidecar value cannot lose the
    whole report at the very end of a long run."""
    return (json.dumps(summary, indent=2, sort_keys=False, default=str) + "\n").encode("utf-8")


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """PIL's built-in font: works on a bare container with no font files installed."""
    return ImageFont.load_default()


def _has_output(outcome: PairOutcome) -> bool:
    """Whether ``<pair_id>.png`` / ``.json`` exist in the run folder for this pair."""
    return outcome.status in ("ok", "skipped") or outcome.output_uri is not None


def _open_rgb(data: bytes | None) -> Image.Image | None:
    """Decode image bytes to RGB (alpha flattened on the letterbox colour); None if unreadable.

    Any decode error (truncated file, decompression-bomb guard, unknown format) is swallowed:
    a report must still be produced when one pair's image is broken.
    """
    if not data:
        return None
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.draft("RGB", (1024, 1024))  # cheap JPEG downscale on decode; no-op otherwise
            img = ImageOps.exif_transpose(img)
            if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
                rgba = img.convert("RGBA")
                flat = Image.new("RGB", rgba.size, _LETTERBOX)
                flat.paste(rgba, mask=rgba.getchannel("A"))
                return flat
            return img.convert("RGB")
    except Exception:  # any broken image becomes a placeholder tile
        return None


def _placeholder_word(outcome: PairOutcome, column: str, data: bytes | None) -> str:
    """Label for a tile we cannot show: why it is absent matters to the reader."""
    if data:
        return "unreadable"
    if outcome.status == "failed" and column == "output":
        return "failed"
    return "missing"


def _renderable(text: str) -> str:
    """Text the default font can draw: without FreeType, Pillow falls back to a latin-1 bitmap
    font that raises on other characters, and a pair id may be any unicode."""
    if isinstance(_font(), ImageFont.FreeTypeFont):
        return text
    return text.encode("latin-1", "replace").decode("latin-1")


def _text_size(draw: ImageDraw.ImageDraw, text: str) -> tuple[int, int]:
    """Pixel width/height of ``text`` in the default font (bitmap or FreeType alike)."""
    left, top, right, bottom = draw.textbbox((0, 0), _renderable(text), font=_font())
    return right - left, bottom - top


def _draw_text(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str,
               fill: tuple[int, int, int]) -> None:
    """Draw one line in the default font; see :func:`_renderable`."""
    draw.text(xy, _renderable(text), fill=fill, font=_font())


def _tile(img: Image.Image | None, word: str, thumb: int) -> Image.Image:
    """A thumb x thumb tile: the image contained and centred (letterboxed), or a grey card."""
    if img is None:
        tile = Image.new("RGB", (thumb, thumb), _PLACEHOLDER)
        draw = ImageDraw.Draw(tile)
        w, h = _text_size(draw, word)
        _draw_text(draw, ((thumb - w) / 2, (thumb - h) / 2), word, fill=(255, 255, 255))
        return tile
    tile = Image.new("RGB", (thumb, thumb), _LETTERBOX)
    small = ImageOps.contain(img, (thumb, thumb), Image.Resampling.LANCZOS)
    tile.paste(small, ((thumb - small.width) // 2, (thumb - small.height) // 2))
    return tile


def _clip(text: str, limit: int = _MAX_LABEL_CHARS) -> str:
    """Keep labels to one readable line; also removes control characters from user ids."""
    clean = "".join(ch if ch.isprintable() else " " for ch in str(text))
    return clean if len(clean) <= limit else clean[: limit - 3] + "..."


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _message_png(message: str) -> bytes:
    """A small PNG carrying one line of text (used for an empty run)."""
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    w, h = _text_size(probe, message)
    img = Image.new("RGB", (max(160, w + 4 * _PAD), max(48, h + 4 * _PAD)), _BACKGROUND)
    draw = ImageDraw.Draw(img)
    _draw_text(draw, ((img.width - w) / 2, (img.height - h) / 2), message, fill=_TEXT)
    return _png_bytes(img)


def contact_sheet(outcomes: list[PairOutcome], thumb: int = 128) -> bytes:
    """Render a PNG grid, one row per pair (source | reference | output), for a quick visual QA.

    Rows are ordered by manifest line and labelled with the pair id, line and status so a bad
    result can be traced back to its CSV row. At most :data:`MAX_SHEET_ROWS` rows are drawn
    (the image says so when truncated) to keep the PNG openable.
    """
    if thumb < 16:
        raise ValueError(f"thumb must be >= 16 pixels, got {thumb}")
    if not outcomes:
        return _message_png("no pairs")

    ordered = sorted(outcomes, key=lambda o: (o.line, o.pair_id))
    shown = ordered[:MAX_SHEET_ROWS]
    truncated = len(ordered) - len(shown)

    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = max(_text_size(probe, "Ag|")[1], 8) + 4
    labels = [
        (_clip(o.pair_id), _clip(f"line {o.line} - {o.status}")) for o in shown
    ]
    label_w = max(
        [_text_size(probe, t)[0] for pair in labels for t in pair] + [_text_size(probe, "pair")[0]]
    )
    label_w = min(max(label_w, 80), 320) + 2 * _PAD

    header_h = line_h + 2 * _PAD
    row_h = thumb + 2 * _PAD
    footer_h = line_h + 2 * _PAD if truncated else 0
    width = label_w + len(_COLUMNS) * (thumb + _PAD) + _PAD
    height = header_h + len(shown) * row_h + footer_h

    sheet = Image.new("RGB", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(sheet)

    def col_x(i: int) -> int:
        return label_w + i * (thumb + _PAD)

    _draw_text(draw, (_PAD, _PAD), "pair", fill=_MUTED)
    for i, title in enumerate(_COLUMNS):
        w, _ = _text_size(draw, title)
        _draw_text(draw, (col_x(i) + (thumb - w) / 2, _PAD), title, fill=_TEXT)
    draw.line([(0, header_h - 1), (width, header_h - 1)], fill=_PLACEHOLDER)

    for r, (outcome, (name, sub)) in enumerate(zip(shown, labels)):
        y = header_h + r * row_h
        if r % 2:
            draw.rectangle([(0, y), (width, y + row_h - 1)], fill=(248, 248, 248))
        text_y = y + (row_h - 2 * line_h) // 2
        _draw_text(draw, (_PAD, text_y), name, fill=_TEXT)
        _draw_text(draw, (_PAD, text_y + line_h), sub,
                   fill=_STATUS_COLOURS.get(outcome.status, _MUTED))
        for i, (column, data) in enumerate(
            zip(_COLUMNS, (outcome.source_png, outcome.reference_png, outcome.output_png))
        ):
            img = _open_rgb(data)
            tile = _tile(img, _placeholder_word(outcome, column, data), thumb)
            sheet.paste(tile, (col_x(i), y + _PAD))

    if truncated:
        note = f"showing the first {len(shown)} of {len(ordered)} pairs ({truncated} not drawn)"
        _draw_text(draw, (_PAD, height - footer_h + _PAD), note, fill=_MUTED)

    return _png_bytes(sheet)


def _thumb_data_uri(data: bytes | None, thumb: int) -> str | None:
    """A ``data:image/png;base64,...`` thumbnail, so the HTML page needs no other file."""
    img = _open_rgb(data)
    if img is None:
        return None
    small = ImageOps.contain(img, (thumb, thumb), Image.Resampling.LANCZOS)
    return "data:image/png;base64," + base64.b64encode(_png_bytes(small)).decode("ascii")


# --------------------------------------------------------------------------------------------
# report.html
# --------------------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px;color:#222}
h1{font-size:1.4em;margin:0 0 .3em}h2{font-size:1.15em;margin:1.4em 0 .5em}
.meta{color:#555;font-size:.9em;margin-bottom:1em}.meta code{word-break:break-all}
table{border-collapse:collapse}th,td{border:1px solid #ddd;padding:4px 8px;vertical-align:middle}
th{background:#f3f3f3;text-align:left}
table.counts td.n{text-align:right;font-variant-numeric:tabular-nums}
table.pairs td{text-align:center}table.pairs td.id{text-align:left;word-break:break-all}
.thumb img{display:block;margin:auto;border:1px solid #ccc;background:#e8e8e8}
.ph{display:inline-block;background:#a0a0a0;color:#fff;font-size:.85em;padding:1.2em .6em}
.status-ok{color:#1e7828;font-weight:600}.status-skipped{color:#285096;font-weight:600}
.status-failed{color:#aa1e1e;font-weight:600}
.timings{text-align:left;font-size:.85em;color:#444;white-space:nowrap}
.uri{font-size:.8em;color:#666;word-break:break-all}
ul.failures li{margin:.2em 0}.reason{white-space:pre-wrap}.note{color:#777;font-size:.9em}
"""


def _e(value: Any) -> str:
    """HTML-escape any value (quotes too, so it is safe inside attributes)."""
    return html.escape("" if value is None else str(value), quote=True)


def _href(pair_id: str, suffix: str) -> str:
    """Relative link to a run artifact: works from a local folder and from a bucket website.

    The id is percent-quoted (no ``/`` or ``:`` left), so a hostile id cannot become a
    ``javascript:`` URL or escape the run folder; then HTML-escaped for the attribute.
    """
    return _e(quote(f"{pair_id}{suffix}", safe=""))


def _format_timings(timings: Any) -> str:
    """Render ``sidecar["timings"]`` (name -> seconds) as short lines; tolerant of odd values."""
    if not isinstance(timings, dict) or not timings:
        return ""
    parts = []
    for name, value in timings.items():
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            shown = f"{value:.2f} s"
        else:
            shown = str(value)
        parts.append(f"{_e(name)}: {_e(shown)}")
    return "<br>".join(parts)


def _derived_failures(outcomes: Iterable[PairOutcome]) -> list[dict[str, Any]]:
    """Failures from outcomes alone, for a summary that lacks a ``failures`` list."""
    return [
        {"line": o.line, "pair_id": o.pair_id, "reason": o.reason or "unknown error"}
        for o in outcomes
        if o.status == "failed"
    ]


def report_html(summary: dict, outcomes: list[PairOutcome], thumb: int = 160) -> str:
    """Build one self-contained HTML page for an art lead to open from a bucket or a folder.

    No external assets (thumbnails are data URIs, CSS is inline, no JS), so the file can be
    mailed, opened from ``file://`` or served by a static bucket website. Full outputs are
    linked by relative path ``<pair_id>.png`` / ``<pair_id>.json``, i.e. the files next to it.
    Pairs beyond :data:`MAX_SHEET_ROWS` are listed without thumbnails to bound the file size.
    """
    run_id = summary.get("run_id", "")
    counts = summary.get("counts") or {}
    failures = summary.get("failures")
    if failures is None:
        failures = _derived_failures(outcomes)

    out: list[str] = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>VCT run {_e(run_id)}</title>",
        f"<style>{_CSS}</style>",
        "</head><body>",
        f"<h1>VCT run {_e(run_id)}</h1>",
        '<div class="meta">',
    ]
    for label, key in (
        ("manifest", "manifest_uri"),
        ("output", "output_uri"),
        ("flow run", "flow_run_id"),
        ("started", "started_at"),
        ("finished", "finished_at"),
        ("duration (s)", "duration_s"),
    ):
        if summary.get(key) is not None:
            out.append(f"{_e(label)}: <code>{_e(summary[key])}</code><br>")
    out.append("</div>")

    out.append("<h2>Counts</h2>")
    out.append('<table class="counts"><tbody>')
    for key, value in counts.items():
        out.append(f'<tr><th>{_e(key)}</th><td class="n">{_e(value)}</td></tr>')
    out.append("</tbody></table>")

    ordered = sorted(outcomes, key=lambda o: (o.line, o.pair_id))
    out.append(f"<h2>Pairs ({len(ordered)})</h2>")
    if not ordered:
        out.append('<p class="note">no pairs</p>')
    else:
        if len(ordered) > MAX_SHEET_ROWS:
            out.append(
                f'<p class="note">thumbnails shown for the first {MAX_SHEET_ROWS} of '
                f"{len(ordered)} pairs</p>"
            )
        out.append('<table class="pairs"><thead><tr>')
        for title in ("pair", "line", "status", *_COLUMNS, "files", "timings"):
            out.append(f"<th>{_e(title)}</th>")
        out.append("</tr></thead><tbody>")
        for index, o in enumerate(ordered):
            out.append(_pair_row(o, thumb, with_thumbs=index < MAX_SHEET_ROWS))
        out.append("</tbody></table>")

    out.append(f"<h2>Failures ({len(failures)})</h2>")
    if not failures:
        out.append('<p class="note">No failures.</p>')
    else:
        out.append('<ul class="failures">')
        for f in failures:
            stage = f" ({_e(f['stage'])})" if f.get("stage") else ""
            out.append(
                f"<li>line {_e(f.get('line'))}{stage} <code>{_e(f.get('pair_id'))}</code>: "
                f'<span class="reason">{_e(f.get("reason"))}</span></li>'
            )
        out.append("</ul>")

    out.append("</body></html>")
    return "\n".join(out) + "\n"


def _pair_row(o: PairOutcome, thumb: int, *, with_thumbs: bool) -> str:
    """One ``<tr>`` of the pairs table."""
    status_cls = _e(o.status) if o.status in _STATUS_COLOURS else "other"
    cells = [
        f'<td class="id">{_e(o.pair_id)}</td>',
        f"<td>{_e(o.line)}</td>",
        f'<td class="status-{status_cls}">{_e(o.status)}</td>',
    ]
    uris = (o.source_uri, o.reference_uri, o.output_uri)
    datas = (o.source_png, o.reference_png, o.output_png)
    for column, uri, data in zip(_COLUMNS, uris, datas):
        if with_thumbs:
            src = _thumb_data_uri(data, thumb)
            inner = (
                f'<img src="{src}" alt="{_e(column)}" loading="lazy">'
                if src
                else f'<span class="ph">{_e(_placeholder_word(o, column, data))}</span>'
            )
        else:
            inner = ""
        uri_html = f'<div class="uri">{_e(uri)}</div>' if uri else ""
        cells.append(f'<td class="thumb">{inner}{uri_html}</td>')
    if _has_output(o):
        files = (
            f'<a href="{_href(o.pair_id, ".png")}">png</a> · '
            f'<a href="{_href(o.pair_id, ".json")}">json</a>'
        )
    else:
        files = f'<span class="reason">{_e(o.reason or "")}</span>'
    cells.append(f"<td>{files}</td>")
    timings = (o.sidecar or {}).get("timings") if isinstance(o.sidecar, dict) else None
    cells.append(f'<td class="timings">{_format_timings(timings)}</td>')
    return "<tr>" + "".join(cells) + "</tr>"


# --------------------------------------------------------------------------------------------
# Prefect artifact payloads
# --------------------------------------------------------------------------------------------

_MD_SPECIAL = str.maketrans({ch: "\\" + ch for ch in "\\`*_[]|<>#!"})


def _md(value: Any) -> str:
    """Make user text inert in markdown: one line, markdown specials and HTML escaped."""
    text = " ".join(("" if value is None else str(value)).split())
    return html.escape(text, quote=False).translate(_MD_SPECIAL)


def markdown_summary(summary: dict) -> str:
    """Markdown for a Prefect artifact: the counts table and the failures list.

    The failures list is capped at a few hundred items; the full list is in ``run.json``.
    """
    counts = summary.get("counts") or {}
    failures = summary.get("failures") or []
    lines = [f"# VCT run {_md(summary.get('run_id', ''))}", ""]
    if summary.get("output_uri"):
        lines += [f"Output: {_md(summary['output_uri'])}", ""]
    lines += ["| count | value |", "|---|---:|"]
    lines += [f"| {_md(k)} | {_md(v)} |" for k, v in counts.items()]
    lines += ["", f"## Failures ({len(failures)})", ""]
    if not failures:
        lines.append("No failures.")
    for f in failures[:_MAX_MD_FAILURES]:
        lines.append(f"- line {_md(f.get('line'))} {_md(f.get('pair_id'))}: {_md(f.get('reason'))}")
    if len(failures) > _MAX_MD_FAILURES:
        lines.append(f"- … and {len(failures) - _MAX_MD_FAILURES} more (see run.json)")
    return "\n".join(lines) + "\n"


def table_rows(outcomes: list[PairOutcome]) -> list[dict]:
    """Rows for a Prefect table artifact, one per pair in manifest order.

    Missing values are empty strings rather than None so every row has the same column types.
    """
    return [
        {
            "pair_id": o.pair_id,
            "line": o.line,
            "status": o.status,
            "output_uri": o.output_uri or "",
            "reason": o.reason or "",
        }
        for o in sorted(outcomes, key=lambda o: (o.line, o.pair_id))
    ]
