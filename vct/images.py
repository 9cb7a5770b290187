"""Image decoding and the two preprocessings of the original (spec §2).

The source is center-cropped then resized (`ptp_inversion.load_512`); the reference is squashed to
a square (`main.py InversionDataset`, no crop by default). Both drop alpha without compositing and
ignore EXIF orientation, as the original does.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from vct.errors import UserError

MAX_PIXELS = 64_000_000  # refuse decompression bombs with a clear error, not an OOM


class ImageError(UserError, ValueError):
    """The bytes are not a usable image; the message names the file."""


def decode_image(data: bytes, name: str) -> Image.Image:
    """Open image bytes as RGB, or raise ImageError naming `name`."""
    if not data:
        raise ImageError(f"{name}: empty file, not an image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if img.width * img.height > MAX_PIXELS:
                raise ImageError(f"{name}: {img.width}x{img.height} is larger than the "
                                 f"{MAX_PIXELS} pixel cap")
            img.load()
    except ImageError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError,
            Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise ImageError(f"{name}: not a readable image ({type(exc).__name__})") from None
    if img.width < 1 or img.height < 1:
        raise ImageError(f"{name}: image has no pixels")
    # convert("RGB") drops alpha without compositing (as the original's [:, :, :3]) and also
    # accepts grayscale and palette images, on which the original crashed.
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
