"""A procedural captioned image set: coloured shapes with fills on backgrounds, made in code.

Why procedural: no data can be downloaded here, and for any (source, reference) pair the ideal
VCT translation can be rendered exactly (the source's shape, position and size painted with the
reference's colour, fill and background), so a benchmark can score restyling against ground
truth with no pretrained network.

Everything is pure and deterministic: an image is a function of its `Params`, and the params of
image `index` are a function of `(seed, index)`. Textures have a period of 8 px so they survive
a factor-4 VAE. The held-out split is by image index (indices from `HELDOUT_START` on), never
by factor combination: every combination is in the training range.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64
"""Image side in pixels (the mini model's native resolution)."""
SUPERSAMPLE = 4
"""Shape masks are drawn this much larger, then averaged down: antialiased, deterministic edges."""
PERIOD = 8
"""Texture period in pixels (stripes, dots, checker): two latent cells at VAE factor 4."""

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "house")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "purple": (140, 50, 180),
}
FILLS: tuple[str, ...] = ("solid", "striped", "dotted", "checkered")
BACKGROUNDS: tuple[str, ...] = ("white", "black", "lined", "gradient")
SIZE_RANGE = (12, 22)
"""Half-extent of a shape in pixels, inclusive."""
MARGIN = 3
"""Minimum gap between a shape's bounding box and the image border."""
SHADE = 0.4
"""The dark colour of a fill's pattern is the fill colour times this."""

CAPTION_WORDS: tuple[str, ...] = ("a", "on", "background", *SHAPES, *COLORS, *FILLS,
                                  *BACKGROUNDS)
"""The closed vocabulary of every caption (each word is one token of the mini tokenizer)."""

HELDOUT_START = 1_000_000
"""Image indices from here on are held out (never in the training range 0..n-1)."""
DEFAULT_SEED = 0


@dataclass(frozen=True)
class Params:
    """What one image is: a shape (with its centre and half-extent in pixels) and its look."""

    shape: str
    color: str
    fill: str
    background: str
    cx: int
    cy: int
    size: int

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Params:
        return cls(**data)


def sample_params(rng: np.random.Generator) -> Params:
    """Draw every factor uniformly, then a size and a centre that keep the shape inside."""
    shape = SHAPES[rng.integers(len(SHAPES))]
    color = list(COLORS)[rng.integers(len(COLORS))]
    fill = FILLS[rng.integers(len(FILLS))]
    background = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    size = int(rng.integers(SIZE_RANGE[0], SIZE_RANGE[1] + 1))
    lo, hi = size + MARGIN, SIZE - 1 - size - MARGIN
    cx = int(rng.integers(lo, hi + 1))
    cy = int(rng.integers(lo, hi + 1))
    return Params(shape, color, fill, background, cx, cy, size)


def params_for(index: int, seed: int = DEFAULT_SEED) -> Params:
    """The params of image `index` of the set `seed` (independent of every other index)."""
    return sample_params(np.random.default_rng([seed, index]))


def train_indices(n: int) -> range:
    """The training images: indices 0..n-1."""
    return range(n)


def heldout_indices(n: int) -> range:
    """`n` held-out images: indices from HELDOUT_START, never used for training."""
    return range(HELDOUT_START, HELDOUT_START + n)


def caption(p: Params) -> str:
    """The caption of an image, built from its params over CAPTION_WORDS."""
    return f"a {p.color} {p.fill} {p.shape} on a {p.background} background"


def parse_caption(text: str) -> dict[str, str]:
    """The factors a caption names (shape, color, fill, background); the inverse of `caption`."""
    words = text.split()
    if len(words) != 8 or words[0] != "a" or words[4:6] != ["on", "a"] or words[7] != "background":
        raise ValueError(f"not a mini caption: {text!r}")
    return {"color": words[1], "fill": words[2], "shape": words[3], "background": words[6]}


