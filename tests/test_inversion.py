"""Stage 1: DDIM inversion (spec §3, invariant §10.1), against the spec's D written out in
tests/golden/oracle.py, never `vct.ddim.ddim_map` or a diffusers scheduler."""

from __future__ import annotations

import dataclasses
import types
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from tests.golden import oracle
from vct.config import ContentConfig
from vct.ddim import make_inverse_scheduler, make_scheduler
from vct.inversion import ddim_invert, encode_source


class LatentFreeUNet(torch.nn.Module):
    """ε depends on (t, e) only. DDIM inversion is then exactly undone by DDIM sampling, so a
    round trip tests that both use the same grid and query the destination timestep."""

    def forward(self, z, t, encoder_hidden_states):
        t = torch.as_tensor(t, dtype=torch.float32)
        base = torch.sin(t / 97.0 + torch.arange(z[0].numel()).view(z.shape[1:]) * 0.01)
        sample = base.expand_as(z) * 0.5 + encoder_hidden_states.mean() * 0.1
        return types.SimpleNamespace(sample=sample)


def spec_sampling(eps, z: torch.Tensor, T: int, offset: int = 1) -> torch.Tensor:
    """z ← D(z, ε(z, t_s), t_s, t_s − Δ) over t_s = (T−1−s)·Δ + offset (spec §2)."""
    dt = oracle.step_size(T)
    for t in oracle.sampling_grid(T, offset):
        z = oracle.ddim(z, eps(z, t), t, t - dt)
    return z


def spec_inversion(eps, z0: torch.Tensor, T: int, offset: int = 1) -> torch.Tensor:
    """z*_{−1} = z_0; z*_k = D(z*_{k−1}, ε(z*_{k−1}, τ_k), τ_k − Δ, τ_k) (spec §3)."""
    dt = oracle.step_size(T)
    z, out = z0, [z0]
    for tau in oracle.inversion_grid(T, offset):
        z = oracle.ddim(z, eps(z, tau), tau - dt, tau)
        out.append(z)
    return torch.cat(out)


@pytest.fixture(scope="module")
def e_null(models) -> torch.Tensor:
    return oracle.text_states(models.tokenizer, models.text_encoder)


