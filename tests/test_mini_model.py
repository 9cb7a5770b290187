"""The shipped mini model (vct/mini/weights/, docs/mini-model.md): `--model mini` loads, samples
follow their captions, and VCT on it really restyles (the concept reaches the output)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vct.cli import main
from vct.mini import data as D
from vct.mini.shipped import MAX_SHIPPED_BYTES, WEIGHTS_DIR, shipped_files

SMALL = ["--max-train-steps", "60", "--gradient-accumulation-steps", "1", "--learning-rate",
         "5e-3", "--num-inference-steps", "10", "--num-inner-steps", "3", "--initializer-word",
         "a", "--quiet"]
"""VCT at small settings: seconds on 2 CPU cores."""


def colour_histogram(img: Image.Image, bins: int = 12) -> np.ndarray:
    """The hue histogram of the image's coloured pixels, normalised: what 'the colours of an
    image' means here (the backgrounds are neutral, so their greys would only add noise)."""
    hsv = np.asarray(img.convert("RGB").convert("HSV")).reshape(-1, 3).astype(int)
    coloured = hsv[(hsv[:, 1] > 90) & (hsv[:, 2] > 50)]
    h = np.bincount(coloured[:, 0] * bins // 256, minlength=bins).astype(float)
    return h / max(h.sum(), 1.0)


def test_the_shipped_weights_are_small_and_complete() -> None:
    files = shipped_files()
    assert sum(f.stat().st_size for f in files) <= MAX_SHIPPED_BYTES
    names = {f.relative_to(WEIGHTS_DIR).as_posix() for f in files}
    assert {"model_index.json", "unet/diffusion_pytorch_model.safetensors",
            "vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
            "tokenizer/vocab.json", "scheduler/scheduler_config.json"} <= names


def test_mini_loads_with_its_own_geometry() -> None:
    from vct.batch.engine import named_model_folder
    from vct.models import load_models

    models = load_models(named_model_folder("mini"), "cpu")
    assert models.native_resolution == D.SIZE and models.vae_scale_factor == 4
    assert models.latent_scale != 0.18215  # set from the trained latents
    for text in ("a blue checkered house on a gradient background", ""):
        ids = models.tokenizer(text).input_ids
        assert len(ids) == 2 + len(text.split())


def _translate(tmp_path: Path, source: D.Params, reference: D.Params, name: str) -> Image.Image:
    src, ref = tmp_path / "source.png", tmp_path / f"{name}.png"
    D.render(source).save(src)
    D.render(reference).save(ref)
    out = tmp_path / f"out-{name}"
    code = main(["translate", "--model", "mini", "--reference", str(ref), "--source", str(src),
                 "--out", str(out), "--seed", "0", *SMALL])
    assert code == 0
    meta = json.loads((out / "source.json").read_text())
    assert meta["config"]["content"]["num_inference_steps"] == 10
    return Image.open(out / "source.png")


def test_restyling_is_real_each_output_takes_its_references_colour(tmp_path: Path) -> None:
    source = D.Params("square", "green", "solid", "white", cx=32, cy=32, size=18)
    refs = {"red": D.Params("circle", "red", "solid", "white", cx=30, cy=34, size=16),
            "blue": D.Params("circle", "blue", "solid", "white", cx=30, cy=34, size=16)}
    outs = {name: _translate(tmp_path, source, ref, name) for name, ref in refs.items()}
    assert outs["red"].size == (D.SIZE, D.SIZE)
    hist = {name: colour_histogram(D.render(ref)) for name, ref in refs.items()}
    for name, other in (("red", "blue"), ("blue", "red")):
        h = colour_histogram(outs[name])
        own, wrong = np.abs(h - hist[name]).sum(), np.abs(h - hist[other]).sum()
        assert own < wrong, f"{name} output is closer to the {other} reference"


@pytest.mark.parametrize("caption_index", [0])
def test_samples_from_captions_show_the_named_colour(caption_index: int) -> None:
    from vct.mini.sample import sample_captions

    captions = ["a red solid circle on a white background",
                "a blue solid circle on a white background"]
    images = sample_captions("mini", captions, steps=20, seed=caption_index)
    hist = [colour_histogram(D.render(D.Params("circle", c, "solid", "white", 32, 32, 16)))
            for c in ("red", "blue")]
    for i, img in enumerate(images):
        h = colour_histogram(img)
        assert np.abs(h - hist[i]).sum() < np.abs(h - hist[1 - i]).sum()
