"""Run report: ``run.json``, a paginated static HTML report with separate thumbnail files,
contact-sheet pages, and the markdown / table payloads for Prefect artifacts.

Files of a run's report, all relative to the run folder (next to the outputs ``<name>.png`` and
their sidecars ``<name>.json``):

- ``run.json``: the full summary, every pair and every failure (:meth:`RunSummary.to_json`,
  :func:`run_json_bytes`); the engine writes it, then the files below, then ``_SUCCESS`` last.
- ``report.html``: the index. Run status, counts, the first :data:`MAX_FAILURES_SHOWN`
  failures (with how many more there are; ``run.json`` has them all), a list of the pages and
  the first page of pairs.
- ``report-2.html``, ``report-3.html``, ...: the further pages, at most ``page_size`` pairs
  each, with index / previous / next links.
- ``thumbs/<sha16>.webp`` (``.jpg`` when Pillow has no WebP): one small thumbnail per distinct
  image (source, reference or output), named by the first 16 hex digits of the SHA-256 of the
  image bytes, so an input shown by a thousand pairs is one file, written once.
- ``contact_sheet.png``, ``contact_sheet-2.png``, ...: PNG grids of at most
  :data:`MAX_SHEET_ROWS` pairs each (source | reference | output), drawn from the thumbnails.

Why this shape: a single self-contained page with inline thumbnails grew to ~100 MB at 400
pairs (every input repeated per pair) and one contact sheet to 500 x 56 000 px; neither opens
at thousands of pairs. Now each file is bounded (a page holds at most ``page_size`` rows of
clipped text, a sheet at most ``MAX_SHEET_ROWS`` rows) and the total grows with one thumbnail
per distinct image plus one table row and one sheet row per pair. Pages use relative links
only, no external assets and no JavaScript, so a downloaded run folder opens from ``file://``
and a bucket website serves it as is.

Everything here is pure: the caller passes the bytes in (the ``read`` callback of
:func:`report_files`) and writes the yielded files wherever the run lives, so this package
imports nothing from Prefect or the storage layer. :func:`report_files` is a generator that
reads each distinct image once, keeps only its small encoded thumbnail (and only while a later
page still shows it), so memory stays small however many pairs a manifest has. A broken image
(unreadable bytes, 5000 x 1, 16-bit, palette, CMYK...) becomes a placeholder or a >= 1 px
thumbnail; it never fails the report at the end of a long run.

Pair ids, URIs and failure reasons come from a user-written CSV manifest, so all of them are
hostile text: HTML-escaped (and length-clipped) in pages, percent-quoted in links,
markdown-escaped in the Prefect artifact, and only drawn, never interpreted, in contact sheets.

The package, by responsibility: :mod:`~vct.report.names` (the files' names, reserved names),
:mod:`~vct.report.run_record` (``run.json``), :mod:`~vct.report.thumbnails`,
:mod:`~vct.report.contact_sheets`, :mod:`~vct.report.pages` (HTML),
:mod:`~vct.report.files` (:func:`report_files`, which drives the three before it),
:mod:`~vct.report.prefect_artifacts` (markdown and table payloads) and
:mod:`~vct.report.bounds` (the limits that keep every file bounded).
"""

from __future__ import annotations

from vct.report.bounds import MAX_FAILURES_SHOWN
from vct.report.contact_sheets import MAX_SHEET_ROWS
from vct.report.files import report_files
from vct.report.names import RESERVED_NAMES, is_reserved
from vct.report.prefect_artifacts import markdown_summary, table_rows
from vct.report.run_record import (
    REFERENCES_SHOWN,
    REQUIRED_COUNTS,
    Failure,
    PairResult,
    RunSummary,
    StageReport,
    run_json_bytes,
)

__all__ = [
    "MAX_FAILURES_SHOWN",
    "MAX_SHEET_ROWS",
    "REFERENCES_SHOWN",
    "REQUIRED_COUNTS",
    "RESERVED_NAMES",
    "Failure",
    "PairResult",
    "RunSummary",
    "StageReport",
    "is_reserved",
    "markdown_summary",
    "report_files",
    "run_json_bytes",
    "table_rows",
]
