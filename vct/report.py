"""Run report: ``run.json``, a paginated static HTML report with separate thumbnail files,
contact-sheet pages, and the markdown / table payloads for Prefect artifacts.

Files of a run's report, all relative to the run folder (next to the outputs ``<name>.png`` and
their sidecars ``<name>.json``):

- ``run.json``: the full summary, every pair and every failure (:func:`build_run_summary`,
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
:func:`report_files`) and writes the yielded files wherever the run lives, so this module
imports nothing from Prefect or the storage layer. :func:`report_files` is a generator that
reads each distinct image once, keeps only its small encoded thumbnail (and only while a later
page still shows it), so memory stays small however many pairs a manifest has. A broken image
(unreadable bytes, 5000 x 1, 16-bit, palette, CMYK...) becomes a placeholder or a >= 1 px
thumbnail; it never fails the report at the end of a long run.

Pair ids, URIs and failure reasons come from a user-written CSV manifest, so all of them are
hostile text: HTML-escaped (and length-clipped) in pages, percent-quoted in links,
markdown-escaped in the Prefect artifact, and only drawn, never interpreted, in contact sheets.
"""

from __future__ import annotations

import hashlib
import html
import io
import json
import math
import re
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any
from urllib.parse import quote

from PIL import Image, ImageDraw, ImageFont, ImageOps, features