def test_source_preprocessing(models, images):
    """z_0 = VAE posterior mean × 0.18215 of the center-cropped square, bicubic to the working
    size, x/127.5 − 1 (spec §2, `ptp_inversion.load_512`)."""
    img = Image.open(images["src_b"]).convert("RGB")  # 64×96: the crop matters
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    square = img.crop((left, top, left + side, top + side)).resize((64, 64),
                                                                    Image.Resampling.BICUBIC)
    x = torch.from_numpy(np.asarray(square, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
    with torch.no_grad():
        want = models.vae.encode(x[None]).latent_dist.mean * 0.18215
    assert torch.allclose(encode_source(models, img, 64), want, atol=1e-6), (
        "source: center crop, bicubic resize, x/127.5 − 1, posterior mean × 0.18215 (spec §2)")


def test_grid_and_schedule_are_the_originals(models):
    assert ContentConfig().steps_offset == 1, (
        "the default grid is the one the original runs: its pipeline sets steps_offset 1 (§2)")
    sched = make_scheduler(models.scheduler_config, 50, 1)
    assert [int(t) for t in sched.timesteps] == list(range(981, 0, -20)), (
        "sampling grid 981, 961, ..., 1 (steps_offset 1, spec §2)")
    inverse = make_inverse_scheduler(models.scheduler_config, 50, 1)
    assert [int(t) for t in inverse.timesteps] == list(range(1, 982, 20)), (
        "inversion grid τ_k = 20k + 1, k = 0..49 (spec §3)")
    assert [int(t) for t in make_scheduler(models.scheduler_config, 50, 0).timesteps] == list(
        range(980, -1, -20)), "steps_offset 0, the option: 980, ..., 0"
    torch.testing.assert_close(sched.alphas_cumprod.double(), oracle.alphas_cumprod(),
                               atol=1e-6, rtol=1e-6,
                               msg="ᾱ of the scaled-linear β 0.00085 → 0.012 (spec §2)")
    assert float(sched.final_alpha_cumprod) == pytest.approx(oracle.a(-20)), (
        "a(t < 0) = ᾱ_0: set_alpha_to_one off (spec §2)")


@pytest.mark.parametrize("offset,skip", [(1, True), (0, False), (0, True)])
def test_inversion_chain_on_a_stub_unet(models, images, e_null, offset, skip):
    """ε = α·z + β·s(e)·U + (t/1000)·V: the chain is the spec's, step by step, with the UNet
    queried at the destination τ_k on the less noisy latent. Only at offset 0 is step 0 the
    identity whose call may be skipped; at the original's offset 1 every step calls the UNet."""
    T = 6
    stub = oracle.StubUNet((4, 8, 8), (77, 32), alpha=0.2, beta=0.5)
    m = dataclasses.replace(models, unet=stub, unet_evals=Counter())
    z0 = encode_source(models, Image.open(images["src_a"]).convert("RGB"), 64)
    inv = ddim_invert(m, z0, e_null.float(), ContentConfig(
        num_inference_steps=T, steps_offset=offset, skip_identity_step=skip))
    want = spec_inversion(lambda z, t: stub.formula(z, t, e_null), z0.double(), T, offset)
    for k in range(T):
        # |z| is O(0.1) here: 1e-5 is far above fp32 rounding of 6 steps, far below any
        # wrong timestep or source latent (they move z by 1e-2 and more)
        assert torch.allclose(inv.latents[k + 1].double(), want[k + 1], atol=1e-5, rtol=1e-5), (
            f"z*_{k} = D(z*_{k-1}, ε(z*_{k-1}, τ_k, e_∅), τ_k − Δ, τ_k), ε at the destination "
            "timestep (spec §3)")
    assert inv.timesteps == oracle.inversion_grid(T, offset), "grid τ_k = kΔ + offset (§3)"
    assert m.unet_evals["inversion"] == (T - 1 if skip and offset == 0 else T), (
        "one UNet call per inversion step; only offset 0's identity step 0 may skip it (§3)")


def test_inversion_then_sampling_returns_to_source(models, images):
    z0 = encode_source(models, Image.open(images["src_a"]).convert("RGB"), None)
    e = oracle.text_states(models.tokenizer, models.text_encoder).float()
    unet = LatentFreeUNet()
    m = dataclasses.replace(models, unet=unet, unet_evals=Counter())

    def eps(z, t):
        return unet(z, t, e).sample.double()

    inv = ddim_invert(m, z0, e, ContentConfig(num_inference_steps=50))
    back = spec_sampling(eps, inv.x_T.double(), 50)
    assert (inv.x_T - z0).abs().max() > 0.1  # it did travel
    torch.testing.assert_close(back.float(), z0, atol=1e-4, rtol=1e-4,
                               msg="inversion is undone by the spec's sampling (spec §3)")
    # the test has power: a grid off by one timestep on the way back does not come back
    wrong = spec_sampling(eps, inv.x_T.double(), 50, offset=0)
    assert (wrong.float() - z0).abs().max() > 1e-2


@pytest.mark.parametrize("offset", [1, 0])
def test_inversion_matches_hand_written_map(models, images, e_null, offset):
    """Invariant 1 on the real tiny UNet: the scheduler loop equals the spec's D chain. At the
    original's offset 1 the first step moves z_0; at offset 0 it is the identity, and skipping
    its UNet call changes nothing beyond rounding."""
    z0 = encode_source(models, Image.open(images["src_b"]).convert("RGB"), None)
    T = 10
    e = e_null.float()
    full = ddim_invert(models, z0, e, ContentConfig(num_inference_steps=T, steps_offset=offset,
                                                    skip_identity_step=False))

    def eps(z, t):
        with torch.no_grad():
            return models.unet(z.float(), torch.tensor(t), encoder_hidden_states=e).sample.double()

    dt = oracle.step_size(T)
    for k, tau in enumerate(oracle.inversion_grid(T, offset)):  # one step at a time: no drift
        prev = full.latents[k:k + 1]
        want = oracle.ddim(prev.double(), eps(prev, tau), tau - dt, tau)
        assert torch.allclose(full.latents[k + 1:k + 2].double(), want, atol=1e-6, rtol=1e-6), (
            f"S1 step {k} equals the hand-written D(z*_{{k−1}}, ε(z*_{{k−1}}, τ_k), τ_k − Δ, τ_k) "
            "(spec §10.1)")
    if offset == 1:
        assert (full.latents[1] - z0[0]).abs().max() > 1e-4, (
            "offset 1: step 0 goes from a(-19) = ᾱ_0 to a(1), not the identity (spec §3)")
        return
    torch.testing.assert_close(full.latents[1], z0[0], atol=1e-6, rtol=1e-6,
                               msg="z*_0 == z_0: step 0 is the identity (spec §3, §10.1)")
    skipped = ddim_invert(models, z0, e, ContentConfig(num_inference_steps=T, steps_offset=0))
    assert torch.equal(skipped.latents[1], z0[0]), "skipped identity step: z*_0 is z_0 exactly"
    torch.testing.assert_close(skipped.latents, full.latents, atol=1e-4, rtol=1e-3,
                               msg="the identity-step skip changes x_T by rounding only")


def test_unet_evaluations_are_counted(models, images):
    z0 = encode_source(models, Image.open(images["src_a"]).convert("RGB"), None)
    before = models.unet_evals["inversion"]
    e = oracle.text_states(models.tokenizer, models.text_encoder).float()
    ddim_invert(models, z0, e, ContentConfig(num_inference_steps=10))
    assert models.unet_evals["inversion"] - before == 10, "offset 1: every step calls the UNet"
    before = models.unet_evals["inversion"]
    ddim_invert(models, z0, e, ContentConfig(num_inference_steps=10, steps_offset=0))
    assert models.unet_evals["inversion"] - before == 9, "offset 0: identity step skipped (§3)"
