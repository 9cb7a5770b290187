"""The report files of a run: :func:`report_files` reads each distinct image once and yields
thumbnails, contact sheets and pages, page by page, in the order they may be written."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

from vct.report import thumbnails
from vct.report.bounds import clip
from vct.report.contact_sheets import MAX_SHEET_ROWS, contact_sheet
from vct.report.names import join_uri, page_name, sheet_name
from vct.report.pages import page_html
from vct.report.run_record import PairResult, RunSummary, first_reference

MAX_PAGE_SIZE = 1000
"""Largest accepted ``page_size``: beyond this one page could exceed a few MB of HTML."""


def _page_sheets(rows: list[tuple[PairResult, list[thumbnails.Thumb]]], sheets: list[str], *,
                 first: int, total: int, run_id: str) -> Iterator[tuple[str, bytes, str]]:
    """The contact sheets of one page, :data:`MAX_SHEET_ROWS` rows each.

    A function of its own so that no loop variable keeps a page's rows (and thumbnails)
    alive into the next page.
    """
    for k, name in enumerate(sheets):
        chunk = rows[k * MAX_SHEET_ROWS:(k + 1) * MAX_SHEET_ROWS]
        start = first + k * MAX_SHEET_ROWS
        title = (f"run {run_id} - pairs {start}-{start + len(chunk) - 1} of {total}"
                 if chunk else f"run {run_id}")
        yield name, contact_sheet(chunk, title=title), "image/png"


def report_files(
    summary: RunSummary,
    read: Callable[[str], bytes | None],
    *,
    page_size: int = 100,
    thumb: int = 192,
) -> Iterator[tuple[str, bytes, str]]:
    """Yield ``(name, bytes, content type)`` for every thumbnail, HTML page and contact sheet.

    Names are relative to the run folder (see :mod:`vct.report` for the layout). Pages are
    built one at a time, in order: first the thumbnails the page needs that were not yielded
    yet, then its contact sheet(s), then the page itself, so written in the order yielded, a
    page's images exist when it lands. Each distinct image URI is read once through ``read``
    (bytes, or None when missing), thumbnailed, and only its small encoded thumbnail is kept,
    until the last page that shows it. The pages list the run's planned pairs
    (``summary.planned``); a pair's output is read at ``summary.run_uri + "/" + png_name``.
    Bad arguments raise ``ValueError`` here, at the call, not at the first ``next()``.
    """
    if not 1 <= page_size <= MAX_PAGE_SIZE:
        raise ValueError(f"page_size must be in 1..{MAX_PAGE_SIZE}, got {page_size}")
    if not 16 <= thumb <= 1024:
        raise ValueError(f"thumb must be in 16..1024 pixels, got {thumb}")
    return _report_files(summary, read, page_size=page_size, thumb=thumb)


def _report_files(summary: RunSummary, read: Callable[[str], bytes | None], *, page_size: int,
                  thumb: int) -> Iterator[tuple[str, bytes, str]]:
    """The generator behind :func:`report_files` (arguments already checked)."""
    output_uri = summary.run_uri
    ordered = summary.planned
    pages = [ordered[i:i + page_size] for i in range(0, len(ordered), page_size)] or [[]]

    def uris_of(o: PairResult) -> tuple[str, str, str]:
        out = join_uri(output_uri, o.png_name) if o.png_name else ""
        return (o.source_uri, first_reference(o.reference_uri), out)

    # The last page each URI appears on: its thumbnail is dropped once that page is done.
    last_page: dict[str, int] = {}
    for number, page in enumerate(pages):
        for o in page:
            for uri in uris_of(o):
                last_page[uri] = number

    sheets_per_page = [max(1, math.ceil(len(p) / MAX_SHEET_ROWS)) for p in pages]
    _, _, thumb_type = thumbnails.thumb_format()
    live: dict[str, thumbnails.Thumb] = {}
    written: set[str] = set()
    no_image = thumbnails.Thumb(name=None, word="", exists=False)
    run_id = clip(summary.run_id, 40)
    first = 1
    sheet_number = 1

    for number, page in enumerate(pages):
        rows: list[tuple[PairResult, list[thumbnails.Thumb]]] = []
        for o in page:
            thumbs = []
            for uri in uris_of(o):
                if not uri:
                    thumbs.append(no_image)
                    continue
                if uri not in live:
                    live[uri] = thumbnails.make_thumb(thumbnails.safe_read(read, uri), thumb)
                    t = live[uri]
                    if t.name is not None and t.data is not None and t.name not in written:
                        written.add(t.name)
                        yield t.name, t.data, thumb_type
                thumbs.append(live[uri])
            rows.append((o, thumbs))

        sheets = [sheet_name(sheet_number + k) for k in range(sheets_per_page[number])]
        yield from _page_sheets(rows, sheets, first=first, total=len(ordered), run_id=run_id)
        yield page_name(number + 1), page_html(
            summary, number=number + 1, pages=pages, first=first, total_pairs=len(ordered),
            rows=rows, sheets=sheets, thumb=thumb,
        ).encode("utf-8"), "text/html; charset=utf-8"
        sheet_number += len(sheets)
        first += len(page)

        for o in page:
            for uri in uris_of(o):
                if uri and last_page.get(uri) == number:
                    live.pop(uri, None)
