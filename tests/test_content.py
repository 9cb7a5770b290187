"""Stage 2: pivotal content inversion (spec §4, invariants §10.3 and §10.9).

The fit is checked step by step against the spec's loop written out in tests/golden/oracle.py,
on a stub UNet ε = α·z + β·s(e)·U + (t/1000)·V whose value and gradient are known in closed form.
Each check starts from the code's own inputs of that step (z̄_s, c_{s−1}, the pivots), so a
failure names the one formula that is wrong instead of a drift accumulated over the steps.
The stub's constants put the losses around the default thresholds 1e-5 + 2e-5·s, so the
early-stop rule decides the iteration counts (asserted: the scenario is informative).
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter

import pytest
import torch
from PIL import Image

from tests.golden import oracle
from vct.config import ContentConfig
from vct.content import invert_content, invert_contents

T = 6
INNER = 8
STUB = {"alpha": 0.01, "beta": 0.01}  # losses ~1e-5..1e-3: the thresholds bite


# ------------------------------------------------------------ result statistics (issue 8)
def _stats(result):
    """Every read of a result's statistics goes through here (issue 8: typed `stats`)."""
    return result.stats


def iterations(result) -> list[int]:
    return list(_stats(result).iterations)


def first_losses(result) -> list[float]:
    return list(_stats(result).first_losses)


def last_losses(result) -> list[float]:
    return list(_stats(result).last_losses)


def timesteps(result) -> list[int]:
    return list(_stats(result).timesteps)


# ------------------------------------------------------------ the stub scenario
@pytest.fixture(scope="module")
def source(images) -> Image.Image:
    return Image.open(images["src_a"]).convert("RGB")


@pytest.fixture(scope="module")
def stub_models(models):
    stub = oracle.StubUNet((4, 8, 8), (77, 32), **STUB)
    return dataclasses.replace(models, unet=stub, unet_evals=Counter())


@pytest.fixture(scope="module")
def e_null(models) -> torch.Tensor:
    return oracle.text_states(models.tokenizer, models.text_encoder)


def fit(stub_models, source, **overrides):
    cfg = ContentConfig(**{"num_inference_steps": T, "num_inner_steps": INNER, "resolution": 64,
                           **overrides})
    return invert_content(stub_models, source, cfg)


@pytest.fixture(scope="module")
def fitted(stub_models, source):
    """Default lr, lr decay and thresholds; T = 6, at most 8 iterations per step."""
    return fit(stub_models, source)


def step_inputs(result, e_null: torch.Tensor, s: int, to_x0: bool = False):
    """What step s starts from, taken from the code's own outputs: z̄_s, c_{s−1} (c_{−1} = e_∅),
    the target P_s = z*_{k−1} with k = T−1−s (pivot) or z_0 (x0), and t_s."""
    z = result.reconstruction[s:s + 1].double()
    c_prev = e_null if s == 0 else result.embeddings[s - 1:s].double()
    latents = result.inversion_latents.double()
    target = latents[:1] if to_x0 else latents[T - 1 - s:T - s]
    return z, c_prev, target, oracle.sampling_grid(T)[s]


class Loss(float):
    """The spec's loss in float64, with the magnitude its fp32 computation works at."""

    scale: float


def pre_step_loss(eps, z, c, e_null, target, t, *, swap=False, to_x0=False) -> Loss:
    """L = mean((D(z̄, ε(c) + w(ε(e_∅) − ε(c)), t, t−Δ) − P)²) (or ẑ_0 against z_0)."""
    neg, pos = eps(z, t, c), eps(z, t, e_null)
    if swap:
        neg, pos = pos, neg
    eps_hat = oracle.cfg(neg, pos)
    pred = oracle.x0_hat(z, eps_hat, t) if to_x0 else oracle.ddim(z, eps_hat, t,
                                                                 t - oracle.step_size(T))
    loss = Loss(float(((pred - target) ** 2).mean()))
    # the largest value the step computes: the guided ε (w times the UNet's), the latents,
    # and for the x0 target ẑ_0 = (z − √(1−ᾱ)ε̂)/√ᾱ, which divides all of it by √ᾱ
    big = max(float(z.abs().max()), float(target.abs().max()),
              oracle.GUIDANCE * float(torch.maximum(neg.abs(), pos.abs()).max()))
    loss.scale = big / math.sqrt(oracle.a(t)) if to_x0 else big
    return loss


def loss_matches(code: float, want: Loss) -> bool:
    """An fp32 loss against the float64 spec. L = mean(d²) with d = pred − P, each d off by
    the rounding δ of the fp32 step (a few ulps of the largest value it handles, `scale`), so
    |ΔL| ≤ 2·√L·δ + δ². 8 ulps of fp32 (2⁻²³ each) cover the dozen operations of one guided
    step. A fixed relative bound fails instead where d is small next to the latents."""
    delta = 8 * 2.0 ** -23 * want.scale
    return abs(code - want) <= 2 * math.sqrt(want) * delta + delta ** 2


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


