"""Image-quality scores for restyling on the procedural set: pure numpy, no learned network.

Each score compares uint8 RGB images (H x W x 3) of one size. Why these: the ideal translation
of a pair is known exactly (`data.ideal_translation`), so PSNR and SSIM against it measure the
whole job; the rest split it into "structure kept" (edges, the shape's mask) and "concept
transferred" (colours, texture). docs/quality.md defines each one in words.
"""

from __future__ import annotations

import numpy as np

EDGE_SIGMA = 1.0
"""Gaussian blur (px) before the edge maps: sub-pixel VAE noise is not structure."""
CHROMA_THRESHOLD = 20.0
"""Lab chroma above which a pixel counts as the shape: every background is neutral grey, every
shape colour (and its dark shade) has chroma well above this."""
HIST_BINS = 8
"""Bins per Lab axis of the colour histogram (8^3 cells)."""
TEXTURE_MIN_RADIUS = 4
"""Spatial frequencies below this (cycles per image) are the shape's outline, not its texture."""


def _float(img: np.ndarray) -> np.ndarray:
    arr = np.asarray(img)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an H x W x 3 image, got shape {arr.shape}")
    return arr.astype(np.float64)


def psnr(output: np.ndarray, target: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB over 0..255 RGB; capped at 100 dB for equal images."""
    mse = float(np.mean((_float(output) - _float(target)) ** 2))
    return 100.0 if mse <= 1e-10 else 10.0 * np.log10(255.0**2 / mse)


def gaussian_kernel(sigma: float, radius: int | None = None) -> np.ndarray:
    """A normalised 1-D Gaussian of radius ceil(3 sigma) (or `radius`)."""
    r = int(np.ceil(3 * sigma)) if radius is None else radius
    x = np.arange(-r, r + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def _filter(img: np.ndarray, kernel: np.ndarray, mode: str = "valid") -> np.ndarray:
    """Separable 2-D filtering of H x W (x C) with a 1-D kernel along both axes."""
    r = len(kernel) // 2
    if mode == "reflect":
        pad = [(r, r), (r, r)] + [(0, 0)] * (img.ndim - 2)
        img = np.pad(img, pad, mode="reflect")
    out = np.zeros((img.shape[0] - 2 * r, *img.shape[1:]), np.float64)
    for i, w in enumerate(kernel):
        out += w * img[i:i + out.shape[0]]
    res = np.zeros((out.shape[0], out.shape[1] - 2 * r, *out.shape[2:]), np.float64)
    for i, w in enumerate(kernel):
        res += w * out[:, i:i + res.shape[1]]
    return res


def luminance(img: np.ndarray) -> np.ndarray:
    """ITU-R BT.601 luma of an RGB image, 0..255."""
    arr = _float(img)
    return arr @ np.array([0.299, 0.587, 0.114])


def ssim(output: np.ndarray, target: np.ndarray) -> float:
    """Mean SSIM (Wang et al. 2004) of the luma: 11-tap Gaussian window, sigma 1.5,
    K1 0.01, K2 0.03, L 255, over the window positions inside the image."""
    x, y = luminance(output), luminance(target)
    k = gaussian_kernel(1.5, 5)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mx, my = _filter(x, k), _filter(y, k)
    sxx = _filter(x * x, k) - mx * mx
    syy = _filter(y * y, k) - my * my
    sxy = _filter(x * y, k) - mx * my
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return float(s.mean())


def rgb_to_lab(img: np.ndarray) -> np.ndarray:
    """sRGB (0..255) to CIE L*a*b* (D65), H x W x 3: L in 0..100, a and b about -128..127."""
    rgb = _float(img) / 255.0
    lin = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    m = np.array([[0.4124564, 0.3575761, 0.1804375],
                  [0.2126729, 0.7151522, 0.0721750],
                  [0.0193339, 0.1191920, 0.9503041]])
    xyz = lin @ m.T / np.array([0.95047, 1.0, 1.08883])
    eps, kappa = 216 / 24389, 24389 / 27
    f = np.where(xyz > eps, np.cbrt(xyz), (kappa * xyz + 16) / 116)
    L = 116 * f[..., 1] - 16
    a = 500 * (f[..., 0] - f[..., 1])
    b = 200 * (f[..., 1] - f[..., 2])
    return np.stack([L, a, b], axis=-1)


def _sobel_magnitude(channels: np.ndarray) -> np.ndarray:
    """Gradient magnitude summed over channels (H x W x C in, H-2 x W-2 out)."""
    p = channels
    gx = (p[:-2, 2:] + 2 * p[1:-1, 2:] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[1:-1, :-2] + p[2:, :-2])
    gy = (p[2:, :-2] + 2 * p[2:, 1:-1] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[:-2, 1:-1] + p[:-2, 2:])
    return np.sqrt((gx**2 + gy**2).sum(axis=-1))


def edge_map(img: np.ndarray) -> np.ndarray:
    """Sobel gradient magnitude of the Lab image after a Gaussian blur of EDGE_SIGMA px: colour
    edges count, not only luma ones (a yellow shape on white has almost no luma edge)."""
    lab = _filter(rgb_to_lab(img), gaussian_kernel(EDGE_SIGMA), mode="reflect")
    return _sobel_magnitude(lab)


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two arrays; 0 when either is constant."""
    a, b = a.ravel() - a.mean(), b.ravel() - b.mean()
    denom = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denom) if denom > 0 else 0.0


