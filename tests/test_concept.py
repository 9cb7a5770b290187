"""Stage 3: multi-vector concept inversion (spec §5, invariant §10.8)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from vct.concept import concept_loss, draw_microbatch, learn_concept, reference_posteriors
from vct.config import ConceptConfig
from vct.ddim import make_scheduler
from vct.text import word_rows

CFG = ConceptConfig(max_train_steps=40, batch_microsteps=True, seed=7)


@pytest.fixture(scope="module")
def reference(images) -> Image.Image:
    return Image.open(images["ref"]).convert("RGB")


@pytest.fixture(scope="module")
def learned(models, reference):
    return learn_concept(models, reference, CFG)


def _eval_loss(models, reference, rows) -> float:
    """The objective on a fixed set of 64 draws: an estimate free of training noise."""
    alphas = make_scheduler(models.scheduler_config, 1, 0).alphas_cumprod
    mean, std = reference_posteriors(models, reference, CFG)
    z0, t, noise = draw_microbatch(torch.Generator().manual_seed(123), mean, std, 64, CFG,
                                   1000, models.latent_scale)
    with torch.no_grad():
        return concept_loss(models, rows, z0, t, noise, alphas, CFG).item()


def test_training_lowers_the_objective(models, reference, learned):
    init = word_rows(models, CFG.initializer_word, CFG.num_vectors)
    assert _eval_loss(models, reference, learned.vectors) < _eval_loss(models, reference, init)
    assert len(learned.stats.losses) == CFG.max_train_steps


def test_only_the_new_rows_change(models, reference):
    table = models.text_encoder.get_input_embeddings().weight.detach().clone()
    params = {n: p.detach().clone() for n, p in models.text_encoder.named_parameters()}
    result = learn_concept(models, reference, ConceptConfig(max_train_steps=3))
    assert torch.equal(models.text_encoder.get_input_embeddings().weight, table)
    for name, p in models.text_encoder.named_parameters():
        assert torch.equal(p, params[name]), name
    init = word_rows(models, "girl", 3)
    assert result.vectors.shape == (3, 32)
    assert not torch.equal(result.vectors, init)
    # a one-token initializer word starts all n vectors identical
    assert torch.equal(init[0], init[1]) and torch.equal(init[1], init[2])


def test_same_seed_same_embedding_other_seed_differs(models, reference, learned):
    again = learn_concept(models, reference, CFG)
    assert torch.equal(again.vectors, learned.vectors)
    other = learn_concept(models, reference, ConceptConfig(max_train_steps=40,
                                                           batch_microsteps=True, seed=8))
    assert not torch.equal(other.vectors, learned.vectors)


def test_sequential_accumulation_is_the_default_and_runs(models, reference):
    result = learn_concept(models, reference, ConceptConfig(max_train_steps=2))
    assert result.stats.effective_lr == pytest.approx(2e-3)  # 5e-4 x 4 accumulation
