"""The quality benchmark's scores (vct/mini/metrics.py) on hand-made images with known answers."""

from dataclasses import replace

import numpy as np
import pytest

from vct.mini import data as D
from vct.mini import metrics as M


def _flat(value, size: int = 32) -> np.ndarray:
    return np.full((size, size, 3), value, np.uint8)


def _render(**changes) -> np.ndarray:
    base = D.Params("square", "red", "striped", "white", cx=32, cy=32, size=16)
    return np.asarray(D.render(replace(base, **changes)))


def test_psnr_known_values() -> None:
    a = _flat(100)
    assert M.psnr(a, a) == 100.0
    assert M.psnr(a, _flat(110)) == pytest.approx(20 * np.log10(255 / 10))


def test_ssim_identity_and_constant_images() -> None:
    img = _render()
    assert M.ssim(img, img) == pytest.approx(1.0)
    # two constant images: only the luminance term is left, (2ab + c1) / (a^2 + b^2 + c1)
    c1 = (0.01 * 255) ** 2
    assert M.ssim(_flat(80), _flat(160)) == pytest.approx((2 * 80 * 160 + c1)
                                                          / (80**2 + 160**2 + c1))
    noisy = np.clip(img + np.random.default_rng(0).normal(0, 25, img.shape), 0, 255)
    assert M.ssim(noisy.astype(np.uint8), img) < 0.9


def test_rgb_to_lab_reference_colours() -> None:
    lab = M.rgb_to_lab(np.array([[[255, 255, 255], [0, 0, 0], [255, 0, 0]]], np.uint8))[0]
    np.testing.assert_allclose(lab[0], [100, 0, 0], atol=0.05)
    np.testing.assert_allclose(lab[1], [0, 0, 0], atol=0.05)
    np.testing.assert_allclose(lab[2], [53.24, 80.09, 67.20], atol=0.05)


def test_edge_correlation_prefers_the_same_structure() -> None:
    src = _render()
    assert M.edge_correlation(src, src) == pytest.approx(1.0)
    recoloured = _render(color="blue", fill="solid", background="black")
    moved = _render(cx=20, cy=22)
    assert M.edge_correlation(recoloured, src) > M.edge_correlation(moved, src)
    assert M.edge_correlation(_flat(120, 64), src) == 0.0


def test_mask_iou_known_masks() -> None:
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    a[:2] = True
    b[:, :2] = True
    assert M.iou(a, b) == pytest.approx(4 / 12)
    p = D.Params("circle", "yellow", "dotted", "gradient", cx=30, cy=30, size=15)
    img = np.asarray(D.render(p))
    assert M.mask_iou(img, D.shape_mask(p)) > 0.95  # every fill and background segments
    assert M.mask_iou(img, D.shape_mask(replace(p, shape="star"))) < 0.6
    assert M.mask_iou(_flat(235, 64), D.shape_mask(p)) == 0.0


def test_color_distance_sees_colours_not_shapes() -> None:
    src = _render()
    assert M.color_distance(src, src) == pytest.approx(0.0, abs=1e-7)
    assert M.color_distance(_flat((255, 0, 0)), _flat((0, 0, 255))) == pytest.approx(1.0)
    same_look = _render(cx=24, cy=40, size=15)
    recoloured = _render(color="green")
    assert M.color_distance(same_look, src) < M.color_distance(recoloured, src)


def test_texture_distance_sees_fills_not_colours() -> None:
    src = _render()
    assert M.texture_distance(src, src) == pytest.approx(0.0)
    stripes_blue = _render(color="blue")
    checks = _render(fill="checkered")
    assert M.texture_distance(stripes_blue, src) < M.texture_distance(checks, src)
    assert M.texture_distance(_flat(10), src) == 1.0


def test_ideal_translation_scores_best() -> None:
    """The scores agree with the task: the ideal output beats the unchanged source on the
    ground truth and on the concept, and beats the reference on structure."""
    source = D.Params("house", "red", "striped", "white", cx=30, cy=34, size=18)
    reference = D.Params("circle", "blue", "checkered", "black", cx=36, cy=28, size=14)
    src, ref = np.asarray(D.render(source)), np.asarray(D.render(reference))
    ideal = np.asarray(D.ideal_translation(source, reference))
    mask = D.shape_mask(source)
    assert M.psnr(ideal, ideal) > M.psnr(src, ideal)
    assert M.ssim(ideal, ideal) > M.ssim(src, ideal)
    assert M.mask_iou(ideal, mask) > M.mask_iou(ref, mask)
    assert M.color_distance(ideal, ref) < M.color_distance(src, ref)
    assert M.texture_distance(ideal, ref) < M.texture_distance(src, ref)
