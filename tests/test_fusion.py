"""Stage 4: the two-branch sampler and the attention controller (spec §6, invariants §10.2-7).

Every expected value is computed here from the spec (tests/golden/oracle.py), never with
`vct.ddim.guided`, `make_scheduler` or the controller's own helpers: the guidance slots of both
branches against a closed-form stub UNet, and every attention output of the real tiny UNet
against softmax(QKᵀ/√d) edited by hand.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from dataclasses import dataclass

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention
from PIL import Image

from tests.golden import oracle
from vct.attention import AttentionController, ControlledAttnProcessor, token_edit
from vct.concept import learn_concept
from vct.config import ConceptConfig, ContentConfig, FusionConfig
from vct.content import invert_content, invert_contents
from vct.fusion import FusionMismatch, fuse

T = 14  # windows: cross ⌊0.2·15⌋ = 3 ('original') vs ⌊0.2·14⌋ = 2 ('consistent'), self 12
INNER = 3
L = 77


def content_config(**overrides) -> ContentConfig:
    return ContentConfig(**{"num_inference_steps": T, "num_inner_steps": INNER, **overrides})


@pytest.fixture(scope="module")
def content(models, images):
    return invert_content(models, Image.open(images["src_a"]).convert("RGB"), content_config())


@pytest.fixture(scope="module")
def concept(models, images):
    return learn_concept(models, Image.open(images["ref"]).convert("RGB"),
                         ConceptConfig(max_train_steps=3, batch_microsteps=True))


def _close(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-5, rtol: float = 1e-5) -> bool:
    return torch.allclose(a.double().cpu(), b.double().cpu(), atol=atol, rtol=rtol)


# ----------------------------------------------------------------- defaults, token map, windows
def test_fusion_defaults_are_the_originals():
    cfg = FusionConfig()
    assert cfg.cross_attention_injection_ratio == 0.2, "cross window ratio r_x = 0.2 (spec §7)"
    assert cfg.self_attention_injection_ratio == 0.9, "self window ratio r_s = 0.9 (spec §7)"
    assert cfg.self_replace_max_tokens == 1024, "self replace only for N_q <= 1024 (spec §6.1)"
    assert cfg.reweight_value == 0.5, "cross reweight 0.5 on <s2> (spec §6.1)"
    assert cfg.reweight_positions == "original", (
        "faithful default reweight_positions='original' (spec §6.1, §13)")
    assert cfg.window_rounding == "original", "faithful window rounding (spec §6.1, §13)"


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("positions", ["original", "concept_tokens"])
def test_token_edit_columns(n, positions):
    """m, α and R of "" → `<s2>` column by column; the faithful default reweights {0..n-1}."""
    edit = token_edit(L, n, FusionConfig(reweight_positions=positions))
    m, alpha, reweight = oracle.token_columns(L, n, positions, 0.5)
    assert edit.alphas.tolist() == alpha, (
        "cross map blend: α = 0 on the new columns 1..n, 1 elsewhere (spec §6.1)")
    used = [j for j in range(L) if alpha[j] > 0]  # where α = 0 the map is unused
    assert [int(edit.mapper[j]) for j in used] == [m[j] for j in used], (
        "cross column map m: 0→0, EOS n+1 → B*'s EOS 1, j ≥ n+2 → j (spec §6.1)")
    expected_cols = set(range(0, n)) if positions == "original" else set(range(1, n + 1))
    assert {j for j in range(L) if edit.reweight[j] != 1.0} == expected_cols, (
        f"reweight columns for reweight_positions={positions!r}: original = {{0..n-1}} "
        "(ptp_utils off-by-one), concept_tokens = {1..n} (spec §6.1)")
    assert edit.reweight.tolist() == reweight, "reweight value R = 0.5, no renormalisation (§6.1)"


def test_token_edit_of_the_empty_prompt_is_the_identity():
    edit = token_edit(L, 0, FusionConfig())
    assert edit.mapper.tolist() == list(range(L)), "empty edit prompt: identity map (spec §10.5)"
    assert edit.alphas.tolist() == [1.0] * L, "empty edit prompt: every column from B* (§10.5)"
    assert edit.reweight.tolist() == [1.0] * L, "empty edit prompt: nothing reweighted (§10.5)"


def test_token_edit_reweight_off():
    assert token_edit(L, 3, FusionConfig(reweight_value=1.0)).reweight.tolist() == [1.0] * L, (
        "reweight_value 1 disables the reweight (spec §6.1)")


@pytest.mark.parametrize("steps", [50, 14, 12, 7])
@pytest.mark.parametrize("rounding", ["original", "consistent"])
def test_controller_windows(steps, rounding):
    cfg = FusionConfig(window_rounding=rounding)
    expected = oracle.windows(steps, rounding=rounding)
    assert cfg.cross_steps(steps) == expected[0], (
        f"cross window S_x = ⌊0.2·(T+1)⌋ ('original') or ⌊0.2·T⌋ ('consistent') at T={steps} "
        "(spec §6.1)")
    assert cfg.self_steps(steps) == expected[1], f"self window S_self = ⌊0.9·T⌋ at T={steps} §6.1"
    if steps == 50:
        assert expected == (10, 45), "T = 50: 10 cross steps, 45 self steps (spec §6.1)"


def test_self_replace_limit_is_inclusive():
    """SD 1.5 at 512²: 32×32 = 1024 queries are replaced, 64×64 = 4096 are not (spec §6.1)."""
    ctl = AttentionController(FusionConfig(), 50, [])
    ctl.step = 0
    assert ctl.mode(False, 1024) == "self", "self replace for N_q <= 1024 (spec §6.1)"
    assert ctl.mode(False, 1025) is None, "no self replace for N_q > 1024 (spec §6.1)"
    assert ctl.mode(True, 4096) == "cross", "cross injection at any resolution (spec §6.1)"
    ctl.step = 45
    assert ctl.mode(False, 16) is None, "self window ends at s = 45 (spec §6.1)"
    ctl.step = 10
    assert ctl.mode(True, 16) is None, "cross window ends at s = 10 (spec §6.1)"


# ----------------------------------------------------------------- guidance slots (stub UNet)
@pytest.fixture(scope="module")
def stub_models(models):
    stub = oracle.StubUNet((4, 8, 8), (L, 32), alpha=0.01, beta=0.01)
    return dataclasses.replace(models, unet=stub, unet_evals=Counter())


def test_guidance_slots_of_both_branches(stub_models, images):
    """B*: ε(c_s) + w(ε(e_∅) − ε(c_s)); B: ε(c_s) + w(ε(e_ref) − ε(c_s)); both D(·, t, t−Δ)
    from x_T, no mixing across branches (spec §6). The stub has no attention: no controller."""
    m = stub_models
    content = invert_content(m, Image.open(images["src_a"]).convert("RGB"),
                             content_config(num_inference_steps=6, resolution=64))
    concept = learn_concept(m, Image.open(images["ref"]).convert("RGB"),
                            ConceptConfig(max_train_steps=1))
    before = Counter(m.unet_evals)
    result = fuse(m, content, [concept], FusionConfig(), keep_trajectory=True)
    e_null = oracle.text_states(m.tokenizer, m.text_encoder)
    e_ref = oracle.text_states(m.tokenizer, m.text_encoder, concept.vectors)
    c = content.embeddings.double()
    assert not torch.allclose(c[0], e_null[0]), "scenario: fitted c_0 differs from e_∅"

    def eps(z, t, e):
        return m.unet.formula(z, t, e)

    star = y = content.x_T.double()
    dt = oracle.step_size(6)
    trajectory = [star]
    for s, t in enumerate(oracle.sampling_grid(6)):
        star = oracle.ddim(star, oracle.cfg(eps(star, t, c[s:s + 1]), eps(star, t, e_null)), t,
                           t - dt)
        y = oracle.ddim(y, oracle.cfg(eps(y, t, c[s:s + 1]), eps(y, t, e_ref)), t, t - dt)
        trajectory.append(star)
    assert _close(result.star_trajectory, torch.cat(trajectory)), (
        "fusion B*: ε* = ε(y*, t, c_s) + 7.5·(ε(y*, t, e_∅) − ε(y*, t, c_s)), c_s in the "
        "negative slot, DDIM t → t−Δ (spec §6)")
    assert _close(result.latents[1:], y), (
        "fusion B: ε = ε(y, t, c_s) + 7.5·(ε(y, t, e_ref) − ε(y, t, c_s)), e_ref = E(<s2>) with "
        "the concept at positions 1..n (spec §6)")
    spent = Counter(m.unet_evals)
    spent.subtract(before)
    assert sum(spent.values()) == 3 * 6, (
        "fusion costs B's two passes and B*'s conditional one per step: B* replays the fit")


# ----------------------------------------------------------------- attention oracle (real UNet)
@dataclass
class AttnCall:
    step: int
    name: str
    attn: Attention
    hidden: torch.Tensor
    context: torch.Tensor | None
    out: torch.Tensor


@pytest.fixture
def attention_calls(monkeypatch):
    """Every call of the controlled processors with what it saw and returned, and the sampling
    step counted independently from the UNet calls (a forward pre-hook)."""
    calls: list[AttnCall] = []
    state = {"unet_calls": 0, "names": {}}
    original = ControlledAttnProcessor.__call__

    def spy(proc, attn, hidden_states, *args, **kwargs):
        out = original(proc, attn, hidden_states, *args, **kwargs)
        context = kwargs.get("encoder_hidden_states", args[0] if args else None)
        calls.append(AttnCall(state["unet_calls"] - 1, state["names"][id(attn)], attn,
                              hidden_states.detach().clone(),
                              None if context is None else context.detach().clone(),
                              out.detach().clone()))
        return out

    monkeypatch.setattr(ControlledAttnProcessor, "__call__", spy)
    handles = []

    def watch(unet):
        state["names"] = {id(mod): name for name, mod in unet.named_modules()
                          if isinstance(mod, Attention)}

        def count(*_):
            state["unet_calls"] += 1

        handles.append(unet.register_forward_pre_hook(count))
        return calls

    yield watch
    for h in handles:
        h.remove()


def expected_attention(call: AttnCall, edits: list[tuple[list, list, list]], cross_steps: int,
                       self_steps: int, limit: int) -> tuple[torch.Tensor, str]:
    """The spec's attention for one call: P = softmax(QKᵀ/√d) per head, then for each B_k's
    conditional row: cross (s < S_x) R·(α·P*[:, :, m] + (1−α)·P_B); self (s < S_self,
    N_q ≤ limit) P_B*. Batch = [uncond B_1..B_K | cond B*, B_1..B_K] (B* replays the fit, so
    only its conditional pass runs). Returns the output and which edit applied."""
    attn = call.attn
    assert (attn.group_norm is None and attn.spatial_norm is None and attn.norm_cross is None
            and attn.norm_q is None and not attn.residual_connection
            and attn.rescale_output_factor == 1.0 and call.hidden.ndim == 3), (
        "oracle assumes plain attention (to_q/k/v, softmax, to_out)")
    cross = call.context is not None
    ctx = call.context if cross else call.hidden
    with torch.no_grad():
        q, k, v = attn.to_q(call.hidden), attn.to_k(ctx), attn.to_v(ctx)
    rows, nq, width = q.shape
    heads = attn.heads
    d = width // heads

    def split(x):
        return x.double().view(rows, -1, heads, d).transpose(1, 2)

    q, k, v = split(q), split(k), split(v)
    probs = (q @ k.transpose(-1, -2) / math.sqrt(d)).softmax(dim=-1)
    K = len(edits)
    star = K
    assert rows == 2 * K + 1, "batch layout [uncond B.. | cond B*, B..] (spec §6)"
    edited = probs.clone()
    kind = "none"
    if cross and call.step < cross_steps:
        kind = "cross"
        for i, (m, alpha, reweight) in enumerate(edits):
            a = torch.tensor(alpha, dtype=torch.float64)
            r = torch.tensor(reweight, dtype=torch.float64)
            edited[star + 1 + i] = r * (a * probs[star][..., m] + (1 - a) * probs[star + 1 + i])
    elif not cross and call.step < self_steps and nq <= limit:
        kind = "self"
        edited[star + 1:] = probs[star]
    out = (edited @ v).transpose(1, 2).reshape(rows, nq, width).float()
    with torch.no_grad():
        return attn.to_out[1](attn.to_out[0](out)), kind


def check_calls(calls: list[AttnCall], edits, cross_steps: int, self_steps: int,
                limit: int, steps: int) -> Counter:
    """Compare every recorded attention output with the oracle, row group by row group."""
    assert calls, "the controller's processors were never called"
    assert {c.step for c in calls} == set(range(steps)), "one UNet call per sampling step"
    kinds: Counter = Counter()
    K = len(edits)
    for c in calls:
        expected, kind = expected_attention(c, edits, cross_steps, self_steps, limit)
        kinds[kind] += 1
        where = f"step {c.step}, {c.name}"
        assert _close(c.out[:K], expected[:K]), (
            f"{where}: unconditional passes are never controlled (spec §6.1, §10.7)")
        assert _close(c.out[K], expected[K]), (
            f"{where}: B*'s conditional pass is never modified (spec §6.1, §10.7)")
        if kind == "cross":
            msg = ("replaced cross-attention columns = R·(α·P*[:, :, m] + (1−α)·P_B), R on the "
                   f"reweight columns, for s < S_x = {cross_steps} (spec §6.1)")
        elif kind == "self":
            msg = (f"self-attention replaced P_B ← P_B* (B keeps its V) for s < S_self = "
                   f"{self_steps} and N_q <= {limit} (spec §6.1)")
        else:
            msg = (f"B's own attention outside the windows (cross s >= {cross_steps}, self "
                   f"s >= {self_steps} or N_q > {limit}) (spec §6.1, §10.7)")
        assert _close(c.out[K + 1:], expected[K + 1:]), f"{where}: {msg}"
    return kinds


@pytest.mark.parametrize(("impl", "rounding", "positions"), [
    ("sdpa", "original", "original"),
    ("explicit", "original", "original"),
    ("sdpa", "consistent", "concept_tokens"),
])
def test_controller_against_hand_computed_attention(models, content, concept, attention_calls,
                                                    impl, rounding, positions):
    """All 1 + 2K passes of every attention call of fusion, for a concept and the empty edit
    prompt sharing one B*, against the spec's edited softmax (spec §6.1, §10.7)."""
    calls = attention_calls(models.unet)
    cfg = FusionConfig(attention_impl=impl, window_rounding=rounding,
                       reweight_positions=positions)
    fuse(models, content, [concept, None], cfg)
    n = concept.vectors.shape[0]
    edits = [oracle.token_columns(L, n, positions, 0.5), oracle.token_columns(L, 0)]
    cross_steps, self_steps = oracle.windows(T, rounding=rounding)
    kinds = check_calls(calls, edits, cross_steps, self_steps, 1024, T)
    layers = {c.name for c in calls}
    n_cross = sum(name.endswith("attn2") for name in layers)
    n_self = len(layers) - n_cross
    assert kinds["cross"] == cross_steps * n_cross, "cross injection at every layer in its window"
    assert kinds["self"] == self_steps * n_self, "self injection at every layer in its window"


