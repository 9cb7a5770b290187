"""Contact sheets: PNG grids of a page's pairs (source | reference | output) for visual QA,
drawn from the thumbnails in PIL's built-in font."""

from __future__ import annotations

import io
import zlib
from functools import lru_cache

from PIL import Image, ImageDraw, ImageFont

from vct.report import thumbnails
from vct.report.bounds import clip
from vct.report.run_record import PairResult

MAX_SHEET_ROWS = 100
"""Pairs per contact-sheet PNG: bounds each sheet to ~100 x 108 px tall, a few megapixels."""

_SHEET_TILE = 96  # contact-sheet tile edge; the HTML shows the full thumbnail
_BACKGROUND = (255, 255, 255)
_PLACEHOLDER = (160, 160, 160)
_TEXT = (20, 20, 20)
_MUTED = (90, 90, 90)
STATUS_COLOURS = {"ok": (30, 120, 40), "skipped": (40, 80, 150), "failed": (170, 30, 30)}
COLUMNS = ("source", "reference", "output")
_PAD = 6


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


def _tile(thumb: thumbnails.Thumb, word: str, size: int) -> Image.Image:
    """A size x size tile: the thumbnail contained and centred (letterboxed), or a grey card."""
    img = None
    if thumb.data is not None:
        fmt, _, _ = thumbnails.thumb_format()
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
    tile = Image.new("RGB", (size, size), thumbnails.LETTERBOX)
    small = img.resize(thumbnails.fit(img.width, img.height, size, upscale=True),
                       Image.Resampling.BICUBIC)
    tile.paste(small, ((size - small.width) // 2, (size - small.height) // 2))
    return tile


def placeholder_word(outcome: PairResult, column: str, thumb: thumbnails.Thumb) -> str:
    """Label for an image we cannot show: why it is absent matters to the reader."""
    if column == "output" and outcome.png_name is None:
        return "failed" if outcome.status == "failed" else "no output"
    return thumb.word or "missing"


def contact_sheet(rows: list[tuple[PairResult, list[thumbnails.Thumb]]], *, title: str,
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
    labels = [(clip(o.pair_id), clip(f"line {o.line} - {o.status}")) for o, _ in rows]
    label_w = max([_text_size(probe, t)[0] for pair in labels for t in pair] + [80])
    label_w = min(label_w, 240) + 2 * _PAD

    header_h = 2 * line_h + 2 * _PAD
    row_h = tile + 2 * _PAD
    width = max(label_w + len(COLUMNS) * (tile + _PAD) + _PAD,
                _text_size(probe, clip(title, 80))[0] + 2 * _PAD)
    height = header_h + len(rows) * row_h

    sheet = Image.new("RGB", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(sheet)

    def col_x(i: int) -> int:
        return label_w + i * (tile + _PAD)

    tiles: dict[tuple[int, str], Image.Image] = {}  # lives for this sheet only
    _draw_text(draw, (_PAD, _PAD), clip(title, 80), fill=_MUTED)
    _draw_text(draw, (_PAD, _PAD + line_h), "pair", fill=_MUTED)
    for i, name in enumerate(COLUMNS):
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
                   fill=STATUS_COLOURS.get(outcome.status, _MUTED))
        for i, (column, thumb) in enumerate(zip(COLUMNS, thumbs)):
            word = placeholder_word(outcome, column, thumb)
            key = (id(thumb), word)  # an input repeats on many rows: render its tile once
            if key not in tiles:
                tiles[key] = _tile(thumb, word, tile)
            sheet.paste(tiles[key], (col_x(i), y + _PAD))

    return _png_bytes(sheet)
