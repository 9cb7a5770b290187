"""The attribute classifier of the quality benchmark (vct/mini/classifier.py)."""

import json
from dataclasses import replace

import numpy as np
import torch
from safetensors import safe_open

from vct.mini import classifier as C
from vct.mini import data as D


def test_shipped_weights_read_every_attribute() -> None:
    net = C.load()
    acc = C.heldout_accuracy(net, n=160)
    assert acc["all"] >= 0.97, acc
    with safe_open(str(C.WEIGHTS), "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["config"]) == json.loads(json.dumps(C.ClassifierConfig().__dict__))


def test_predictions_follow_the_attributes() -> None:
    """Changing one factor of an image changes that head's answer and no other."""
    net = C.load()
    p = D.Params("triangle", "orange", "dotted", "lined", cx=31, cy=33, size=20)
    variants = [p, replace(p, shape="star"), replace(p, color="purple"),
                replace(p, fill="checkered"), replace(p, background="black")]
    images = np.stack([np.asarray(D.render(v)) for v in variants])
    pred = C.predict(net, images)
    assert C.accuracy(pred, variants)["all"] == 1.0


def test_classifier_survives_decoder_like_noise() -> None:
    net = C.load()
    params = [D.params_for(i, C.CLASSIFIER_SEED) for i in D.heldout_indices(64)]
    images = np.stack([np.asarray(D.render(p)) for p in params]).astype(np.float32)
    noisy = np.clip(images + np.random.default_rng(0).normal(0, 8, images.shape), 0, 255)
    assert C.accuracy(C.predict(net, noisy.astype(np.uint8)), params)["all"] >= 0.9


def test_training_learns_from_scratch(tmp_path) -> None:
    """A short seeded run gets well above chance on every head, and save/load keeps it."""
    torch.set_num_threads(1)
    cfg = replace(C.ClassifierConfig(), images=512, steps=120)
    net = C.train(cfg)
    acc = C.heldout_accuracy(net, n=128)
    chance = {k: 1 / len(v) for k, v in C.HEADS.items()}
    assert all(acc[k] > 2 * chance[k] for k in C.HEADS), acc
    C.save(net, tmp_path / "w.safetensors", cfg)
    again = C.load(tmp_path / "w.safetensors")
    x = C.to_input(D.images_array(range(4)))
    with torch.no_grad():
        assert all(torch.equal(net(x)[k], again(x)[k]) for k in C.HEADS)