__all__ = [
    "MAX_FAILURES_SHOWN",
    "MAX_SHEET_ROWS",
    "REQUIRED_COUNTS",
    "RESERVED_NAMES",
    "PairOutcome",
    "build_run_summary",
    "is_reserved",
    "markdown_summary",
    "report_files",
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

MAX_SHEET_ROWS = 100
"""Pairs per contact-sheet PNG: bounds each sheet to ~100 x 108 px tall, a few megapixels."""

MAX_FAILURES_SHOWN = 200
"""Failures listed in ``report.html`` and the markdown artifact; ``run.json`` has them all."""

MAX_PAGE_SIZE = 1000
"""Largest accepted ``page_size``: beyond this one page could exceed a few MB of HTML."""

THUMBS_DIR = "thumbs"

RESERVED_NAMES: frozenset[str] = frozenset(
    {"run.json", "_SUCCESS", "report.html", "contact_sheet.png", THUMBS_DIR}
)
"""Fixed names the report writes at the top of the run folder (``thumbs`` is a folder). The
numbered pages ``report-N.html`` / ``contact_sheet-N.png`` are reserved too: see
:func:`is_reserved`, which is what the engine should ask."""

SUMMARY_SCHEMA_VERSION = 2

_RESERVED_NUMBERED = re.compile(r"(?:report-\d+\.html|contact_sheet-\d+\.png)", re.IGNORECASE)
_RESERVED_FOLDED = frozenset(n.casefold() for n in RESERVED_NAMES)

_SHEET_TILE = 96  # contact-sheet tile edge; the HTML shows the full thumbnail
_BACKGROUND = (255, 255, 255)
_LETTERBOX = (232, 232, 232)  # neutral, so letterbox bars do not read as part of the image
_PLACEHOLDER = (160, 160, 160)
_TEXT = (20, 20, 20)
_MUTED = (90, 90, 90)
_STATUS_COLOURS = {"ok": (30, 120, 40), "skipped": (40, 80, 150), "failed": (170, 30, 30)}
_COLUMNS = ("source", "reference", "output")
_PAD = 6
_MAX_LABEL_CHARS = 32

# Text clipped in pages and artifacts (run.json keeps the full text). These bound a page's size
# whatever a CSV or an exception message contains: escaping can grow text ~6x.
_CLIP_ID = 160
_CLIP_URI = 240
_CLIP_REASON = 400
_CLIP_META = 500
_MAX_TIMINGS = 12
_MAX_PAGE_LINKS = 1000


@dataclass
class PairOutcome:
    """What happened to one accepted manifest pair; the engine builds one per pair.

    ``status`` is ``"ok"``, ``"skipped"`` (the output already existed for the same inputs and
    settings, so nothing was recomputed) or ``"failed"``; rejected manifest rows are not pairs,
    they come as ``row_errors``. ``png_name`` / ``sidecar_name`` are relative to the run folder
    and come from the engine's one naming function (the manifest's ``output_name``, not the
    pair id), ``None`` when the pair has no output. ``timings`` maps a stage name to seconds.
    """

    pair_id: str
    line: int
    status: str
    source_uri: str
    reference_uri: str
    png_name: str | None
    sidecar_name: str | None
    reason: str | None = None
    timings: dict | None = None


def is_reserved(name: str) -> bool:
    """Whether ``name`` (relative to the run folder) is, or is under, a file the report writes.

    The engine refuses output names for which this is true (for ``<name>.png`` and
    ``<name>.json``), so an output can never overwrite the report or vice versa. Compared
    ignoring case because a downloaded run folder may land on a case-insensitive file system.
    """
    clean = name.strip()
    while clean.startswith("./"):
        clean = clean[2:]
    folded = clean.casefold()
    if folded in _RESERVED_FOLDED or _RESERVED_NUMBERED.fullmatch(clean):
        return True
    return folded.startswith(THUMBS_DIR + "/")


def _join(base: str, name: str) -> str:
    """``base/name`` for a local path or an ``s3://`` URI alike (``/`` separators always)."""
    return f"{base.rstrip('/')}/{name}" if base else name


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


def _ordered(outcomes: list[PairOutcome]) -> list[PairOutcome]:
    """Manifest order: the order whoever wrote the CSV reads it in."""
    return sorted(outcomes, key=lambda o: (o.line, o.pair_id))


def _pair_entry(outcome: PairOutcome, output_uri: str) -> dict[str, Any]:
    """One ``pairs`` entry: the outcome plus the names (and full URI) of its written files."""
    return {
        "pair_id": outcome.pair_id,
        "line": outcome.line,
        "status": outcome.status,
        "source_uri": outcome.source_uri,
        "reference_uri": outcome.reference_uri,
        "output_file": outcome.png_name,
        "sidecar_file": outcome.sidecar_name,
        "output_uri": _join(output_uri, outcome.png_name) if outcome.png_name else None,
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
    outcomes: list[PairOutcome],
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
        "pairs": [_pair_entry(o, output_uri) for o in _ordered(outcomes)],
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


# --------------------------------------------------------------------------------------------
# Thumbnails
# --------------------------------------------------------------------------------------------


@dataclass
class _Thumb:
    """What the pages and sheets need to know about one distinct image URI.

    ``name`` is the thumbnail file (``None``: show a placeholder saying ``word``). ``exists``
    says whether ``read`` returned bytes at all, i.e. whether a link to the file would resolve.
    ``data`` is the encoded thumbnail, kept only until the last page that shows it is done.
    """

    name: str | None
    word: str
    exists: bool
    width: int = 0
    height: int = 0
    data: bytes | None = None


@lru_cache(maxsize=1)
def _thumb_format() -> tuple[str, str, str]:
    """(Pillow format, file extension, content type): WebP when this Pillow can write it."""
    if features.check("webp"):
        return "WEBP", ".webp", "image/webp"
    return "JPEG", ".jpg", "image/jpeg"


def _fit(width: int, height: int, box: int, *, upscale: bool = False) -> tuple[int, int]:
    """Size that fits ``box`` keeping the aspect ratio, never below 1 px on a side (a 5000 x 1
    image would otherwise round to 0 px and Pillow refuses to write an empty image)."""
    longest = max(width, height, 1)
    if longest <= box and not upscale:
        return max(1, width), max(1, height)
    scale = box / longest
    return (min(box, max(1, round(width * scale))), min(box, max(1, round(height * scale))))


def _normalise_mode(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB / RGBA / L / LA, mapping 16/32-bit and float samples to
    8 bits by their range (a plain ``convert`` clips 16-bit grey to almost white)."""
    mode = img.mode
    if mode in ("RGB", "RGBA", "L", "LA"):
        return img
    if mode.startswith("I;16") or mode in ("I", "F"):
        wide = img.convert("F")
        low, high = wide.getextrema()
        if mode.startswith("I;16") or (mode == "I" and low >= 0 and 255 < high <= 65535):
            low, high = 0.0, 65535.0
        elif mode == "F" and low >= 0 and high <= 1:
            low, high = 0.0, 1.0
        elif 0 <= low and high <= 255:
            low, high = 0.0, 255.0
        scale = 255.0 / (high - low) if high > low else 0.0
        return wide.point(lambda v: (v - low) * scale).convert("L")
    if mode in ("PA", "RGBa", "La") or "transparency" in img.info:
        return img.convert("RGBA")
    return img.convert("RGB")


def _flatten(img: Image.Image) -> Image.Image:
    """RGB with any alpha composited on the letterbox colour (JPEG/sheets have no alpha)."""
    if img.mode in ("RGBA", "LA"):
        rgba = img.convert("RGBA")
        flat = Image.new("RGB", rgba.size, _LETTERBOX)
        flat.paste(rgba, mask=rgba.getchannel("A"))
        return flat
    return img.convert("RGB")


def _decode_small(data: bytes, box: int) -> Image.Image | None:
    """Decode image bytes to an RGB image of at most ``box`` px on the long side, or None.

    Any error (truncated file, decompression-bomb guard, unknown format or mode) returns None:
    one broken image must not cost the report of a whole run.
    """
    try:
        with Image.open(io.BytesIO(data)) as opened:
            opened.draft("RGB", (box, box))  # cheap JPEG downscale while decoding
            try:
                img = ImageOps.exif_transpose(opened)
            except Exception:  # a broken EXIF block only loses the rotation
                img = opened.copy()
            img = _normalise_mode(img)
            size = _fit(img.width, img.height, box)
            if size != img.size:
                img = img.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
            return _flatten(img)
    except Exception:
        return None


def _encode_thumb(img: Image.Image) -> bytes:
    """Encode a thumbnail in :func:`_thumb_format` (small lossy files: a few KB each)."""
    fmt, _, _ = _thumb_format()
    buf = io.BytesIO()
    if fmt == "WEBP":
        img.save(buf, format="WEBP", quality=80, method=4)
    else:
        img.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


# What `_safe_read` returns when `read` raised: the page says "read error", so a broken
# callback is not mistaken for missing files.
_READ_ERROR = object()


def _make_thumb(data: bytes | object | None, box: int) -> _Thumb:
    """The thumbnail of one image's bytes (``None``: the image is missing)."""
    if data is None:
        return _Thumb(name=None, word="missing", exists=False)
    if not isinstance(data, bytes):
        return _Thumb(name=None, word="read error", exists=False)
    img = _decode_small(data, box)
    if img is None:
        return _Thumb(name=None, word="unreadable", exists=True)
    _, ext, _ = _thumb_format()
    digest = hashlib.sha256(data).hexdigest()[:16]
    return _Thumb(name=f"{THUMBS_DIR}/{digest}{ext}", word="", exists=True,
                  width=img.width, height=img.height, data=_encode_thumb(img))


def _safe_read(read: Callable[[str], bytes | None], uri: str) -> bytes | object | None:
    """``read(uri)``, or :data:`_READ_ERROR` if it raised: the report is the last step of a
    long run and must not be lost to one storage hiccup (the page says "read error")."""
    try:
        data = read(uri)
    except Exception:
        return _READ_ERROR
    return bytes(data) if data is not None else None


# --------------------------------------------------------------------------------------------
# Contact sheets
# --------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """PIL's built-in font: works on a bare container with no font files installed."""
    return ImageFont.load_default()


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


def _clip(text: Any, limit: int = _MAX_LABEL_CHARS) -> str:
    """One readable line of at most ``limit`` characters; also drops control characters."""
    clean = "".join(ch if ch.isprintable() else " " for ch in str("" if text is None else text))
    return clean if len(clean) <= limit else clean[: limit - 3] + "..."


def _png_bytes(img: Image.Image) -> bytes:
    """Encode a contact sheet as PNG with zlib's run-length strategy.

    Measured on 100-row sheets of photo-like thumbnails, ``Z_RLE`` is ~3x faster than
    Pillow's default (``Z_FILTERED``) and slightly smaller; only flat synthetic images
    compress better with the default. ``optimize`` would cost seconds per sheet.
    """
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=6, compress_type=zlib.Z_RLE)
    return buf.getvalue()


def _message_png(message: str) -> bytes:
    """A small PNG carrying one line of text (the contact sheet of an empty run)."""
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    w, h = _text_size(probe, message)
    img = Image.new("RGB", (max(160, w + 4 * _PAD), max(48, h + 4 * _PAD)), _BACKGROUND)
    draw = ImageDraw.Draw(img)
    _draw_text(draw, ((img.width - w) / 2, (img.height - h) / 2), message, fill=_TEXT)
    return _png_bytes(img)


def _tile(thumb: _Thumb, word: str, size: int) -> Image.Image:
    """A size x size tile: the thumbnail contained and centred (letterboxed), or a grey card."""
    img = None
    if thumb.data is not None:
        fmt, _, _ = _thumb_format()
        try:  # naming the format skips probing every Pillow plugin: thousands of tiles a run
            with Image.open(io.BytesIO(thumb.data), formats=[fmt]) as opened:
                img = opened.convert("RGB")
        except Exception:
            img = None
    if img is None:
        tile = Image.new("RGB", (size, size), _PLACEHOLDER)
        draw = ImageDraw.Draw(tile)
        w, h = _text_size(draw, word)
        _draw_text(draw, ((size - w) / 2, (size - h) / 2), word, fill=(255, 255, 255))
        return tile
    tile = Image.new("RGB", (size, size), _LETTERBOX)
    small = img.resize(_fit(img.width, img.height, size, upscale=True),
                       Image.Resampling.BICUBIC)
    tile.paste(small, ((size - small.width) // 2, (size - small.height) // 2))
    return tile


def _placeholder_word(outcome: PairOutcome, column: str, thumb: _Thumb) -> str:
    """Label for an image we cannot show: why it is absent matters to the reader."""
    if column == "output" and outcome.png_name is None:
        return "failed" if outcome.status == "failed" else "no output"
    return thumb.word or "missing"


def _contact_sheet(rows: list[tuple[PairOutcome, list[_Thumb]]], *, title: str,
                   tile: int = _SHEET_TILE) -> bytes:
    """Render one PNG grid, a row per pair (source | reference | output), for visual QA.

    Rows are labelled with the pair id, manifest line and status so a bad result can be traced
    to its CSV row; the header names the run and the sheet, so a sheet still makes sense when
    it is looked at alone. The caller bounds ``rows`` to :data:`MAX_SHEET_ROWS`.
    """
    if tile < 16:
        raise ValueError(f"tile must be >= 16 pixels, got {tile}")
    if not rows:
        return _message_png("no pairs")

    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = max(_text_size(probe, "Ag|")[1], 8) + 4
    labels = [(_clip(o.pair_id), _clip(f"line {o.line} - {o.status}")) for o, _ in rows]
    label_w = max([_text_size(probe, t)[0] for pair in labels for t in pair] + [80])
    label_w = min(label_w, 240) + 2 * _PAD

    header_h = 2 * line_h + 2 * _PAD
    row_h = tile + 2 * _PAD
    width = max(label_w + len(_COLUMNS) * (tile + _PAD) + _PAD,
                _text_size(probe, _clip(title, 80))[0] + 2 * _PAD)
    height = header_h + len(rows) * row_h

    sheet = Image.new("RGB", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(sheet)

    def col_x(i: int) -> int:
        return label_w + i * (tile + _PAD)

    tiles: dict[tuple[int, str], Image.Image] = {}  # lives for this sheet only
    _draw_text(draw, (_PAD, _PAD), _clip(title, 80), fill=_MUTED)
    _draw_text(draw, (_PAD, _PAD + line_h), "pair", fill=_MUTED)
    for i, name in enumerate(_COLUMNS):
        w, _ = _text_size(draw, name)
        _draw_text(draw, (col_x(i) + (tile - w) / 2, _PAD + line_h), name, fill=_TEXT)
    draw.line([(0, header_h - 1), (width, header_h - 1)], fill=_PLACEHOLDER)

    for r, ((outcome, thumbs), (name, sub)) in enumerate(zip(rows, labels)):
        y = header_h + r * row_h
        if r % 2:
            draw.rectangle([(0, y), (width, y + row_h - 1)], fill=(248, 248, 248))
        text_y = y + (row_h - 2 * line_h) // 2
        _draw_text(draw, (_PAD, text_y), name, fill=_TEXT)
        _draw_text(draw, (_PAD, text_y + line_h), sub,
                   fill=_STATUS_COLOURS.get(outcome.status, _MUTED))
        for i, (column, thumb) in enumerate(zip(_COLUMNS, thumbs)):
            word = _placeholder_word(outcome, column, thumb)
            key = (id(thumb), word)  # an input repeats on many rows: render its tile once
            if key not in tiles:
                tiles[key] = _tile(thumb, word, tile)
            sheet.paste(tiles[key], (col_x(i), y + _PAD))

    return _png_bytes(sheet)


# --------------------------------------------------------------------------------------------
# HTML pages
# --------------------------------------------------------------------------------------------

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
    return _e(_clip(value, limit))


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


def _page_name(number: int) -> str:
    """File name of HTML page ``number`` (1-based); page 1 is the index."""
    return "report.html" if number == 1 else f"report-{number}.html"


def _sheet_name(number: int) -> str:
    """File name of contact sheet ``number`` (1-based)."""
    return "contact_sheet.png" if number == 1 else f"contact_sheet-{number}.png"


def _format_timings(timings: Any) -> str:
    """Render ``timings`` (name -> seconds) as short lines; tolerant of odd values."""
    if not isinstance(timings, dict) or not timings:
        return ""
    parts = []
    for name, value in list(timings.items())[:_MAX_TIMINGS]:
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            shown = f"{value:.2f} s"
        else:
            shown = _clip(value, 40)
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
        parts.append(f'<a href="{_page_name(current - 1)}" rel="prev">&larr; previous</a>')
    shown = sorted({1, 2, total - 1, total, *range(current - 3, current + 4)} & set(
        range(1, total + 1)))
    last = 0
    for number in shown:
        if number > last + 1:
            parts.append("<span>&hellip;</span>")
        if number == current:
            parts.append(f'<span class="cur">{number}</span>')
        else:
            parts.append(f'<a href="{_page_name(number)}">{number}</a>')
        last = number
    if current < total:
        parts.append(f'<a href="{_page_name(current + 1)}" rel="next">next &rarr;</a>')
    return f'<nav aria-label="pages">{" ".join(parts)}</nav>'


def _pair_row(o: PairOutcome, thumbs: list[_Thumb], thumb: int) -> str:
    """One ``<tr>`` of the pairs table: ids, three thumbnails, file links, reason, timings."""
    status_cls = o.status if o.status in _STATUS_COLOURS else "other"
    cells = [
        f'<td class="id">{_et(o.pair_id, _CLIP_ID)}</td>',
        f"<td>{_e(o.line)}</td>",
        f'<td class="status-{status_cls}">{_et(o.status, 40)}</td>',
    ]
    uris = (o.source_uri, o.reference_uri, o.png_name)
    for column, uri, t in zip(_COLUMNS, uris, thumbs):
        if t.name is not None:
            w, h = _fit(t.width, t.height, thumb, upscale=True)
            inner = (f'<img src="{_e(t.name)}" width="{w}" height="{h}" alt="{column}" '
                     'loading="lazy" decoding="async">')
        else:
            inner = f'<span class="ph">{_e(_placeholder_word(o, column, t))}</span>'
        uri_html = f'<div class="uri">{_et(uri, _CLIP_URI)}</div>' if uri else ""
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
        files += f'<div class="reason">{_et(o.reason, _CLIP_REASON)}</div>'
    cells.append(f"<td>{files}</td>")
    cells.append(f'<td class="timings">{_format_timings(o.timings)}</td>')
    return "<tr>" + "".join(cells) + "</tr>"


def _pairs_table(rows: list[tuple[PairOutcome, list[_Thumb]]], thumb: int) -> list[str]:
    """The pairs table of one page."""
    out = ['<table class="pairs"><thead><tr>']
    for title in ("pair", "line", "status", *_COLUMNS, "files", "timings"):
        out.append(f"<th>{title}</th>")
    out.append("</tr></thead><tbody>")
    out.extend(_pair_row(o, thumbs, thumb) for o, thumbs in rows)
    out.append("</tbody></table>")
    return out


def _index_sections(summary: dict, pages: list[list[PairOutcome]]) -> list[str]:
    """What only the index shows: run metadata, counts, bounded failures and the page list."""
    out = ['<div class="meta">']
    for label, key in (
        ("manifest", "manifest_uri"),
        ("output", "output_uri"),
        ("flow run", "flow_run_id"),
        ("started", "started_at"),
        ("finished", "finished_at"),
        ("duration (s)", "duration_s"),
    ):
        if summary.get(key) is not None:
            out.append(f"{label}: <code>{_et(summary[key], _CLIP_META)}</code><br>")
    out.append('full summary: <a href="run.json">run.json</a></div>')

    out.append("<h2>Counts</h2>")
    out.append('<table class="counts"><tbody>')
    for key, value in (summary.get("counts") or {}).items():
        out.append(f'<tr><th>{_et(key, 80)}</th><td class="n">{_et(value, 40)}</td></tr>')
    out.append("</tbody></table>")

    failures = summary.get("failures") or []
    out.append(f"<h2>Failures ({len(failures)})</h2>")
    if not failures:
        out.append('<p class="note">No failures.</p>')
    else:
        out.append('<ul class="failures">')
        for f in failures[:MAX_FAILURES_SHOWN]:
            stage = f" ({_et(f.get('stage'), 40)})" if f.get("stage") else ""
            out.append(
                f"<li>line {_et(f.get('line'), 40)}{stage} "
                f"<code>{_et(f.get('pair_id'), _CLIP_ID)}</code>: "
                f'<span class="reason">{_et(f.get("reason"), _CLIP_REASON)}</span></li>'
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
            out.append(f'<li><a href="{_page_name(number)}">{span}</a></li>')
            start = end + 1
        out.append("</ol>")
        if len(pages) > _MAX_PAGE_LINKS:
            out.append(f'<p class="note">pages after {_MAX_PAGE_LINKS} are reached with the '
                       "next links.</p>")
    return out


def _page_html(summary: dict, *, number: int, pages: list[list[PairOutcome]], first: int,
               total_pairs: int, rows: list[tuple[PairOutcome, list[_Thumb]]],
               sheets: list[str], thumb: int) -> str:
    """One HTML page: the index (``number == 1``) or a further page of pairs."""
    run_id = summary.get("run_id", "")
    total = len(pages)
    title = f"VCT run {_et(run_id, _CLIP_ID)}"
    if number > 1:
        title += f" &ndash; page {number} of {total}"
    out = _head(title)
    out.append(f"<h1>{title} {_status_badge(summary.get('status'))}</h1>")
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


# --------------------------------------------------------------------------------------------
# The report files
# --------------------------------------------------------------------------------------------


def _page_sheets(rows: list[tuple[PairOutcome, list[_Thumb]]], sheets: list[str], *,
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
        yield name, _contact_sheet(chunk, title=title), "image/png"


def report_files(
    summary: dict,
    outcomes: list[PairOutcome],
    read: Callable[[str], bytes | None],
    *,
    page_size: int = 100,
    thumb: int = 192,
) -> Iterator[tuple[str, bytes, str]]:
    """Yield ``(name, bytes, content type)`` for every thumbnail, HTML page and contact sheet.

    Names are relative to the run folder (see the module docstring for the layout). Pages are
    built one at a time, in order: first the thumbnails the page needs that were not yielded
    yet, then its contact sheet(s), then the page itself, so written in the order yielded, a
    page's images exist when it lands. Each distinct image URI is read once through ``read``
    (bytes, or None when missing), thumbnailed, and only its small encoded thumbnail is kept,
    until the last page that shows it. A pair's output is read at
    ``summary["output_uri"] + "/" + png_name``. Bad arguments raise ``ValueError`` here, at
    the call, not at the first ``next()``.
    """
    if not 1 <= page_size <= MAX_PAGE_SIZE:
        raise ValueError(f"page_size must be in 1..{MAX_PAGE_SIZE}, got {page_size}")
    if not 16 <= thumb <= 1024:
        raise ValueError(f"thumb must be in 16..1024 pixels, got {thumb}")
    return _report_files(summary, outcomes, read, page_size=page_size, thumb=thumb)


def _report_files(summary: dict, outcomes: list[PairOutcome],
                  read: Callable[[str], bytes | None], *, page_size: int,
                  thumb: int) -> Iterator[tuple[str, bytes, str]]:
    """The generator behind :func:`report_files` (arguments already checked)."""
    output_uri = str(summary.get("output_uri") or "")
    ordered = _ordered(outcomes)
    pages = [ordered[i:i + page_size] for i in range(0, len(ordered), page_size)] or [[]]

    def uris_of(o: PairOutcome) -> tuple[str, str, str]:
        out = _join(output_uri, o.png_name) if o.png_name else ""
        return (o.source_uri, o.reference_uri, out)

    # The last page each URI appears on: its thumbnail is dropped once that page is done.
    last_page: dict[str, int] = {}
    for number, page in enumerate(pages):
        for o in page:
            for uri in uris_of(o):
                last_page[uri] = number

    sheets_per_page = [max(1, math.ceil(len(p) / MAX_SHEET_ROWS)) for p in pages]
    _, _, thumb_type = _thumb_format()
    live: dict[str, _Thumb] = {}
    written: set[str] = set()
    no_image = _Thumb(name=None, word="", exists=False)
    run_id = _clip(summary.get("run_id", ""), 40)
    first = 1
    sheet_number = 1

    for number, page in enumerate(pages):
        rows: list[tuple[PairOutcome, list[_Thumb]]] = []
        for o in page:
            thumbs = []
            for uri in uris_of(o):
                if not uri:
                    thumbs.append(no_image)
                    continue
                if uri not in live:
                    live[uri] = _make_thumb(_safe_read(read, uri), thumb)
                    t = live[uri]
                    if t.name is not None and t.data is not None and t.name not in written:
                        written.add(t.name)
                        yield t.name, t.data, thumb_type
                thumbs.append(live[uri])
            rows.append((o, thumbs))

        sheets = [_sheet_name(sheet_number + k) for k in range(sheets_per_page[number])]
        yield from _page_sheets(rows, sheets, first=first, total=len(ordered), run_id=run_id)
        yield _page_name(number + 1), _page_html(
            summary, number=number + 1, pages=pages, first=first, total_pairs=len(ordered),
            rows=rows, sheets=sheets, thumb=thumb,
        ).encode("utf-8"), "text/html; charset=utf-8"
        sheet_number += len(sheets)
        first += len(page)

        for o in page:
            for uri in uris_of(o):
                if uri and last_page.get(uri) == number:
                    live.pop(uri, None)


# --------------------------------------------------------------------------------------------
# Prefect artifact payloads
# --------------------------------------------------------------------------------------------

_MD_SPECIAL = str.maketrans({ch: "\\" + ch for ch in "\\`*_[]|<>#!"})


def _md(value: Any, limit: int = _CLIP_REASON) -> str:
    """Make user text inert in markdown: one clipped line, markdown specials and HTML escaped."""
    text = " ".join(("" if value is None else str(value)).split())
    return html.escape(_clip(text, limit), quote=False).translate(_MD_SPECIAL)


def markdown_summary(summary: dict) -> str:
    """Markdown for a Prefect artifact: status, the counts table and the failures list.

    Bounded for any run: at most :data:`MAX_FAILURES_SHOWN` failures, each reason clipped;
    the full list is in ``run.json``.
    """
    counts = summary.get("counts") or {}
    failures = summary.get("failures") or []
    lines = [f"# VCT run {_md(summary.get('run_id', ''), _CLIP_ID)}", ""]
    lines += [f"Status: **{_md(summary.get('status'), 40)}**", ""]
    if summary.get("output_uri"):
        lines += [f"Output: {_md(summary['output_uri'], _CLIP_META)}", ""]
    lines += ["| count | value |", "|---|---:|"]
    lines += [f"| {_md(k, 80)} | {_md(v, 40)} |" for k, v in counts.items()]
    lines += ["", f"## Failures ({len(failures)})", ""]
    if not failures:
        lines.append("No failures.")
    for f in failures[:MAX_FAILURES_SHOWN]:
        lines.append(f"- line {_md(f.get('line'), 40)} {_md(f.get('pair_id'), _CLIP_ID)}: "
                     f"{_md(f.get('reason'))}")
    if len(failures) > MAX_FAILURES_SHOWN:
        lines.append(f"- … and {len(failures) - MAX_FAILURES_SHOWN} more (see run.json)")
    return "\n".join(lines) + "\n"


def table_rows(outcomes: list[PairOutcome], limit: int = 200) -> list[dict]:
    """Rows for a Prefect table artifact, at most ``limit``, in manifest order.

    When there are more pairs than ``limit``, failed pairs are kept first (they are what the
    table is looked at for), then the others in manifest order; ``run.json`` has every pair.
    Missing values are empty strings rather than None so every row has the same column types.
    """
    ordered = _ordered(outcomes)
    if len(ordered) > limit:
        failed = [o for o in ordered if o.status == "failed"]
        others = [o for o in ordered if o.status != "failed"]
        ordered = _ordered((failed + others)[:max(0, limit)])
    return [
        {
            "pair_id": o.pair_id,
            "line": o.line,
            "status": o.status,
            "output_file": o.png_name or "",
            "reason": _clip(o.reason or "", _CLIP_REASON),
        }
        for o in ordered
    ]