# ------------------------------------------------------------ defaults and grid
def test_content_defaults_are_the_originals():
    cfg = ContentConfig()
    assert cfg.num_inference_steps == 50, "T = 50 (spec §7)"
    assert cfg.guidance_scale == 7.5, "guidance w = 7.5 (spec §4)"
    assert cfg.num_inner_steps == 50, "at most 50 Adam iterations per step (spec §4.3)"
    assert (cfg.early_stop_epsilon, cfg.early_stop_slope) == (1e-5, 2e-5), (
        "early-stop threshold 1e-5 + 2e-5·s (spec §4.3)")
    assert (cfg.inner_learning_rate, cfg.inner_lr_decay) == (0.01, 0.01), (
        "Adam lr schedule 0.01·(1 − s/100) (spec §4.2)")
    assert cfg.content_target == "pivot", "fit target: the previous pivot z*_{k−1} (spec §13)"
    assert cfg.inversion_prompt == "", "inversion prompt \"\" (spec §3)"
    assert cfg.steps_offset == 1, "steps_offset 1, grid 981..1: what the original runs (§2)"


def test_grid_and_pivots(stub_models, source, fitted):
    assert timesteps(fitted) == oracle.sampling_grid(T), "sampling grid t_s = (T−1−s)·Δ (§2)"
    assert torch.equal(fitted.x_T, fitted.inversion_latents[-1:]), "x_T = z*_{T−1} (spec §3)"
    assert torch.equal(fitted.reconstruction[0:1], fitted.x_T), "z̄ starts at x_T (spec §4)"


# ------------------------------------------------------------ the fit, step by step
def test_fit_loss_sign_target_and_guidance(stub_models, fitted, e_null):
    """The recorded pre-step loss of each step's first iteration against the spec's L."""
    eps = stub_models.unet.formula
    latents = fitted.inversion_latents.double()
    for s, code in enumerate(first_losses(fitted)):
        z, c_prev, target, t = step_inputs(fitted, e_null, s)
        want = pre_step_loss(eps, z, c_prev, e_null, target, t)
        if loss_matches(code, want):
            continue
        wrong_pivot = latents[T - s:T - s + 1]
        if loss_matches(-code, want):
            what = "content fit loss sign (spec §4.3): L = +mean((D(z̄, ε̂, t, t−Δ) − P_s)²)"
        elif loss_matches(code, pre_step_loss(eps, z, c_prev, e_null, wrong_pivot, t)):
            what = "content fit target index (spec §4): P_s = z*_{k−1}, not z*_k"
        elif loss_matches(code, pre_step_loss(eps, z, c_prev, e_null, target, t, swap=True)):
            what = "CFG slots in the content fit (spec §4.3): ε̂ = ε(c) + w(ε(e_∅) − ε(c))"
        elif s and loss_matches(code, pre_step_loss(eps, z, e_null, e_null, target, t)):
            what = "warm start of c from c_{s−1} (spec §4)"
        else:
            what = ("content fit loss L = mean((D(z̄, ε(c) + w(ε(e_∅) − ε(c)), t, t−Δ) − "
                    "z*_{k−1})²) (spec §4.3)")
        raise AssertionError(f"step {s}: loss {code!r}, spec {want!r}: {what}")


def test_fit_early_stop_rule(stub_models, fitted, e_null):
    """Stop after the iteration whose pre-step L < 1e-5 + 2e-5·s: always ≥ 1 update."""
    eps = stub_models.unet.formula
    counts = iterations(fitted)
    expected, fragile = [], False
    for s in range(T):
        z, c_prev, target, t = step_inputs(fitted, e_null, s)
        losses, _, _ = oracle.content_step(eps, z, c_prev, e_null, target, t,
                                           oracle.step_size(T), s, max_iterations=INNER)
        fragile |= any(_rel(v, 1e-5 + 2e-5 * s) < 0.02 for v in losses)
        expected.append(len(losses))
    note = " (a loss sits within 2% of its threshold: check the scenario)" if fragile else ""
    assert counts == expected, (
        f"iterations {counts}, spec {expected}: early stop when the pre-step loss "
        f"L < 1e-5 + 2e-5·s, at most 50 (here 8) iterations (spec §4.3){note}")
    assert 1 in expected and INNER in expected and len(set(expected)) >= 3 and not fragile, (
        f"test scenario not informative or fragile: counts {expected}. If another fit test "
        "fails too, an upstream formula (inversion, advance) changed what the steps start "
        "from; otherwise retune the stub constants so that the thresholds decide the counts")