@pytest.fixture(scope="module")
def two_level_models(models):
    """A UNet with attention at two resolutions (latent side and half of it), so that one
    self_replace_max_tokens splits its layers, as 1024 splits SD 1.5's at 512²."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
            layers_per_block=1, down_block_types=("CrossAttnDownBlock2D",) * 2,
            up_block_types=("CrossAttnUpBlock2D",) * 2, cross_attention_dim=32,
            attention_head_dim=8, norm_num_groups=32)
    unet.requires_grad_(False).eval()
    return dataclasses.replace(models, unet=unet, unet_evals=Counter())


@pytest.mark.parametrize(("resolution", "replaced"), [
    (64, {"down_blocks.1", "mid_block", "up_blocks.0"}),  # 8×8 latent: 64 and 16 queries
    (32, {"down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.0", "up_blocks.1"}),  # 16, 4
])
def test_self_replace_limit_at_two_resolutions(two_level_models, images, attention_calls,
                                               resolution, replaced):
    """self_replace_max_tokens = 16: at 64 px the outer layers (8×8 = 64 queries) keep B's own
    self-attention and the inner ones (4×4) are replaced; at 32 px every layer is replaced."""
    m = two_level_models
    steps = 4
    content = invert_content(m, Image.open(images["src_a"]).convert("RGB"),
                             ContentConfig(num_inference_steps=steps, num_inner_steps=0,
                                           resolution=resolution))
    calls = attention_calls(m.unet)
    fuse(m, content, [None], FusionConfig(self_replace_max_tokens=16))
    cross_steps, self_steps = oracle.windows(steps)
    check_calls(calls, [oracle.token_columns(L, 0)], cross_steps, self_steps, 16, steps)
    self_calls = [c for c in calls if c.name.endswith("attn1") and c.step < self_steps]
    got = {c.name.split(".attentions")[0] for c in self_calls if c.hidden.shape[1] <= 16}
    assert got == replaced, f"layers with N_q <= 16 at {resolution} px (spec §6.1)"
    kept = {c.name.split(".attentions")[0] for c in self_calls} - replaced
    assert all(c.hidden.shape[1] > 16 for c in self_calls
               if c.name.split(".attentions")[0] in kept), "kept layers have N_q > 16"


# ----------------------------------------------------------------- invariants §10.2, 4, 5, 6, 7
def test_b_star_with_unfitted_content_is_plain_ddim(models, images, concept):
    """Invariant 2: with every c_s = e_∅ guidance is a no-op, so B* (under the controller, next
    to a concept branch) is plain DDIM sampling with "" from x_T."""
    steps = 8
    content = invert_content(models, Image.open(images["src_b"]).convert("RGB"),
                             ContentConfig(num_inference_steps=steps, num_inner_steps=0))
    e_null = oracle.text_states(models.tokenizer, models.text_encoder)
    assert torch.allclose(content.embeddings.double(), e_null.expand(steps, -1, -1),
                          atol=1e-6), "with zero iterations every c_s is e_∅ (spec §4)"
    result = fuse(models, content, [concept], FusionConfig(), keep_trajectory=True)
    z = content.x_T
    plain = [z]
    dt = oracle.step_size(steps)
    with torch.no_grad():
        for t in oracle.sampling_grid(steps):
            eps = models.unet(z, torch.tensor(t), encoder_hidden_states=e_null.float()).sample
            z = oracle.ddim(z.double(), eps.double(), t, t - dt).float()
            plain.append(z)
    assert _close(result.star_trajectory, torch.cat(plain), atol=1e-4, rtol=1e-4), (
        "B* with c_s = e_∅ equals plain DDIM sampling with \"\" (spec §10.2)")


@pytest.fixture(scope="module")
def batched_contents(models, images):
    """Two sources fitted in one batch, as the batch layer fits them."""
    sources = [Image.open(images[k]).convert("RGB") for k in ("src_a", "src_b")]
    return invert_contents(models, sources, content_config())


@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("branches", [1, 3])
def test_branch_star_is_the_fit_at_every_step(models, content, batched_contents, concept,
                                              batched, branches):
    """Invariants 2b and 4: the latent of B*'s conditional pass at step s, the one whose
    attention B borrows, is the fit's z̄_s bit for bit, and B* ends at the fit's z̄_T: for
    one concept or several sharing B*, for a source fitted alone or in a batch of sources.
    (The original's B* equals its fit bitwise; a recomputed B* drifts from it by 0.5 at
    guidance 7.5.) Checked on the UNet's own inputs, not on what fusion reports."""
    fitted = batched_contents[1] if batched else content
    seen: list[torch.Tensor] = []
    hook = models.unet.register_forward_pre_hook(
        lambda _m, args, kwargs: seen.append(args[0].detach().clone()), with_kwargs=True)
    try:
        result = fuse(models, fitted, [concept, None, concept][:branches], FusionConfig(),
                      keep_trajectory=True)
    finally:
        hook.remove()
    assert len(seen) == T, "one UNet call per sampling step"
    for s, batch in enumerate(seen):
        assert batch.shape[0] == 2 * branches + 1, "[uncond B.. | cond B*, B..]"
        assert torch.equal(batch[branches], fitted.reconstruction[s]), (
            f"step {s}: B*'s conditional pass runs on the fit's z̄_s exactly (spec §10.2b)")
    assert torch.equal(result.star_trajectory, fitted.reconstruction)
    assert torch.equal(result.latents[0], fitted.reconstruction[-1])
    assert result.images.shape == (branches, 64, 64, 3) and result.images.dtype.name == "uint8"


