"""Stage 1: DDIM inversion (spec §3, invariant §10.1)."""

from __future__ import annotations

import types

import torch
from PIL import Image

from vct.config import ContentConfig
from vct.ddim import alpha_at, ddim_map, make_scheduler, step_size
from vct.inversion import ddim_invert, encode_source
from vct.text import encode_prompt


class LatentFreeUNet(torch.nn.Module):
    """eps depends on (t, e) only. DDIM inversion is then exactly undone by DDIM sampling, so a
    round trip tests that both use the same grid and query the destination timestep."""

    def forward(self, z, t, encoder_hidden_states):
        t = torch.as_tensor(t, dtype=torch.float32)
        base = torch.sin(t / 97.0 + torch.arange(z[0].numel()).view(z.shape[1:]) * 0.01)
        sample = base.expand_as(z) * 0.5 + encoder_hidden_states.mean() * 0.1
        return types.SimpleNamespace(sample=sample)


def _sample(models, z, cond, T):
    sched = make_scheduler(models.scheduler_config, T, 0)
    with torch.no_grad():
        for t in sched.timesteps:
            z = sched.step(models.eps(z, int(t), cond, stage="test"), t, z).prev_sample
    return z


def test_grid_is_the_originals(models):
    sched = make_scheduler(models.scheduler_config, 50, 0)
    assert [int(t) for t in sched.timesteps][:3] == [980, 960, 940]
    assert int(sched.timesteps[-1]) == 0


def test_inversion_then_sampling_returns_to_source(models, images):
    z0 = encode_source(models, Image.open(images["src_a"]).convert("RGB"), None)
    cond = encode_prompt(models, "")
    real_unet = models.unet
    models.unet = LatentFreeUNet()
    try:
        cfg = ContentConfig(num_inference_steps=50)
        inv = ddim_invert(models, z0, cond, cfg)
        back = _sample(models, inv.x_T, cond, 50)
        assert (inv.x_T - z0).abs().max() > 0.1  # it did travel
        torch.testing.assert_close(back, z0, atol=1e-4, rtol=1e-4)
        # a grid off by one step (steps_offset 1 on the way back) does not come back
        wrong = make_scheduler(models.scheduler_config, 50, 1)
        z = inv.x_T
        for t in wrong.timesteps:
            z = wrong.step(models.eps(z, int(t), cond, stage="test"), t, z).prev_sample
        assert (z - z0).abs().max() > 1e-2
    finally:
        models.unet = real_unet


def test_inversion_matches_hand_written_map_and_first_step_is_identity(models, images):
    z0 = encode_source(models, Image.open(images["src_b"]).convert("RGB"), None)
    cond = encode_prompt(models, "")
    T = 10
    full = ddim_invert(models, z0, cond, ContentConfig(num_inference_steps=T,
                                                       skip_identity_step=False))
    sched = make_scheduler(models.scheduler_config, T, 0)
    dt = step_size(sched)
    z, manual = z0, [z0]
    with torch.no_grad():
        for t in reversed([int(t) for t in sched.timesteps]):
            z = ddim_map(z, models.eps(z, t, cond, stage="test"), alpha_at(sched, t - dt),
                         alpha_at(sched, t))
            manual.append(z)
    torch.testing.assert_close(full.latents, torch.cat(manual), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(full.latents[1], z0[0], atol=1e-6, rtol=1e-6)  # z*_0 == z_0
    skipped = ddim_invert(models, z0, cond, ContentConfig(num_inference_steps=T))
    assert torch.equal(skipped.latents[1], z0[0])
    torch.testing.assert_close(skipped.latents, full.latents, atol=1e-4, rtol=1e-3)
    assert full.latents.shape == (T + 1, 4, 8, 8)


def test_unet_evaluations_are_counted(models, images):
    z0 = encode_source(models, Image.open(images["src_a"]).convert("RGB"), None)
    before = models.unet_evals["inversion"]
    ddim_invert(models, z0, encode_prompt(models, ""), ContentConfig(num_inference_steps=10))
    assert models.unet_evals["inversion"] - before == 9  # the identity step is skipped