def test_fit_adam_steps(stub_models, fitted, e_null):
    """c_s = J_s steps of a fresh Adam (β 0.9/0.999, eps 1e-8) with lr_s = 0.01·(1 − s/100),
    from c_{s−1}; J_s is the code's own count so that this checks the optimizer alone."""
    eps = stub_models.unet.formula
    for s, (count, last) in enumerate(zip(iterations(fitted), last_losses(fitted))):
        z, c_prev, target, t = step_inputs(fitted, e_null, s)
        losses, c, _ = oracle.content_step(eps, z, c_prev, e_null, target, t,
                                           oracle.step_size(T), s, max_iterations=INNER,
                                           iterations=count)
        got = fitted.embeddings[s:s + 1].double()
        assert torch.allclose(got, c, atol=1e-5, rtol=0), (
            f"step {s}: c_s = {count} Adam steps with lr_s = 0.01·(1 − s/100) from c_{{s−1}} "
            f"(spec §4.2); max error {float((got - c).abs().max()):.3g}")
        want_last = Loss(losses[-1])
        want_last.scale = pre_step_loss(eps, z, c_prev, e_null, target, t).scale
        assert loss_matches(last, want_last), f"step {s}: last pre-step loss (spec §4.3)"


def test_fit_advance_uses_the_fitted_embedding(stub_models, fitted, e_null):
    """z̄_{s+1} = D(z̄_s, ε(z̄_s, t, c_s) + w(ε(z̄_s, t, e_∅) − ε(z̄_s, t, c_s)), t, t−Δ)."""
    eps = stub_models.unet.formula
    for s, t in enumerate(oracle.sampling_grid(T)):
        z = fitted.reconstruction[s:s + 1].double()
        c = fitted.embeddings[s:s + 1].double()
        want = oracle.ddim(z, oracle.cfg(eps(z, t, c), eps(z, t, e_null)), t,
                           t - oracle.step_size(T))
        got = fitted.reconstruction[s + 1:s + 2].double()
        assert torch.allclose(got, want, atol=1e-6, rtol=1e-5), (
            f"step {s}: advance z̄ ← D(z̄, ε(c_s) + w(ε(e_∅) − ε(c_s)), t, t−Δ) with the fitted "
            "c_s in the negative slot (spec §4.4)")


def test_fit_lr_schedule_and_warm_start(stub_models, source, e_null):
    """One iteration per step: Adam's first step moves every element by lr_s·g/(|g| + 1e-8),
    so c_s − c_{s−1} shows lr_s = 0.01·(1 − s/100) directly, and that c_s starts at c_{s−1}."""
    result = fit(stub_models, source, num_inner_steps=1)
    assert iterations(result) == [1] * T, "num_inner_steps=1: exactly one update per step"
    eps = stub_models.unet.formula
    for s in range(T - 1):  # at t = 0 the map D(·, 0, −Δ) is the identity: no gradient
        z, c_prev, target, t = step_inputs(result, e_null, s)
        _, want, _ = oracle.content_step(eps, z, c_prev, e_null, target, t,
                                         oracle.step_size(T), s, max_iterations=1)
        got = result.embeddings[s:s + 1].double()
        if torch.allclose(got, want, atol=1e-6, rtol=0):
            continue
        lr_s = 0.01 * (1 - s / 100)
        moved = float((got - c_prev).abs().max())
        _, from_null, _ = oracle.content_step(eps, z, e_null, e_null, target, t,
                                              oracle.step_size(T), s, max_iterations=1)
        if s and torch.allclose(got, from_null, atol=1e-6, rtol=0):
            what = "warm start of c from c_{s−1} (spec §4), not from e_∅"
        elif moved == 0:
            what = "every step takes ≥ 1 Adam update, the stopping one included (spec §4.3)"
        elif float(((got - c_prev) * (want - c_prev)).sum()) < 0:
            what = ("c moved up the spec's L, not down: content fit loss sign, or the CFG "
                    "slots of the fit (spec §4.3)")
        elif _rel(moved, lr_s) > 1e-3:
            what = f"Adam lr schedule lr_s = 0.01·(1 − s/100) = {lr_s:.4g} (spec §4.2)"
        else:
            what = "one Adam step on c (spec §4.2)"
        raise AssertionError(f"step {s}: c moved by {moved:.6g}: {what}")


