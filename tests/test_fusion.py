"""Stage 4: the two-branch sampler and the attention controller (spec §6, invariants §10.4-7)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from vct.concept import learn_concept
from vct.config import ConceptConfig, ContentConfig, FusionConfig
from vct.content import invert_content
from vct.ddim import guided, make_scheduler
from vct.fusion import FusionMismatch, fuse
from vct.text import encode_concept

T = 12
CONTENT = ContentConfig(num_inference_steps=T, num_inner_steps=4)


@pytest.fixture(scope="module")
def content(models, images):
    return invert_content(models, Image.open(images["src_a"]).convert("RGB"), CONTENT)


@pytest.fixture(scope="module")
def concept(models, images):
    return learn_concept(models, Image.open(images["ref"]).convert("RGB"),
                         ConceptConfig(max_train_steps=3, batch_microsteps=True))


def test_branch_star_reproduces_the_stage2_reconstruction(models, content, concept):
    result = fuse(models, content, [concept], FusionConfig(), keep_trajectory=True)
    torch.testing.assert_close(result.star_trajectory, content.reconstruction, atol=1e-3,
                               rtol=1e-3)
    assert result.images.shape == (1, 64, 64, 3) and result.images.dtype.name == "uint8"


def test_empty_edit_prompt_gives_b_equal_to_b_star(models, content):
    result = fuse(models, content, [None], FusionConfig())
    torch.testing.assert_close(result.latents[1], result.latents[0], atol=1e-3, rtol=1e-3)


def test_no_injection_equals_plain_guidance_alone(models, content, concept):
    cfg = FusionConfig(cross_attention_injection_ratio=0.0, self_attention_injection_ratio=0.0,
                       reweight_value=1.0)
    result = fuse(models, content, [concept], cfg, record_controller=True)
    assert result.controller_log == []
    sched = make_scheduler(models.scheduler_config, T, 0)
    pos = encode_concept(models, concept.vectors)
    z = content.x_T
    with torch.no_grad():
        for s, t in enumerate(sched.timesteps):
            c = content.embeddings[s:s + 1]
            eps = models.eps(torch.cat([z, z]), int(t), torch.cat([c, pos]), stage="test")
            z = sched.step(guided(*eps.chunk(2), 7.5), t, z).prev_sample
    torch.testing.assert_close(result.latents[1:], z, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("limit", [16, 15])
def test_controller_acts_exactly_in_its_windows_and_layers(models, content, concept, limit):
    """Every attention layer of the tiny UNet has 4x4 = 16 queries: a limit of 16 admits all
    self layers, 15 none (on SD 1.5 the default 1024 admits 11 of 16)."""
    result = fuse(models, content, [concept], FusionConfig(self_replace_max_tokens=limit),
                  record_controller=True)
    cross_steps, self_steps = int(0.2 * (T + 1)), int(0.9 * T)
    assert (result.stats.cross_steps, result.stats.self_steps) == (cross_steps, self_steps)
    names = list(models.unet.attn_processors)
    cross_layers = [n for n in names if n.endswith("attn2.processor")]
    self_layers = [n for n in names if n.endswith("attn1.processor")] if limit >= 16 else []
    expected = {(s, n, "cross") for s in range(cross_steps) for n in cross_layers}
    expected |= {(s, n, "self") for s in range(self_steps) for n in self_layers}
    assert set(result.controller_log) == expected
    assert len(result.controller_log) == len(expected)  # once per layer and step


def test_controller_leaves_b_star_and_unconditional_passes_untouched(models, content, concept):
    controlled = fuse(models, content, [concept], FusionConfig())
    plain = fuse(models, content, [concept], FusionConfig(), control=False)
    assert torch.equal(controlled.latents[0], plain.latents[0])  # B* bit-identical
    assert not torch.allclose(controlled.latents[1], plain.latents[1])  # B is edited


def test_consistent_rounding_option_changes_the_cross_window(models):
    assert FusionConfig().cross_steps(50) == 10 and FusionConfig().self_steps(50) == 45
    assert FusionConfig(window_rounding="consistent").cross_steps(50) == 10
    assert FusionConfig().cross_steps(12) == 2
    assert FusionConfig(window_rounding="consistent").cross_steps(14) == 2
    assert FusionConfig().cross_steps(14) == 3


@pytest.mark.parametrize("positions", ["original", "concept_tokens"])
def test_sdpa_fast_path_equals_explicit_probabilities(models, content, concept, positions):
    cfg = FusionConfig(reweight_positions=positions)
    fast = fuse(models, content, [concept, None], cfg)
    slow = fuse(models, content, [concept, None],
                cfg.model_copy(update={"attention_impl": "explicit"}))
    torch.testing.assert_close(fast.latents, slow.latents, atol=1e-3, rtol=1e-3)


def test_shared_b_star_serves_several_concepts(models, content, concept):
    both = fuse(models, content, [concept, None], FusionConfig())
    alone = fuse(models, content, [concept], FusionConfig())
    torch.testing.assert_close(both.latents[1], alone.latents[1], atol=1e-3, rtol=1e-3)


def test_content_made_with_other_settings_is_refused(models, content, concept):
    for other in (CONTENT.model_copy(update={"guidance_scale": 5.0}),
                  CONTENT.model_copy(update={"num_inference_steps": T + 1})):
        with pytest.raises(FusionMismatch, match="recompute the content"):
            fuse(models, content, [concept], FusionConfig(), expected_content=other)