def test_output_is_the_decoded_b_branch(models, content, concept):
    """Output = VAE decode of B's latent / 0.18215, (x/2 + 0.5) clamped to [0, 1], ×255,
    truncated to uint8 (spec §2); B* is not decoded."""
    result = fuse(models, content, [concept], FusionConfig())
    with torch.no_grad():
        x = models.vae.decode(result.latents[1:] / 0.18215).sample
    want = ((x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).astype("uint8")
    assert result.images.shape == want.shape, "one image per B branch (spec §6)"
    assert (result.images == want).all(), "decode, clamp, ×255, truncate (spec §2)"


def test_empty_edit_prompt_gives_b_equal_to_b_star(models, content):
    """Invariant 5: e_ref = e_∅, so the injected maps are B's own."""
    result = fuse(models, content, [None], FusionConfig())
    assert _close(result.latents[1], result.latents[0], atol=1e-4, rtol=1e-4), (
        "empty edit prompt: B ≡ B* with the controller on (spec §10.5)")


def test_no_injection_equals_plain_guidance_alone(models, content, concept):
    """Invariant 6: r_x = r_s = 0 and no reweight: B is plain CFG with negative c_s and
    positive e_ref, computed here with the spec's D and the real UNet."""
    cfg = FusionConfig(cross_attention_injection_ratio=0.0, self_attention_injection_ratio=0.0,
                       reweight_value=1.0)
    result = fuse(models, content, [concept], cfg, record_controller=True)
    assert result.controller_log == [], "no window: the controller never acts"
    e_ref = oracle.text_states(models.tokenizer, models.text_encoder, concept.vectors).float()
    z = content.x_T
    dt = oracle.step_size(T)
    with torch.no_grad():
        for s, t in enumerate(oracle.sampling_grid(T)):
            c = content.embeddings[s:s + 1]
            eps = models.unet(torch.cat([z, z]), torch.tensor(t),
                              encoder_hidden_states=torch.cat([c, e_ref])).sample.double()
            z = oracle.ddim(z.double(), oracle.cfg(eps[:1], eps[1:]), t, t - dt).float()
    assert _close(result.latents[1:], z, atol=1e-4, rtol=1e-4), (
        "B alone = D(y, ε(c_s) + 7.5(ε(e_ref) − ε(c_s)), t, t−Δ) (spec §6, §10.6)")


def test_controller_leaves_b_star_bit_identical(models, content, concept):
    """Invariant 7: B*'s trajectory is bit-identical to an uncontrolled run; B is edited."""
    controlled = fuse(models, content, [concept], FusionConfig())
    plain = fuse(models, content, [concept], FusionConfig(), control=False)
    assert torch.equal(controlled.latents[0], plain.latents[0]), "B* is never modified (§10.7)"
    assert not torch.allclose(controlled.latents[1], plain.latents[1]), (
        "the controller edits B (spec §6.1)")


@pytest.mark.parametrize("positions", ["original", "concept_tokens"])
def test_sdpa_fast_path_equals_explicit_probabilities(models, content, concept, positions):
    """Spec §13: P_B*·V_B = SDPA(Q_B*, K_B*, V_B), so the fused-kernel path is the same math."""
    fast = fuse(models, content, [concept, None], FusionConfig(reweight_positions=positions))
    slow = fuse(models, content, [concept, None],
                FusionConfig(reweight_positions=positions, attention_impl="explicit"))
    torch.testing.assert_close(fast.latents, slow.latents, atol=1e-3, rtol=1e-3)


def test_shared_b_star_serves_several_concepts(models, content, concept):
    alone = fuse(models, content, [concept], FusionConfig())
    before = sum(models.unet_evals.values())
    both = fuse(models, content, [concept, None], FusionConfig())
    assert sum(models.unet_evals.values()) - before == 5 * T, (
        "1 + 2K passes per step: B*'s conditional one, each B's two (§8)")
    torch.testing.assert_close(both.latents[1], alone.latents[1], atol=1e-3, rtol=1e-3)


def test_content_made_with_other_settings_is_refused(models, content, concept):
    for other in (content_config(guidance_scale=5.0), content_config(num_inference_steps=T + 1)):
        with pytest.raises(FusionMismatch, match="recompute the content"):
            fuse(models, content, [concept], FusionConfig(), expected_content=other)
