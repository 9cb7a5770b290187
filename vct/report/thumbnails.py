"""Thumbnails: one image's bytes to a small encoded file named by its hash (:func:`make_thumb`),
or to a placeholder word when the image is missing, unreadable or its read raised.

The sheets and the report files look :func:`thumb_format` up on this module, so every file of
a run agrees on one format (and a test can stand in for a Pillow without WebP in one place).
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

from PIL import Image, ImageOps, features

from vct.report.names import THUMBS_DIR

LETTERBOX = (232, 232, 232)  # neutral, so letterbox bars do not read as part of the image


@dataclass
class Thumb:
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
def thumb_format() -> tuple[str, str, str]:
    """(Pillow format, file extension, content type): WebP when this Pillow can write it."""
    if features.check("webp"):
        return "WEBP", ".webp", "image/webp"
    return "JPEG", ".jpg", "image/jpeg"


def fit(width: int, height: int, box: int, *, upscale: bool = False) -> tuple[int, int]:
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
        flat = Image.new("RGB", rgba.size, LETTERBOX)
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
            size = fit(img.width, img.height, box)
            if size != img.size:
                img = img.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
            return _flatten(img)
    except Exception:
        return None


def _encode_thumb(img: Image.Image) -> bytes:
    """Encode a thumbnail in :func:`thumb_format` (small lossy files: a few KB each)."""
    fmt, _, _ = thumb_format()
    buf = io.BytesIO()
    if fmt == "WEBP":
        img.save(buf, format="WEBP", quality=80, method=4)
    else:
        img.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


# What `safe_read` returns when `read` raised: the page says "read error", so a broken
# callback is not mistaken for missing files.
_READ_ERROR = object()


def make_thumb(data: bytes | object | None, box: int) -> Thumb:
    """The thumbnail of one image's bytes (``None``: the image is missing)."""
    if data is None:
        return Thumb(name=None, word="missing", exists=False)
    if not isinstance(data, bytes):
        return Thumb(name=None, word="read error", exists=False)
    img = _decode_small(data, box)
    if img is None:
        return Thumb(name=None, word="unreadable", exists=True)
    _, ext, _ = thumb_format()
    digest = hashlib.sha256(data).hexdigest()[:16]
    return Thumb(name=f"{THUMBS_DIR}/{digest}{ext}", word="", exists=True,
                 width=img.width, height=img.height, data=_encode_thumb(img))


def safe_read(read: Callable[[str], bytes | None], uri: str) -> bytes | object | None:
    """``read(uri)``, or :data:`_READ_ERROR` if it raised: the report is the last step of a
    long run and must not be lost to one storage hiccup (the page says "read error")."""
    try:
        data = read(uri)
    except Exception:
        return _READ_ERROR
    return bytes(data) if data is not None else None
