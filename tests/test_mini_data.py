"""The procedural captioned image set of the mini model (vct/mini/data.py)."""

import hashlib
from itertools import product

import numpy as np
import pytest

from vct.mini import data as D


def _digest(indices) -> str:
    return hashlib.sha256(D.images_array(indices).tobytes()).hexdigest()


def test_generator_is_deterministic_and_index_local() -> None:
    assert _digest(range(16)) == _digest(range(16))
    # image i does not depend on which other images are drawn with it
    assert np.array_equal(D.images_array([7])[0], D.images_array(range(16))[7])
    assert D.params_for(3, seed=1) != D.params_for(3, seed=0)
    assert len({D.params_for(i) for i in range(50)}) == 50


def test_captions_match_params() -> None:
    for i in range(200):
        p = D.params_for(i)
        text = D.caption(p)
        assert D.parse_caption(text) == {"shape": p.shape, "color": p.color, "fill": p.fill,
                                         "background": p.background}
        assert set(text.split()) <= set(D.CAPTION_WORDS)


def test_render_paints_what_the_params_say() -> None:
    p = D.Params("square", "blue", "solid", "white", cx=32, cy=32, size=14)
    img = np.asarray(D.render(p)).astype(int)
    assert tuple(img[32, 32]) == D.COLORS["blue"]
    assert tuple(img[2, 2]) == (235, 235, 235)
    striped = np.asarray(D.render(D.Params("square", "blue", "striped", "black", 32, 32, 14)))
    row = striped[32, 20:44].astype(int)
    assert len({tuple(c) for c in row}) == 2  # colour and its dark shade alternate
    assert tuple(striped[1, 1]) == (25, 25, 25)
    for shape, fill, bg in product(D.SHAPES, D.FILLS, D.BACKGROUNDS):
        arr = D.render_array(D.Params(shape, "red", fill, bg, 30, 34, 18))
        assert arr.shape == (D.SIZE, D.SIZE, 3) and 0 <= arr.min() and arr.max() <= 255


def test_ideal_translation_keeps_the_source_geometry_and_takes_the_reference_look() -> None:
    src = D.Params("star", "red", "dotted", "lined", cx=25, cy=40, size=16)
    ref = D.Params("circle", "green", "checkered", "gradient", cx=40, cy=22, size=12)
    out = D.translated_params(src, ref)
    assert (out.shape, out.cx, out.cy, out.size) == (src.shape, src.cx, src.cy, src.size)
    assert (out.color, out.fill, out.background) == (ref.color, ref.fill, ref.background)
    ideal = np.asarray(D.ideal_translation(src, ref))
    assert np.array_equal(ideal, np.asarray(D.render(out)))
    assert np.array_equal(D.shape_mask(out), D.shape_mask(src))


def test_heldout_images_are_new_but_every_combination_is_trained() -> None:
    train, held = D.train_indices(4000), D.heldout_indices(200)
    assert not set(train) & set(held)
    combos = {(p.shape, p.color, p.fill, p.background) for p in map(D.params_for, train)}
    assert len(combos) == len(D.SHAPES) * len(D.COLORS) * len(D.FILLS) * len(D.BACKGROUNDS)
    with pytest.raises(ValueError):
        D.parse_caption("a red circle")
