"""Half precision without a GPU: bf16 on the CPU behind its opt-in, every hand-off's dtype, and
the bf16 outputs against fp32 on the tiny model (docs/performance.md, "Precision and the GPU
script").

The policy under test: only the UNet runs in the half dtype. `VCTModels.eps` casts its inputs
to it and returns fp32; the text encoder, the VAE, every latent, the learnt concept rows, the
content embeddings, both optimizers' states and every stored cache entry are fp32; the
controller's explicit probabilities are fp32, rounded to the UNet's dtype for P·V.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from PIL import Image

from vct import artifacts
from vct.attention import ControlledAttnProcessor
from vct.batch import preflight
from vct.batch.settings import RunSettings
from vct.concept import learn_concept
from vct.config import ConceptConfig, ContentConfig, FusionConfig
from vct.content import invert_content
from vct.fusion import fuse
from vct.models import CPU_BF16_ENV, ModelError, check_device, load_models, precision_identity

REFUSAL = "--dtype bf16 needs CUDA; on CPU use fp32"
# Fast settings: 64 px (the tiny model's native size), T = 8 (cross window 1 step, self 7),
# and thresholds 0 so every step runs exactly INNER iterations in both precisions (an early
# stop that flips on a rounding would compare fits of different lengths).
CONTENT = ContentConfig(num_inference_steps=8, num_inner_steps=3, early_stop_epsilon=0.0,
                        early_stop_slope=0.0)
CONCEPT = ConceptConfig(max_train_steps=4, seed=0)
FUSION = FusionConfig()


# ------------------------------------------------------------------ the opt-in and its refusal
def test_default_refuses_bf16_on_cpu_with_the_users_message(monkeypatch, tiny_model_dir,
                                                            tmp_path):
    monkeypatch.delenv(CPU_BF16_ENV, raising=False)
    with pytest.raises(ModelError, match=REFUSAL):
        check_device("cpu", "bf16")
    with pytest.raises(ModelError, match=REFUSAL):
        load_models(str(tiny_model_dir), device="cpu", dtype="bf16")
    with pytest.raises(ModelError, match=REFUSAL):  # a run is refused before any work
        preflight.check_request(str(tmp_path / "out"), str(tmp_path / "out" / "_cache"),
                                RunSettings(device="cpu", dtype="bf16"))
    monkeypatch.setenv(CPU_BF16_ENV, "0")
    with pytest.raises(ModelError, match=REFUSAL):
        check_device("cpu", "bf16")


def test_opt_in_allows_bf16_and_never_fp16_on_cpu(monkeypatch):
    monkeypatch.delenv(CPU_BF16_ENV, raising=False)
    assert check_device("cpu", "bf16", allow_cpu_bf16=True) == torch.device("cpu")
    assert check_device("cpu", "fp32") == torch.device("cpu")
    with pytest.raises(ModelError, match="--dtype fp16 needs CUDA; on CPU use fp32"):
        check_device("cpu", "fp16", allow_cpu_bf16=True)
    monkeypatch.setenv(CPU_BF16_ENV, "1")
    assert check_device("cpu", "bf16") == torch.device("cpu")
    with pytest.raises(ModelError, match=REFUSAL):  # the argument wins over the environment
        check_device("cpu", "bf16", allow_cpu_bf16=False)


def test_half_precision_results_have_their_own_cache_keys():
    ident = "ab" * 32
    assert precision_identity(ident, "fp32") == ident  # fp32 keys unchanged
    assert len({precision_identity(ident, d) for d in ("fp32", "fp16", "bf16")}) == 3


def test_gpu_script_fails_at_once_without_cuda(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    from benchmarks import gpu

    assert gpu.main(["--device", "cuda", "--output", "/nonexistent/never-written.json"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


# ------------------------------------------------------------------ the runs, with their hand-offs
@dataclass
class Handoffs:
    """Dtypes seen at each boundary during a run."""

    unet_in: set = field(default_factory=set)  # (sample, encoder_hidden_states)
    unet_out: set = field(default_factory=set)
    text_out: set = field(default_factory=set)
    vae_in: set = field(default_factory=set)
    attn: set = field(default_factory=set)  # (hidden_states in, processor out)
    optimizers: list = field(default_factory=list)  # (kind, param dtype, state dtypes)


def _recording(kind: str, base, log: list):
    class Recording(base):
        def step(self, *args, **kwargs):
            out = super().step(*args, **kwargs)
            for group in self.param_groups:
                for p in group["params"]:
                    states = {k: v.dtype for k, v in self.state[p].items()
                              if torch.is_tensor(v) and v.ndim}
                    log.append((kind, p.dtype, frozenset(states.values())))
            return out
    return Recording


def _run(models, source, reference, inputs=None) -> dict:
    """Concept, content and fusion (from this run's own results, or from `inputs`), with every
    hand-off's dtype recorded."""
    seen = Handoffs()
    hooks = [
        models.unet.register_forward_pre_hook(
            lambda m, a, kw: seen.unet_in.add(
                ((a[0] if a else kw["sample"]).dtype, kw["encoder_hidden_states"].dtype)),
            with_kwargs=True),
        models.unet.register_forward_hook(lambda m, a, out: seen.unet_out.add(out.sample.dtype)),
        models.text_encoder.register_forward_hook(
            lambda m, a, out: seen.text_out.add(out.last_hidden_state.dtype)),
        models.vae.encoder.register_forward_pre_hook(lambda m, a: seen.vae_in.add(a[0].dtype)),
        models.vae.decoder.register_forward_pre_hook(lambda m, a: seen.vae_in.add(a[0].dtype)),
    ]
    call = ControlledAttnProcessor.__call__

    def spy(self, attn, hidden_states, *args, **kwargs):
        out = call(self, attn, hidden_states, *args, **kwargs)
        seen.attn.add((hidden_states.dtype, out.dtype))
        return out

    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(ControlledAttnProcessor, "__call__", spy)
            mp.setattr(torch.optim, "AdamW", _recording("AdamW", torch.optim.AdamW,
                                                        seen.optimizers))
            mp.setattr(torch.optim, "Adam", _recording("Adam", torch.optim.Adam,
                                                       seen.optimizers))
            concept = learn_concept(models, reference, CONCEPT)
            content = invert_content(models, source, CONTENT)
            own = (content, concept) if inputs is None else inputs
            fused = fuse(models, own[0], [own[1]], FUSION)
            explicit = fuse(models, own[0], [own[1]],
                            FusionConfig(attention_impl="explicit"))
    finally:
        for h in hooks:
            h.remove()
    return {"concept": concept, "content": content, "fused": fused, "explicit": explicit,
            "seen": seen}


@pytest.fixture(scope="module")
def bf16_models(tiny_model_dir):
    return load_models(str(tiny_model_dir), device="cpu", dtype="bf16", allow_cpu_bf16=True)


@pytest.fixture(scope="module")
def runs(models, bf16_models, images):
    source = Image.open(images["src_a"]).convert("RGB")
    reference = Image.open(images["ref"]).convert("RGB")
    fp32 = _run(models, source, reference)
    bf16 = _run(bf16_models, source, reference)
    # fusion alone in bf16, from the fp32 content and concept: its own error, not the stages'
    bf16_fusion = fuse(bf16_models, fp32["content"], [fp32["concept"]], FUSION)
    return {"fp32": fp32, "bf16": bf16, "bf16_fusion": bf16_fusion}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||, in float64."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def image_mae(a, b) -> float:
    """Mean |difference| of two uint8 images, in levels (0..255)."""
    return float(abs(a.astype(float) - b.astype(float)).mean())


def test_loaded_dtypes(bf16_models, models):
    assert bf16_models.dtype == torch.bfloat16
    assert {p.dtype for p in bf16_models.unet.parameters()} == {torch.bfloat16}
    for m in (bf16_models, models):
        assert {p.dtype for p in m.text_encoder.parameters()} == {torch.float32}
        assert {p.dtype for p in m.vae.parameters()} == {torch.float32}
    assert {p.dtype for p in models.unet.parameters()} == {torch.float32}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_every_handoff_has_its_dtype(runs, precision):
    half = torch.bfloat16 if precision == "bf16" else torch.float32
    f32 = torch.float32
    run = runs[precision]
    seen = run["seen"]
    assert seen.unet_in == {(half, half)}, "the UNet gets its own dtype (VCTModels.eps casts)"
    assert seen.unet_out == {half}
    assert seen.text_out == {f32}, "the text encoder runs in fp32"
    assert seen.vae_in == {f32}, "VAE encode and decode run in fp32"
    assert seen.attn == {(half, half)}, "the controller hands back the UNet's dtype"
    kinds = {kind for kind, _, _ in seen.optimizers}
    assert kinds == {"AdamW", "Adam"}, "both the concept's AdamW and the fit's Adams ran"
    for kind, param, states in seen.optimizers:
        assert param == f32 and states == {f32}, (
            f"{kind}: parameters and moments must be fp32 (got {param}, {set(states)})")
    concept, content, fused = run["concept"], run["content"], run["fused"]
    assert concept.vectors.dtype == f32
    for name in ("x_T", "embeddings", "inversion_latents", "reconstruction"):
        assert getattr(content, name).dtype == f32, name
    assert fused.latents.dtype == f32
    assert fused.images.dtype.name == "uint8" and fused.images.shape == (1, 64, 64, 3)
    assert 0 < fused.images.std(), "a constant image: the decode clamps everything"
    for t in (concept.vectors, content.x_T, content.embeddings, fused.latents):
        assert torch.isfinite(t).all()


def test_stored_entries_are_fp32(runs):
    bf16 = runs["bf16"]
    for kind, result in (("content", bf16["content"]), ("concept", bf16["concept"])):
        data = artifacts.result_bytes(kind, artifacts.Stored(result))
        back = artifacts.load_result(kind, data).result
        for name in artifacts._TENSORS[kind]:
            assert getattr(back, name).dtype == torch.float32, f"{kind}.{name}"
            assert torch.equal(getattr(back, name), getattr(result, name))
    # whatever a stage hands over, a cache entry holds fp32 floats and uint8 images
    assert artifacts.stored_tensor(torch.ones(2, dtype=torch.bfloat16)).dtype == torch.float32
    images = torch.from_numpy(bf16["fused"].images)
    assert artifacts.stored_tensor(images).dtype == torch.uint8


def test_one_unet_evaluation_in_bf16(models, bf16_models):
    """The unit every stage is built of: one evaluation on the same fp32 inputs. Measured
    1.3e-2 relative (t = 0, 500, 980); bf16 rounding the weights alone (fp32 compute) gives
    5e-3. Bound 4e-2."""
    from vct.text import encode_prompt

    gen = torch.Generator().manual_seed(0)
    z = torch.randn(2, 4, 8, 8, generator=gen)
    e = encode_prompt(models, "").expand(2, -1, -1)
    for t in (0, 500, 980):
        ref = models.eps(z, t, e, stage="test")
        got = bf16_models.eps(z, t, e, stage="test")
        assert got.dtype == torch.float32
        assert rel(got, ref) < 4e-2, f"t={t}: one bf16 UNet evaluation is {rel(got, ref):.3g} off"


# Measured on this machine (torch 2.13 CPU, 2 threads, the tiny model, the settings above),
# each stage from the same inputs except where said:
#   concept vectors rel 2.2e-2 (16 fwd+bwd; the 4 AdamW updates are sign-like, and rounding
#     only the weights to bf16 gives the same 2.2e-2)
#   x_T rel 2.5e-1: 7 chained inversion evaluations, the error grows ~3e-2 per step
#     (2.8e-2, 4.2e-2, ... 2.5e-1; bf16-rounded weights alone: 5.6e-2)
#   content embeddings rel 1.1e-1 (their pivots are the x_T chain above)
#   fusion alone, from the fp32 content and concept: latents rel 1.6e-1, images MAE 5.3 levels
#     (the guidance w = 7.5 multiplies the rounding of eps(c) and eps(e) by 6.5 and 7.5; at
#     w = 1 the same fusion is 3.1e-2 and 1.5 levels)
#   bf16 explicit attention vs bf16 sdpa: latents rel 2.0e-1 (two bf16 roundings)
# Bounds: about 2.5x those. End to end (fusion from the bf16 content) the output is not
# bounded: a random tiny model turns the 25 % of x_T into 80 % of the fused latents (even at
# w = 1), so only its dtypes, range and finiteness are checked (test_every_handoff_has_its_dtype).
# A dropped cast fails outright (a dtype error in the UNet or in P·V) or shows in the dtypes.
BOUNDS = {"concept": 6e-2, "x_T": 6e-1, "embeddings": 3e-1, "latents_fusion_alone": 4e-1,
          "image_levels_fusion_alone": 13.0, "explicit_vs_sdpa": 5e-1}


def test_bf16_is_close_to_fp32(runs):
    fp32, bf16 = runs["fp32"], runs["bf16"]
    got = {
        "concept": rel(bf16["concept"].vectors, fp32["concept"].vectors),
        "x_T": rel(bf16["content"].x_T, fp32["content"].x_T),
        "embeddings": rel(bf16["content"].embeddings, fp32["content"].embeddings),
        "latents_fusion_alone": rel(runs["bf16_fusion"].latents, fp32["fused"].latents),
        "image_levels_fusion_alone": image_mae(runs["bf16_fusion"].images,
                                               fp32["fused"].images),
        "explicit_vs_sdpa": rel(bf16["explicit"].latents, bf16["fused"].latents),
    }
    print("bf16 vs fp32:", {k: f"{v:.2e}" for k, v in got.items()},
          "end to end latents", f"{rel(bf16['fused'].latents, fp32['fused'].latents):.2e}")
    assert bf16["content"].stats.iterations == fp32["content"].stats.iterations
    over = {k: (f"{v:.3g}", BOUNDS[k]) for k, v in got.items() if not v <= BOUNDS[k]}
    assert not over, f"bf16 differs from fp32 beyond the measured bounds: {over}"
    # a different computation: bf16 really ran, not an fp32 fallback
    assert got["x_T"] > 1e-3 and got["latents_fusion_alone"] > 1e-3
    # fp32 explicit and sdpa agree to rounding: the bf16 difference above is bf16's
    assert rel(fp32["explicit"].latents, fp32["fused"].latents) < 1e-4


def test_sd15_spec_is_the_real_architecture():
    """benchmarks/sd15.py: SD 1.5's parameter counts, built on the meta device (no memory)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from benchmarks.sd15 import SD15_SPEC

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_SPEC.unet)
        vae = AutoencoderKL(**SD15_SPEC.vae)
        text = CLIPTextModel(CLIPTextConfig(vocab_size=SD15_SPEC.vocab_size,
                                            max_position_embeddings=77, **SD15_SPEC.text))
    count = {name: sum(p.numel() for p in m.parameters())
             for name, m in (("unet", unet), ("vae", vae), ("text", text))}
    assert count == {"unet": 859_520_964, "vae": 83_653_863, "text": 123_060_480}


def test_a_folder_saved_in_fp16_loads_with_the_policy(tmp_path):
    """What benchmarks/sd15.py saves (fp16 files): the text encoder and VAE load as fp32 (a
    loader keeps a file's own dtype unless told), the UNet in the dtype asked for."""
    import dataclasses

    from vct.tiny_model import TINY_SPEC, build_random_model

    spec = dataclasses.replace(TINY_SPEC, kind="vct-tiny-sd1-fp16", save_dtype="float16")
    folder = build_random_model(tmp_path / "fp16", spec)
    for dtype, half in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        m = load_models(str(folder), device="cpu", dtype=dtype, allow_cpu_bf16=True)
        assert {p.dtype for p in m.unet.parameters()} == {half}
        assert {p.dtype for p in m.text_encoder.parameters()} == {torch.float32}
        assert {p.dtype for p in m.vae.parameters()} == {torch.float32}