def edge_correlation(output: np.ndarray, source: np.ndarray) -> float:
    """Pearson correlation of the two edge maps: 1 when the output has the source's edges."""
    return pearson(edge_map(output), edge_map(source))


def chroma(img: np.ndarray) -> np.ndarray:
    """Lab chroma sqrt(a^2 + b^2) per pixel."""
    lab = rgb_to_lab(img)
    return np.hypot(lab[..., 1], lab[..., 2])


def shape_mask_of(img: np.ndarray) -> np.ndarray:
    """The shape's pixels of a procedural image: chroma above CHROMA_THRESHOLD (bool H x W)."""
    return chroma(img) > CHROMA_THRESHOLD


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks; 1 when both are empty."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def mask_iou(output: np.ndarray, true_mask: np.ndarray) -> float:
    """IoU of the output's chroma mask with the source's true shape mask (coverage > 0.5)."""
    return iou(shape_mask_of(output), np.asarray(true_mask) > 0.5)


def lab_histogram(img: np.ndarray, bins: int = HIST_BINS) -> np.ndarray:
    """Joint Lab histogram, L in [0, 100], a and b in [-128, 128] (values outside are clipped
    into the edge bins), normalised to sum 1."""
    lo, hi = np.array([0.0, -128.0, -128.0]), np.array([100.0, 128.0, 128.0])
    lab = np.clip(rgb_to_lab(img).reshape(-1, 3), lo, hi)
    hist, _ = np.histogramdd(lab, bins=bins, range=list(zip(lo, hi)))
    return hist / hist.sum()


def hellinger(p: np.ndarray, q: np.ndarray) -> float:
    """Hellinger distance of two distributions: 0 equal, 1 disjoint."""
    bc = float(np.sqrt(np.asarray(p) * np.asarray(q)).sum())
    return float(np.sqrt(max(0.0, 1.0 - bc)))


def color_distance(output: np.ndarray, reference: np.ndarray) -> float:
    """Hellinger distance of the Lab histograms (0 = the same colours in the same amounts)."""
    return hellinger(lab_histogram(output), lab_histogram(reference))


def texture_spectrum(img: np.ndarray, min_radius: int = TEXTURE_MIN_RADIUS) -> np.ndarray:
    """The luma's power spectrum at radii >= min_radius cycles per image, normalised to sum 1:
    where the image's fine periodic energy (stripes, dots, checks, lines) sits."""
    y = luminance(img)
    power = np.abs(np.fft.fft2(y - y.mean())) ** 2
    fy = np.fft.fftfreq(y.shape[0]) * y.shape[0]
    fx = np.fft.fftfreq(y.shape[1]) * y.shape[1]
    radius = np.hypot(fy[:, None], fx[None, :])
    power = np.where(radius >= min_radius, power, 0.0)
    total = power.sum()
    return power / total if total > 0 else power


def texture_distance(output: np.ndarray, reference: np.ndarray) -> float:
    """Half the L1 distance of the two normalised spectra: 0 the same texture, 1 disjoint.
    A flat image (no energy above min_radius) against a textured one scores 1."""
    p, q = texture_spectrum(output), texture_spectrum(reference)
    if p.sum() == 0 and q.sum() == 0:
        return 0.0
    if p.sum() == 0 or q.sum() == 0:
        return 1.0
    return float(0.5 * np.abs(p - q).sum())