def _shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Vertices of the polygonal shapes, in pixel units (centre, half-extent r)."""
    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.45
            ang = -np.pi / 2 + k * np.pi / 5
            pts.append((cx + rad * np.cos(ang), cy + rad * np.sin(ang)))
        return pts
    if shape == "house":  # a square body with a roof: a pentagon
        return [(cx, cy - r), (cx + r, cy - 0.15 * r), (cx + r, cy + r), (cx - r, cy + r),
                (cx - r, cy - 0.15 * r)]
    raise ValueError(f"unknown shape {shape!r}")


def shape_mask(p: Params) -> np.ndarray:
    """The shape's coverage in [0, 1], SIZE x SIZE (antialiased by supersampling)."""
    s = SUPERSAMPLE
    img = Image.new("L", (SIZE * s, SIZE * s), 0)
    draw = ImageDraw.Draw(img)
    cx, cy, r = (p.cx + 0.5) * s, (p.cy + 0.5) * s, p.size * s
    if p.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    else:
        draw.polygon(_shape_polygon(p.shape, cx, cy, r), fill=255)
    big = np.asarray(img, dtype=np.float32) / 255.0
    return big.reshape(SIZE, s, SIZE, s).mean(axis=(1, 3))


def _grid() -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.mgrid[0:SIZE, 0:SIZE]
    return ys, xs


def fill_pattern(fill: str) -> np.ndarray:
    """Where the fill shows its dark shade (1) or its colour (0), anchored to the image grid."""
    ys, xs = _grid()
    half = PERIOD // 2
    if fill == "solid":
        return np.zeros((SIZE, SIZE), np.float32)
    if fill == "striped":  # vertical stripes
        return ((xs % PERIOD) >= half).astype(np.float32)
    if fill == "dotted":  # a dark 4x4 dot in each 8x8 cell
        return (((xs + 2) % PERIOD < half) & ((ys + 2) % PERIOD < half)).astype(np.float32)
    if fill == "checkered":
        return (((xs // half) + (ys // half)) % 2).astype(np.float32)
    raise ValueError(f"unknown fill {fill!r}")


def background_image(background: str) -> np.ndarray:
    """The background, SIZE x SIZE x 3 in 0..255 (neutral, so every colour stands out)."""
    ys, xs = _grid()
    if background == "white":
        img = np.full((SIZE, SIZE), 235.0)
    elif background == "black":
        img = np.full((SIZE, SIZE), 25.0)
    elif background == "lined":  # horizontal grey lines, 8 px period
        img = np.where((ys % PERIOD) < PERIOD // 2, 200.0, 110.0)
    elif background == "gradient":  # dark at the top, light at the bottom
        img = 40.0 + (215.0 - 40.0) * ys / (SIZE - 1)
    else:
        raise ValueError(f"unknown background {background!r}")
    return np.repeat(img.astype(np.float32)[..., None], 3, axis=2)


def render_array(p: Params) -> np.ndarray:
    """The image as float32 SIZE x SIZE x 3 in 0..255 (before rounding)."""
    color = np.array(COLORS[p.color], np.float32)
    pattern = fill_pattern(p.fill)[..., None]
    fg = color * (1.0 - pattern) + color * SHADE * pattern
    alpha = shape_mask(p)[..., None]
    return background_image(p.background) * (1.0 - alpha) + fg * alpha


def render(p: Params) -> Image.Image:
    """The RGB image of `p`."""
    return Image.fromarray(np.clip(np.rint(render_array(p)), 0, 255).astype(np.uint8), "RGB")


def translated_params(source: Params, reference: Params) -> Params:
    """The ideal translation's params: the source's shape, position and size, the reference's
    colour, fill and background."""
    return replace(source, color=reference.color, fill=reference.fill,
                   background=reference.background)


def ideal_translation(source: Params, reference: Params) -> Image.Image:
    """The exact image VCT should make from `source` restyled after `reference`."""
    return render(translated_params(source, reference))


def images_array(indices, seed: int = DEFAULT_SEED) -> np.ndarray:
    """Images of `indices` as uint8 N x SIZE x SIZE x 3 (the training stages' input)."""
    return np.stack([np.asarray(render(params_for(i, seed))) for i in indices])


def captions_for(indices, seed: int = DEFAULT_SEED) -> list[str]:
    """Captions of `indices`, in order."""
    return [caption(params_for(i, seed)) for i in indices]
