"""vct.images: bit depths scaled to 8 bits, EXIF orientation, header-only probe, pixel cap.

Every expected 8-bit value is computed here from the synthetic input and the documented rule,
not read back from the code under test.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageOps

from vct import images

SIXTEEN_BIT = [0, 1, 128, 129, 256, 257, 1000, 32767, 32768, 65279, 65534, 65535]


def _encode(img: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **params)
    return buf.getvalue()


def _gray(decoded: Image.Image) -> list[int]:
    """The single row of a decoded grayscale strip; its three channels must agree."""
    arr = np.asarray(decoded)
    assert decoded.mode == "RGB" and arr.shape[0] == 1
    assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()
    return arr[0, :, 0].tolist()


@pytest.mark.parametrize("mode, fmt", [("I;16", "PNG"), ("I;16B", "TIFF"), ("I", "TIFF")])
def test_sixteen_bit_grayscale_is_scaled_not_clipped(mode: str, fmt: str) -> None:
    values = SIXTEEN_BIT + ([-5, 70000] if mode == "I" else [])  # "I" is 32-bit signed
    row = np.array([values])
    if mode == "I;16B":
        img = Image.frombytes(mode, (len(values), 1), row.astype(">u2").tobytes())
    else:
        img = Image.fromarray(row.astype(np.int32 if mode == "I" else np.uint16))
    data = _encode(img, fmt)
    assert Image.open(io.BytesIO(data)).mode == mode  # the premise: Pillow reads it as `mode`
    expected = [round(min(max(v, 0), 65535) / 257) for v in values]
    assert _gray(images.decode_image(data, "deep.png")) == expected


@pytest.mark.filterwarnings("error::RuntimeWarning")  # no NaN/inf cast left to chance
def test_float_images_in_unit_range_are_scaled_by_255() -> None:
    values = [0.0, 0.1, 0.25, 0.5, 0.75, 0.999, 1.0]
    data = _encode(Image.fromarray(np.array([values], dtype=np.float32)), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "F"
    expected = [round(float(np.float32(v)) * 255) for v in values]
    assert _gray(images.decode_image(data, "float.tif")) == expected
    assert expected[3] == 128  # mid-gray, where Pillow's own conversion gives 0 (black)


@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_float_images_above_one_are_taken_as_0_to_255_and_clipped() -> None:
    values = [-3.0, 0.0, 0.4, 12.4, 12.6, 200.0, 300.0, float("nan"), float("inf")]
    data = _encode(Image.fromarray(np.array([values], dtype=np.float32)), "TIFF")
    expected = [0, 0, 0, 12, 13, 200, 255, 0, 255]
    assert _gray(images.decode_image(data, "float.tif")) == expected


@pytest.mark.parametrize("mode, color, rgb", [
    ("L", 100, (100, 100, 100)),
    ("LA", (100, 0), (100, 100, 100)),
    ("RGBA", (10, 20, 30, 0), (10, 20, 30)),  # alpha dropped, not composited (the original)
    ("P", 0, (0, 0, 0)),
    ("1", 1, (255, 255, 255)),
])
def test_other_modes_become_rgb(mode: str, color: object, rgb: tuple[int, int, int]) -> None:
    data = _encode(Image.new(mode, (3, 2), color), "PNG")
    decoded = images.decode_image(data, "x.png")
    assert decoded.mode == "RGB" and decoded.size == (3, 2)
    assert decoded.getpixel((1, 1)) == rgb


def test_cmyk_becomes_rgb() -> None:
    data = _encode(Image.new("CMYK", (3, 2), (0, 255, 255, 0)), "TIFF")  # pure red in CMYK
    assert images.decode_image(data, "x.tif").getpixel((0, 0)) == (255, 0, 0)


def _sideways_photo(orientation: int) -> bytes:
    """4x2 pixels as stored (left half red, right half blue) with an EXIF orientation tag."""
    img = Image.new("RGB", (4, 2), (255, 0, 0))
    img.paste((0, 0, 255), (2, 0, 4, 2))
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _encode(img, "PNG", exif=exif)


def test_exif_orientation_is_applied_by_default_and_can_be_ignored() -> None:
    data = _sideways_photo(6)  # "rotate 90 degrees clockwise to display"
    upright = images.decode_image(data, "phone.png")
    assert upright.size == (2, 4)
    assert upright.getpixel((0, 0)) == (255, 0, 0) and upright.getpixel((1, 3)) == (0, 0, 255)
    stored = images.decode_image(data, "phone.png", apply_exif=False)  # the original's pixels
    assert stored.size == (4, 2)
    assert stored.getpixel((0, 0)) == (255, 0, 0) and stored.getpixel((3, 1)) == (0, 0, 255)
    assert images.probe_image(data, "phone.png") == ("PNG", 2, 4, "RGB")
    assert images.probe_image(data, "phone.png", apply_exif=False) == ("PNG", 4, 2, "RGB")
    flipped = images.decode_image(_sideways_photo(2), "mirror.png")  # mirrored horizontally
    assert flipped.size == (4, 2) and flipped.getpixel((0, 0)) == (0, 0, 255)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_orientation_matches_pillows_exif_transpose(orientation: int) -> None:
    rng = np.random.default_rng(orientation)
    img = Image.fromarray(rng.integers(0, 255, (3, 5, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _encode(img, "PNG", exif=exif)
    reference = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    decoded = images.decode_image(data, "x.png")
    assert np.array_equal(np.asarray(decoded), np.asarray(reference))
    assert images.probe_image(data, "x.png")[1:3] == decoded.size


def _move_exif_after_pixels(png: bytes) -> bytes:
    """The same PNG with its eXIf chunk moved after the IDAT chunks (older writers do this)."""
    chunks, pos = [], 8
    while pos < len(png):
        length = int.from_bytes(png[pos:pos + 4], "big")
        chunks.append(png[pos:pos + 12 + length])
        pos += 12 + length
    exif = [c for c in chunks if c[4:8] == b"eXIf"]
    rest = [c for c in chunks if c[4:8] != b"eXIf"]
    assert len(exif) == 1 and rest[-1][4:8] == b"IEND"
    return png[:8] + b"".join(rest[:-1] + exif + rest[-1:])


def test_exif_after_the_pixel_data_is_applied_by_decode_only() -> None:
    data = _move_exif_after_pixels(_sideways_photo(6))
    assert images.decode_image(data, "late-exif.png").size == (2, 4)
    assert images.probe_image(data, "late-exif.png")[1:3] == (4, 2)  # header only: not seen


def test_unreadable_exif_keeps_the_stored_orientation(monkeypatch: pytest.MonkeyPatch) -> None:
    data = _sideways_photo(6)

    def broken(self: Image.Image) -> Image.Exif:
        raise SyntaxError("not a TIFF header")

    monkeypatch.setattr(Image.Image, "getexif", broken)
    assert images.decode_image(data, "junk-exif.png").size == (4, 2)
    assert images.probe_image(data, "junk-exif.png")[1:3] == (4, 2)


def test_probe_never_decodes_pixels(monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import ImageFile

    loads: list[str] = []
    real_load = ImageFile.ImageFile.load

    def counting_load(self: ImageFile.ImageFile) -> object:
        loads.append(str(self.format))
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", counting_load)
    rgb = Image.new("RGB", (6, 4), (1, 2, 3))
    exif = Image.Exif()
    exif[0x0112] = 8
    files = {("PNG", 6, 4): _encode(rgb, "PNG"), ("PNG", 4, 6): _encode(rgb, "PNG", exif=exif),
             ("JPEG", 4, 6): _encode(rgb, "JPEG", exif=exif), ("TIFF", 6, 4): _encode(rgb, "TIFF"),
             ("WEBP", 4, 6): _encode(rgb, "WEBP", exif=exif)}
    for (fmt, width, height), data in files.items():
        assert images.probe_image(data, "x") == (fmt, width, height, "RGB")
    assert loads == []
    assert images.decode_image(files[("JPEG", 4, 6)], "x").size == (4, 6)
    assert set(loads) == {"JPEG"}  # the counter sees real decodes


def test_probe_reads_the_header_without_decoding_pixels() -> None:
    rng = np.random.default_rng(0)
    full = _encode(Image.fromarray(rng.integers(0, 255, (64, 48, 3), dtype=np.uint8)), "PNG")
    truncated = full[:200]  # header and the start of the pixel data only
    assert images.probe_image(truncated, "cut.png") == ("PNG", 48, 64, "RGB")
    with pytest.raises(images.ImageError, match="cut.png: not a readable image"):
        images.decode_image(truncated, "cut.png")
    with pytest.raises(images.ImageError, match="bad.png: not a readable image"):
        images.probe_image(b"not an image at all", "bad.png")
    with pytest.raises(images.ImageError, match="empty.png: empty file"):
        images.probe_image(b"", "empty.png")


def test_pixel_cap_is_checked_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(images, "MAX_PIXELS", 100)
    ok = _encode(Image.new("RGB", (10, 10)), "PNG")
    big = _encode(Image.new("RGB", (11, 10)), "PNG")
    assert images.decode_image(ok, "ok.png").size == (10, 10)
    assert images.probe_image(ok, "ok.png")[1:3] == (10, 10)
    for check in (images.decode_image, images.probe_image):
        with pytest.raises(images.ImageError, match=r"big.png: 11x10 is larger than the 100 "):
            check(big, "big.png")
        # Cut pixel data cannot decode: refusing it for size proves no decoding happened.
        with pytest.raises(images.ImageError, match="pixel cap"):
            check(big[:60], "big.png")