def test_x0_target_option(stub_models, source, e_null):
    """content_target='x0' (spec §13): L = mean((ẑ_0(z̄, ε̂) − z_0)²), same loop otherwise."""
    result = fit(stub_models, source, content_target="x0")
    eps = stub_models.unet.formula
    for s, code in enumerate(first_losses(result)):
        z, c_prev, target, t = step_inputs(result, e_null, s, to_x0=True)
        want = pre_step_loss(eps, z, c_prev, e_null, target, t, to_x0=True)
        assert loss_matches(code, want), (
            f"step {s}: x0 target loss mean((ẑ_0 − z_0)²), ẑ_0 = (z̄ − √(1−ᾱ)ε̂)/√ᾱ (spec §13)")
        _, c, _ = oracle.content_step(eps, z, c_prev, e_null, target, t, oracle.step_size(T),
                                      s, max_iterations=INNER, to_x0=True,
                                      iterations=iterations(result)[s])
        assert torch.allclose(result.embeddings[s:s + 1].double(), c, atol=1e-5, rtol=0), (
            f"step {s}: x0 target, Adam on c (spec §4.2, §13)")


def test_unet_evaluations(stub_models, source):
    """Spec §8 minus the deliberate saving: the advance reuses ε_c (2 no-grad calls per step
    instead of 3). At the original's offset 1 every inversion step calls the UNet."""
    before = Counter(stub_models.unet_evals)
    result = fit(stub_models, source)
    spent = Counter(stub_models.unet_evals)
    spent.subtract(before)
    assert spent["inversion"] == T, "inversion: T forwards (no identity step at offset 1)"
    assert spent["content"] == 2 * T, "fit: ε_c and the advance, once per step"
    assert spent["content_grad"] == sum(iterations(result)), "one fwd+bwd per iteration"


# ------------------------------------------------------------ invariants on the tiny model
@pytest.fixture(scope="module")
def real_fit(models, source):
    return invert_content(models, source, ContentConfig(num_inference_steps=20,
                                                        num_inner_steps=10))


def test_fit_reconstructs_much_better_than_plain_ddim(models, source, real_fit):
    """Invariant 3: the fitted reconstruction ends far closer to z_0 than plain DDIM does."""
    plain = invert_content(models, source, ContentConfig(num_inference_steps=20,
                                                         num_inner_steps=0))
    z0 = real_fit.inversion_latents[0]
    fit_err = float(((real_fit.reconstruction[-1] - z0) ** 2).mean())
    plain_err = float(((plain.reconstruction[-1] - z0) ** 2).mean())
    assert fit_err < 0.5 * plain_err, ("fitted reconstruction beats plain DDIM (spec §10.3)",
                                       fit_err, plain_err)
    assert 20 <= sum(iterations(real_fit)) <= 20 * 10, "ΣJ_s in [T, T·J_max] (spec §10.3)"
    assert all(p.grad is None for p in models.unet.parameters()), (
        "the UNet is frozen: the fit's gradients reach only c_s (spec §4 [R])")


def test_content_is_independent_of_loaded_concept_rows(models, source):
    """Invariant 9: encoding "" never touches the concept rows."""
    from vct.text import concept_rows

    cfg = ContentConfig(num_inference_steps=5, num_inner_steps=2)
    base = invert_content(models, source, cfg)
    with concept_rows(models, torch.randn(3, 32)):
        with_rows = invert_content(models, source, cfg)
    assert torch.equal(base.embeddings, with_rows.embeddings), "content ignores concepts (§10.9)"
    assert torch.equal(base.x_T, with_rows.x_T), "x_T ignores concepts (spec §10.9)"


def test_batched_sources_fit_as_they_would_alone(models, images):
    """Several sources in one batch (spec §13): each keeps its own Adam and early stop."""
    # a threshold both sources cross at step 0, after different numbers of iterations
    cfg = ContentConfig(num_inference_steps=8, num_inner_steps=6, early_stop_epsilon=0.034,
                        early_stop_slope=0.0)
    imgs = [Image.open(images[k]).convert("RGB") for k in ("src_a", "src_b")]
    alone = [invert_content(models, img, cfg) for img in imgs]
    before = models.unet_evals["content_grad"]
    batched = invert_contents(models, imgs, cfg)
    assert models.unet_evals["content_grad"] - before == sum(
        sum(iterations(r)) for r in batched)
    for one, both in zip(alone, batched):
        assert iterations(both) == iterations(one), "per-source early stop in a batch"
        # Adam divides by sqrt(v): elements with near-zero gradients amplify batching noise,
        # so embeddings agree in norm, and the reconstructions they produce agree closely.
        drift = (both.embeddings - one.embeddings).norm() / one.embeddings.norm()
        assert drift < 1e-3, drift
        torch.testing.assert_close(both.reconstruction, one.reconstruction, atol=1e-3,
                                   rtol=1e-3)
        assert torch.equal(both.x_T, both.inversion_latents[-1:])
    # the two sources stop after different iterations: early stop is per source
    assert iterations(alone[0])[0] != iterations(alone[1])[0]
    assert max(iterations(alone[0])[0], iterations(alone[1])[0]) < 6
