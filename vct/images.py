"""Image decoding and the two preprocessings of the original (spec §2).

The source is center-cropped then resized (`ptp_inversion.load_512`); the reference is squashed to
a square (`main.py InversionDataset`, no crop by default). Both drop alpha without compositing, as
the original does.

Two deliberate departures from the original's ``Image.open(...).convert("RGB")``, both because it
silently computed on the wrong pixels:

- EXIF orientation is applied by default (``decode_image(..., apply_exif=True)``): a phone photo
  stores its pixels sideways plus an orientation tag, so the original restyled it sideways while
  every viewer (and our report's thumbnail) shows it upright. ``apply_exif=False`` reproduces the
  original exactly.
- High bit depths are scaled to 8 bits instead of clipped: Pillow's conversion of 16-bit
  grayscale (modes ``I;16*``, ``I``) clips every value above 255 (almost all white) and of 32-bit
  float (``F``) truncates 0..1 to 0 (black). 16-bit values are mapped ``round(v / 257)``
  (0..65535 onto 0..255 exactly; ``I`` is clipped to 0..65535 first). Float images are taken as
  0..1 when their largest finite value is <= 1 (``round(v * 255)``), else as 0..255 (rounded);
  both are clipped to 0..255, NaN becomes 0 and +inf 255. (Only grayscale has such modes in
  Pillow; a 48-bit RGB PNG already arrives as 8-bit RGB, taken from each sample's high byte.)

Every decode is bounded: the pixel count is checked from the header before any pixel is
decoded, and :func:`probe_image` validates a file from its header alone. The cap is
:func:`max_pixels`: ``VCT_MAX_PIXELS`` (read at each call, like ``VCT_MAX_INPUT_BYTES``, so the
planner, every job and every accelerate rank or worker apply the same one), else
:data:`MAX_PIXELS` (64 MP). Pillow's own decompression-bomb check follows it: its warning is an
error below the cap and ignored above, and its hard limit (twice ``Image.MAX_IMAGE_PIXELS``,
about 179 MP) bounds the variable.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from vct.errors import UserError

MAX_PIXELS = 64_000_000  # refuse decompression bombs with a clear error, not an OOM
ENV_MAX_PIXELS = "VCT_MAX_PIXELS"

_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
_EXIF_ORIENTATION = 0x0112
# EXIF orientation -> the transposition that makes the pixels upright (ImageOps.exif_transpose's
# table; applied here from one reading of the tag so probe_image and decode_image agree).
_UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
            4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
            6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_90}
_SWAPS_AXES = frozenset({5, 6, 7, 8})  # orientations that rotate by 90 degrees
# What Pillow raises on broken or hostile files while parsing or decoding.
_DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError,
                  Image.DecompressionBombWarning, Image.DecompressionBombError)


class ImageError(UserError, ValueError):
    """The bytes are not a usable image; the message names the file."""


class ImageTooLarge(ImageError):
    """The header claims more pixels than the cap (a decompression bomb, or just too big)."""


def _pillow_hard_limit() -> int | None:
    """Pillow refuses images above twice ``Image.MAX_IMAGE_PIXELS`` whatever we say."""
    limit = Image.MAX_IMAGE_PIXELS
    return None if limit is None else 2 * int(limit)


def max_pixels() -> int:
    """The pixel cap: ``VCT_MAX_PIXELS`` if set (an integer from 1 to Pillow's hard limit,
    else a ValueError naming the variable), else :data:`MAX_PIXELS`."""
    raw = os.environ.get(ENV_MAX_PIXELS, "").strip()
    if not raw:
        return MAX_PIXELS
    hard = _pillow_hard_limit()
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{ENV_MAX_PIXELS} must be an integer, got {raw!r}") from None
    if value < 1 or (hard is not None and value > hard):
        bound = f" and at most {hard} (Pillow's own limit)" if hard is not None else ""
        raise ValueError(f"{ENV_MAX_PIXELS} must be at least 1{bound}, got {value}")
    return value


@contextmanager
def _opened(data: bytes, name: str, cap: int | None = None) -> Iterator[Image.Image]:
    """The lazily opened image (header parsed, no pixels decoded), size-checked against the
    pixel cap (``cap``, default :func:`max_pixels`); Pillow's own bomb warning counts as an
    error below the cap, not a log line."""
    cap = max_pixels() if cap is None else int(cap)
    if not data:
        raise ImageError(f"{name}: empty file, not an image")
    with warnings.catch_warnings():
        pillow = Image.MAX_IMAGE_PIXELS
        warnings.simplefilter("ignore" if pillow is not None and cap > pillow else "error",
                              Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
        except (Image.DecompressionBombWarning, Image.DecompressionBombError):
            raise ImageTooLarge(f"{name}: larger than the {cap} pixel cap") from None
        except _DECODE_ERRORS as exc:
            raise ImageError(f"{name}: not a readable image ({type(exc).__name__})") from None
        with img:
            if img.width * img.height > cap:
                raise ImageTooLarge(f"{name}: {img.width}x{img.height} is larger than the "
                                    f"{cap} pixel cap")
            if img.width < 1 or img.height < 1:
                raise ImageError(f"{name}: image has no pixels")
            yield img


def _orientation(img: Image.Image, *, header_only: bool = False) -> int:
    """The EXIF orientation tag (1 = as stored). A missing, out-of-range or unreadable tag
    counts as 1: broken metadata must not make good pixels unusable.

    ``header_only``: never decode pixels to find it. Pillow's PNG ``getexif()`` loads the whole
    image to look for an eXIf chunk after the pixel data; so the probe only sees an eXIf chunk
    that precedes it (where PNG 3 requires it), and decode_image asks after loading.
    """
    if header_only and img.format == "PNG" and "exif" not in img.info:
        return 1
    try:
        value = img.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - Pillow's EXIF parser raises many types on junk
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def probe_image(data: bytes, name: str, *, apply_exif: bool = True,
                max_pixels: int | None = None) -> tuple[str, int, int, str]:
    """``(format, width, height, mode)`` from the header alone, without decoding pixels.

    For plan time: it refuses what is not an image, has no pixels or exceeds the pixel cap in
    milliseconds and without memory, whatever the file's size. Width and height are those
    :func:`decode_image` will return (swapped for a 90-degree EXIF orientation unless
    ``apply_exif`` is false). A file whose pixel data is broken passes the probe; only decoding
    can find that. ``max_pixels`` overrides the cap (default: :func:`max_pixels`).
    """
    with _opened(data, name, max_pixels) as img:
        width, height = img.size
        if apply_exif and _orientation(img, header_only=True) in _SWAPS_AXES:
            width, height = height, width
        return str(img.format or "unknown"), width, height, img.mode


def decode_image(data: bytes, name: str, *, apply_exif: bool = True) -> Image.Image:
    """Open image bytes as 8-bit RGB, or raise ImageError naming ``name``.

    ``apply_exif`` (default True) turns the pixels upright as the EXIF orientation tag says, so
    what is restyled is what the user sees (and what the report's thumbnail shows); False keeps
    the stored pixel order, as the original implementation did. High bit depths are scaled, not
    clipped (see the module docstring); alpha is dropped without compositing.
    """
    with _opened(data, name) as img:
        try:
            orientation = _orientation(img) if apply_exif else 1  # may load (see there)
            rgb = _to_rgb8(img)
        except _DECODE_ERRORS as exc:
            raise ImageError(f"{name}: not a readable image ({type(exc).__name__})") from None
    return rgb.transpose(_UPRIGHT[orientation]) if orientation in _UPRIGHT else rgb


def _to_rgb8(img: Image.Image) -> Image.Image:
    """8-bit RGB from any mode Pillow opens (high bit depths scaled, see module docstring)."""
    if img.mode in _SIXTEEN_BIT_MODES:
        wide = np.clip(np.asarray(img), 0, 65535).astype(np.uint32)
        img = Image.fromarray(((wide + 128) // 257).astype(np.uint8))
    elif img.mode == "F":
        values = np.asarray(img, dtype=np.float32)
        finite = values[np.isfinite(values)]
        scale = 255.0 if finite.size == 0 or float(finite.max()) <= 1.0 else 1.0
        scaled = np.nan_to_num(values * scale, nan=0.0, posinf=255.0, neginf=0.0)
        img = Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8))
    # convert("RGB") drops alpha without compositing (as the original's [:, :, :3]) and also
    # accepts grayscale, palette and CMYK images, on which the original crashed.
    return img.convert("RGB")


def center_square(img: Image.Image) -> Image.Image:
    """Crop the centered square on the shorter side (the offsets of `load_512`)."""
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return img.crop((left, top, left + side, top + side))


def to_unit_range(img: Image.Image) -> torch.Tensor:
    """uint8 HWC -> float 1x3xHxW in [-1, 1] (x/127.5 - 1)."""
    arr = np.asarray(img, dtype=np.float32)
    return torch.from_numpy(arr / 127.5 - 1.0).permute(2, 0, 1).unsqueeze(0).contiguous()


def source_pixels(img: Image.Image, size: int) -> torch.Tensor:
    """Source preprocessing: center crop, bicubic resize to size x size, [-1, 1]."""
    return to_unit_range(center_square(img).resize((size, size), Image.Resampling.BICUBIC))


def reference_pixels(img: Image.Image, size: int, center_crop: bool = False) -> torch.Tensor:
    """Reference preprocessing: optional center crop, bicubic squash to size x size, [-1, 1]."""
    if center_crop:
        img = center_square(img)
    return to_unit_range(img.resize((size, size), Image.Resampling.BICUBIC))


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """Decoder output in [-1, 1] (NCHW) -> uint8 NHWC, truncating as the original does."""
    x = (pixels.float() / 2 + 0.5).clamp(0, 1)
    return (x.permute(0, 2, 3, 1).cpu().numpy() * 255).astype(np.uint8)


def png_bytes(array: np.ndarray) -> bytes:
    """Encode one HxWx3 uint8 array as PNG (deterministic bytes for identical pixels)."""
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()
