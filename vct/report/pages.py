"""HTML pages: the index ``report.html`` and the further pages of pairs, escaped and clipped,
with relative links only, inline CSS, a strict CSP and no JavaScript."""

from __future__ import annotations

import html
import math
from typing import Any
from urllib.parse import quote

from vct.report import thumbnails
from vct.report.bounds import CLIP_ID, CLIP_META, CLIP_REASON, CLIP_URI, MAX_FAILURES_SHOWN, clip
from vct.report.contact_sheets import COLUMNS, STATUS_COLOURS, placeholder_word
from vct.report.names import page_name
from vct.report.run_record import PairResult, RunSummary

# Bounds of one page: timings shown per pair, page links listed on the index.
_MAX_TIMINGS = 12
_MAX_PAGE_LINKS = 1000

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px;color:#222}
h1{font-size:1.4em;margin:0 0 .3em}h2{font-size:1.15em;margin:1.4em 0 .5em}
.meta{color:#555;font-size:.9em;margin-bottom:1em}.meta code{word-break:break-all}
table{border-collapse:collapse}th,td{border:1px solid #ddd;padding:4px 8px;vertical-align:middle}
th{background:#f3f3f3;text-align:left}
table.counts td.n{text-align:right;font-variant-numeric:tabular-nums}
table.pairs td{text-align:center}table.pairs td.id{text-align:left;word-break:break-all}
.thumb img{display:block;margin:auto;border:1px solid #ccc;background:#e8e8e8;
object-fit:contain}
.ph{display:inline-block;background:#a0a0a0;color:#fff;font-size:.85em;padding:1.2em .6em}
.status-ok{color:#1e7828;font-weight:600}.status-skipped{color:#285096;font-weight:600}
.status-failed{color:#aa1e1e;font-weight:600}
.run-complete{background:#1e7828}.run-partial{background:#b06a00}.run-failed{background:#aa1e1e}
.run{color:#fff;padding:.1em .5em;border-radius:.3em;font-size:.8em;vertical-align:middle}
.run-other{background:#666}
table.pairs td.timings{text-align:left;font-size:.85em;color:#444;white-space:nowrap}
.uri{font-size:.8em;color:#666;word-break:break-all;max-width:16em;margin:auto}
nav{margin:.8em 0}nav a,nav span{margin-right:.6em}nav .cur{font-weight:700}
ul.failures li{margin:.2em 0}.reason{white-space:pre-wrap}.note{color:#777;font-size:.9em}
"""

# Defence in depth next to escaping: no script, plugin or form can run in a report page even if
# some hostile text slipped through; images only from the run folder itself.
_CSP = ("default-src 'none'; img-src 'self' file:; style-src 'unsafe-inline'; "
        "base-uri 'none'; form-action 'none'")


def _e(value: Any) -> str:
    """HTML-escape any value (quotes too, so it is safe inside attributes)."""
    return html.escape("" if value is None else str(value), quote=True)


def _et(value: Any, limit: int) -> str:
    """Escape text clipped to ``limit`` characters, so a page's size stays bounded."""
    return _e(clip(value, limit))


def _href(name: str | None) -> str | None:
    """Relative, attribute-ready link to a file of the run folder, or None if unsafe.

    Each path segment is percent-quoted (no ``:`` survives, so no ``javascript:`` URL), and a
    name with an empty, ``.`` or ``..`` segment is refused so no link leaves the run folder.
    """
    if not name:
        return None
    segments = name.split("/")
    if any(seg in ("", ".", "..") for seg in segments):
        return None
    return _e("/".join(quote(seg, safe="") for seg in segments))


def _format_timings(timings: Any) -> str:
    """Render ``timings`` (name -> seconds) as short lines; tolerant of odd values."""
    if not isinstance(timings, dict) or not timings:
        return ""
    parts = []
    for name, value in list(timings.items())[:_MAX_TIMINGS]:
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            shown = f"{value:.2f} s"
        else:
            shown = clip(value, 40)
        parts.append(f"{_et(name, 40)}: {_e(shown)}")
    if len(timings) > _MAX_TIMINGS:
        parts.append(f"... {len(timings) - _MAX_TIMINGS} more in run.json")
    return "<br>".join(parts)


def _head(title: str) -> list[str]:
    """Document start shared by every page: inline CSS, CSP, no external asset."""
    return [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{title}</title>",
        f"<style>{_CSS}</style>",
        "</head><body>",
    ]


def _status_badge(status: Any) -> str:
    """The run's status as a coloured badge (``complete`` / ``partial`` / ``failed``)."""
    known = status in ("complete", "partial", "failed")
    cls = f"run-{status}" if known else "run-other"
    return f'<span class="run {cls}">{_et(status, 40)}</span>'


def _nav(current: int, total: int) -> str:
    """Index / previous / next links plus a window of page numbers (bounded for any total)."""
    parts: list[str] = []
    if current != 1:
        parts.append('<a href="report.html">index</a>')
    if current > 1:
        parts.append(f'<a href="{page_name(current - 1)}" rel="prev">&larr; previous</a>')
    shown = sorted({1, 2, total - 1, total, *range(current - 3, current + 4)} & set(
        range(1, total + 1)))
    last = 0
    for number in shown:
        if number > last + 1:
            parts.append("<span>&hellip;</span>")
        if number == current:
            parts.append(f'<span class="cur">{number}</span>')
        else:
            parts.append(f'<a href="{page_name(number)}">{number}</a>')
        last = number
    if current < total:
        parts.append(f'<a href="{page_name(current + 1)}" rel="next">next &rarr;</a>')
    return f'<nav aria-label="pages">{" ".join(parts)}</nav>'


def _pair_row(o: PairResult, thumbs: list[thumbnails.Thumb], thumb: int) -> str:
    """One ``<tr>`` of the pairs table: ids, three thumbnails, file links, reason, timings."""
    status_cls = o.status if o.status in STATUS_COLOURS else "other"
    cells = [
        f'<td class="id">{_et(o.pair_id, CLIP_ID)}</td>',
        f"<td>{_e(o.line)}</td>",
        f'<td class="status-{status_cls}">{_et(o.status, 40)}</td>',
    ]
    uris = (o.source_uri, o.reference_uri, o.png_name)
    for column, uri, t in zip(COLUMNS, uris, thumbs):
        if t.name is not None:
            w, h = thumbnails.fit(t.width, t.height, thumb, upscale=True)
            inner = (f'<img src="{_e(t.name)}" width="{w}" height="{h}" alt="{column}" '
                     'loading="lazy" decoding="async">')
        else:
            inner = f'<span class="ph">{_e(placeholder_word(o, column, t))}</span>'
        uri_html = f'<div class="uri">{_et(uri, CLIP_URI)}</div>' if uri else ""
        cells.append(f'<td class="thumb">{inner}{uri_html}</td>')
    links = []
    png_href = _href(o.png_name) if thumbs[2].exists else None
    if png_href:
        links.append(f'<a href="{png_href}">png</a>')
    json_href = _href(o.sidecar_name)
    if json_href:
        links.append(f'<a href="{json_href}">json</a>')
    files = " &middot; ".join(links)
    if o.reason:
        files += f'<div class="reason">{_et(o.reason, CLIP_REASON)}</div>'
    cells.append(f"<td>{files}</td>")
    cells.append(f'<td class="timings">{_format_timings(o.timings)}</td>')
    return "<tr>" + "".join(cells) + "</tr>"


def _pairs_table(rows: list[tuple[PairResult, list[thumbnails.Thumb]]], thumb: int) -> list[str]:
    """The pairs table of one page."""
    out = ['<table class="pairs"><thead><tr>']
    for title in ("pair", "line", "status", *COLUMNS, "files", "timings"):
        out.append(f"<th>{title}</th>")
    out.append("</tr></thead><tbody>")
    out.extend(_pair_row(o, thumbs, thumb) for o, thumbs in rows)
    out.append("</tbody></table>")
    return out


def _index_sections(summary: RunSummary, pages: list[list[PairResult]]) -> list[str]:
    """What only the index shows: run metadata, counts, bounded failures and the page list."""
    out = ['<div class="meta">']
    for label, value in (
        ("manifest", summary.manifest_uri),
        ("output", summary.run_uri),
        ("flow run", summary.flow_run_id),
        ("started", summary.started_at),
        ("finished", summary.finished_at),
        ("duration (s)", summary.duration_s),
    ):
        if value is not None:
            out.append(f"{label}: <code>{_et(value, CLIP_META)}</code><br>")
    out.append('full summary: <a href="run.json">run.json</a></div>')

    out.append("<h2>Counts</h2>")
    out.append('<table class="counts"><tbody>')
    for key, count in summary.all_counts().items():
        out.append(f'<tr><th>{_et(key, 80)}</th><td class="n">{_et(count, 40)}</td></tr>')
    out.append("</tbody></table>")

    failures = summary.failures
    out.append(f"<h2>Failures ({len(failures)})</h2>")
    if not failures:
        out.append('<p class="note">No failures.</p>')
    else:
        out.append('<ul class="failures">')
        for f in failures[:MAX_FAILURES_SHOWN]:
            stage = f" ({_et(f.stage, 40)})" if f.stage else ""
            out.append(
                f"<li>line {_et(f.line, 40)}{stage} "
                f"<code>{_et(f.pair_id, CLIP_ID)}</code>: "
                f'<span class="reason">{_et(f.reason, CLIP_REASON)}</span></li>'
            )
        out.append("</ul>")
        if len(failures) > MAX_FAILURES_SHOWN:
            out.append(f'<p class="note">showing the first {MAX_FAILURES_SHOWN}; '
                       f"{len(failures) - MAX_FAILURES_SHOWN} more failures are listed in "
                       '<a href="run.json">run.json</a> (it has them all).</p>')

    if len(pages) > 1:
        out.append(f"<h2>Pages ({len(pages)})</h2>")
        out.append('<ol class="pages">')
        start = 1
        for number, page in enumerate(pages[:_MAX_PAGE_LINKS], start=1):
            end = start + len(page) - 1
            span = f"pairs {start}&ndash;{end} (lines {_e(page[0].line)}&ndash;{_e(page[-1].line)})"
            out.append(f'<li><a href="{page_name(number)}">{span}</a></li>')
            start = end + 1
        out.append("</ol>")
        if len(pages) > _MAX_PAGE_LINKS:
            out.append(f'<p class="note">pages after {_MAX_PAGE_LINKS} are reached with the '
                       "next links.</p>")
    return out


def page_html(summary: RunSummary, *, number: int, pages: list[list[PairResult]], first: int,
              total_pairs: int, rows: list[tuple[PairResult, list[thumbnails.Thumb]]],
              sheets: list[str], thumb: int) -> str:
    """One HTML page: the index (``number == 1``) or a further page of pairs."""
    run_id = summary.run_id
    total = len(pages)
    title = f"VCT run {_et(run_id, CLIP_ID)}"
    if number > 1:
        title += f" &ndash; page {number} of {total}"
    out = _head(title)
    out.append(f"<h1>{title} {_status_badge(summary.status)}</h1>")
    if number == 1:
        out.extend(_index_sections(summary, pages))
    nav = _nav(number, total) if total > 1 else ""
    if rows:
        last = first + len(rows) - 1
        out.append(f"<h2>Pairs {first}&ndash;{last} of {total_pairs}</h2>")
    else:
        out.append("<h2>Pairs (0)</h2>")
    out.append(nav)
    if rows:
        out.extend(_pairs_table(rows, thumb))
    else:
        out.append('<p class="note">no pairs</p>')
    out.append(nav)
    sheet_links = " &middot; ".join(f'<a href="{s}">{s}</a>' for s in sheets)
    out.append(f'<p class="note">contact sheet of this page: {sheet_links}</p>')
    out.append("</body></html>")
    return "\n".join(out) + "\n"
