"""Per-stage cost on one model, at the defaults and with each fast option, side by side; each
fast option's output difference against the defaults (fused latent MSE).

- content: target 'pivot' (the code) vs 'x0' (the article's reading): time, iterations,
  reconstruction error; two sources one by one vs one content batch (``content_batch``);
- concept: accumulation micro-steps sequential vs batched (``batch_microsteps``);
- fusion: SDPA (``attention_impl='sdpa'``, the default) vs explicit attention probabilities;
  3 pairs sharing one B* branch vs 3 separate fusions.
Every line also reports the UNet sample evaluations the counting wrapper saw.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from benchmarks.common import ROOT, Section, evals, timed
from vct.concept import learn_concept
from vct.config import ConceptConfig, ContentConfig, FusionConfig
from vct.content import invert_content, invert_contents
from vct.fusion import fuse
from vct.models import load_models


def _mse(a, b) -> float:
    return float(((a.float() - b.float()) ** 2).mean())


def model_record(spec: str, models) -> dict:
    """A model as committed results name it: its identity (what every cache key uses) and the
    folder's name, never the path it had on the machine that measured."""
    return {"name": Path(str(spec)).name, "identity": models.identity}


def measure(model: str, device: str = "cpu", steps: int = 50, concept_steps: int = 25,
            inner_steps: int | None = None, resolution: int | None = None,
            repeats: int = 1, label: str = "stages") -> Section:
    sec = Section(label)
    models = load_models(model, device=device)
    images = {name: Image.open(ROOT / f"manifests/images/{name}.png").convert("RGB")
              for name in ("house", "tree", "stripes")}
    content_cfg = ContentConfig(num_inference_steps=steps, resolution=resolution,
                                **({"num_inner_steps": inner_steps}
                                   if inner_steps is not None else {}))
    data: dict = {"model": model_record(model, models), "device": str(models.device),
                  "content_config": content_cfg.model_dump(mode="json")}

    # content: the default target and the article's reading
    content = {}
    for target in ("pivot", "x0"):
        cfg = content_cfg.model_copy(update={"content_target": target})
        seconds, (result, used) = timed(
            lambda c=cfg: evals(models, lambda: invert_content(models, images["house"], c)))
        content[target] = {"seconds": seconds, "iterations": result.stats.total_iterations,
                           "recon_mse": _mse(result.reconstruction[-1],
                                             result.inversion_latents[0]),
                           "unet_evals": used, "result": result}
    house = content["pivot"]["result"]
    tree_s, (tree, tree_evals) = timed(
        lambda: evals(models, lambda: invert_content(models, images["tree"], content_cfg)))
    batch_s, (batched, batch_evals) = timed(
        lambda: evals(models, lambda: invert_contents(models, [images["house"], images["tree"]],
                                                      content_cfg)))
    one_by_one = content["pivot"]["seconds"] + tree_s
    data["content"] = {
        **{t: {k: v for k, v in c.items() if k != "result"} for t, c in content.items()},
        "x0_over_pivot_seconds": content["x0"]["seconds"] / content["pivot"]["seconds"],
        "batch2": {"one_by_one_s": one_by_one, "batched_s": batch_s,
                   "speedup": one_by_one / batch_s, "unet_evals_batched": batch_evals,
                   "x_T_mse_vs_single": _mse(batched[0].x_T, house.x_T)},
    }

    # concept: micro-steps sequential (default) and batched
    base = ConceptConfig(max_train_steps=concept_steps, reference_resolution=resolution)
    seq_s, (concept, concept_evals) = timed(
        lambda: evals(models, lambda: learn_concept(models, images["stripes"], base)))
    bat_s, fast_concept = timed(lambda: learn_concept(
        models, images["stripes"], base.model_copy(update={"batch_microsteps": True})))
    data["concept"] = {"updates": concept_steps, "sequential_s": seq_s, "batched_s": bat_s,
                       "speedup": seq_s / bat_s, "unet_evals": concept_evals,
                       "vectors_mse": _mse(fast_concept.vectors, concept.vectors)}

    # fusion: SDPA (default) vs explicit; shared B*; each fast option's fused latent MSE
    fast_s, (fused, fusion_evals) = timed(
        lambda: evals(models, lambda: fuse(models, house, [concept], FusionConfig())), repeats)
    slow_s, slow = timed(lambda: fuse(models, house, [concept],
                                      FusionConfig(attention_impl="explicit")), repeats)
    shared_s, _ = timed(lambda: fuse(models, house, [concept] * 3, FusionConfig()), repeats)
    with_batched_concept = fuse(models, house, [fast_concept], FusionConfig())
    with_batched_content = fuse(models, batched[0], [concept], FusionConfig())
    all_fast = fuse(models, batched[0], [fast_concept], FusionConfig())
    # the scale of a "different concept": the default path with another concept seed
    other_seed = learn_concept(models, images["stripes"], base.model_copy(update={"seed": 1}))
    with_other_seed = fuse(models, house, [other_seed], FusionConfig())
    data["fusion"] = {
        "sdpa_s": fast_s, "explicit_s": slow_s, "speedup_sdpa": slow_s / fast_s,
        "unet_evals": fusion_evals,
        "shared_3_s": shared_s, "separate_3_s": 3 * fast_s, "speedup_shared": 3 * fast_s / shared_s,
    }
    data["latent_mse_vs_defaults"] = {
        "attention_impl=explicit vs sdpa": _mse(slow.latents, fused.latents),
        "batch_microsteps": _mse(with_batched_concept.latents, fused.latents),
        "content_batch=2": _mse(with_batched_content.latents, fused.latents),
        "all fast options": _mse(all_fast.latents, fused.latents),
        "reference: concept seed 1 vs 0 (defaults)": _mse(with_other_seed.latents,
                                                          fused.latents),
    }
    data["latent_mse_note"] = ("batch_microsteps draws its flips, timesteps and noise in "
                               "another order (docs/fidelity.md): a different concept, so its "
                               "MSE is of the order of another seed's, not a rounding error")
    sec.data = data
    c, k, f = data["content"], data["concept"], data["fusion"]
    sec.row("content pivot / x0 s", f"{c['pivot']['seconds']:.2f} / {c['x0']['seconds']:.2f} "
            f"(iterations {c['pivot']['iterations']} / {c['x0']['iterations']})")
    sec.row("content 2 sources: one by one / batch s",
            f"{c['batch2']['one_by_one_s']:.2f} / {c['batch2']['batched_s']:.2f} "
            f"(x{c['batch2']['speedup']:.2f})")
    sec.row(f"concept {concept_steps} updates: seq / batched s",
            f"{seq_s:.2f} / {bat_s:.2f} (x{k['speedup']:.2f})")
    sec.row("fusion sdpa / explicit s", f"{fast_s:.3f} / {slow_s:.3f} (x{f['speedup_sdpa']:.2f})")
    sec.row("fusion 3 pairs shared B* / separate s",
            f"{shared_s:.3f} / {3 * fast_s:.3f} (x{f['speedup_shared']:.2f})")
    for name, value in data["latent_mse_vs_defaults"].items():
        sec.row(f"latent MSE {name}", f"{value:.3e}")
    sec.row("UNet evals content / concept / fusion",
            f"{c['pivot']['unet_evals']} / {concept_evals} / {fusion_evals}")
    return sec


def _peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def sd15(device: str, full: bool, steps: int = 2, concept_steps: int = 2,
         resolution: int = 128) -> Section:
    """Each stage once on the SD 1.5-architecture random model (benchmarks/sd15.py: the real
    UNet, VAE and text encoder shapes), so wall time per UNet evaluation and memory are the
    real model's. On the CPU at a reduced resolution and a few steps (``resolution`` px, T =
    ``steps``, ``concept_steps`` updates, one fit iteration); ``full`` (``--sd15``) runs the
    whole :func:`measure` on it instead (a GPU node). Peak RSS is the process's high-water
    mark after each stage (it includes the model and whatever ran before)."""
    from benchmarks.sd15 import build_sd15_model

    folder = str(build_sd15_model())
    if full:
        return measure(folder, device=device, label="sd15")
    sec = Section("sd15")
    models = load_models(folder, device=device)
    house = Image.open(ROOT / "manifests/images/house.png").convert("RGB")
    stripes = Image.open(ROOT / "manifests/images/stripes.png").convert("RGB")
    content_cfg = ContentConfig(num_inference_steps=steps, num_inner_steps=1,
                                resolution=resolution)
    concept_cfg = ConceptConfig(max_train_steps=concept_steps, gradient_accumulation_steps=1,
                                reference_resolution=resolution)
    data: dict = {"model": model_record(folder, models), "device": str(models.device),
                  "resolution": resolution,
                  "T": steps, "concept_updates": concept_steps,
                  "rss_after_load_mib": round(_peak_rss_mib(), 1), "stages": {}}
    runs = (("content", lambda: invert_content(models, house, content_cfg)),
            ("concept", lambda: learn_concept(models, stripes, concept_cfg)))
    results = {}
    for name, fn in runs:
        seconds, (results[name], used) = timed(lambda fn=fn: evals(models, fn))
        data["stages"][name] = {"seconds": seconds, "unet_evals": used,
                                "seconds_per_unet_eval": seconds / max(1, sum(used.values())),
                                "peak_rss_mib": round(_peak_rss_mib(), 1)}
    seconds, (_, used) = timed(lambda: evals(models, lambda: fuse(
        models, results["content"], [results["concept"]], FusionConfig())))
    data["stages"]["fusion"] = {"seconds": seconds, "unet_evals": used,
                                "seconds_per_unet_eval": seconds / max(1, sum(used.values())),
                                "peak_rss_mib": round(_peak_rss_mib(), 1)}
    sec.data = data
    for name, d in data["stages"].items():
        sec.row(f"sd15 {name} ({resolution} px)",
                f"{d['seconds']:.1f} s, {d['seconds_per_unet_eval']:.2f} s per UNet eval "
                f"{d['unet_evals']}, peak RSS {d['peak_rss_mib']:,.0f} MiB")
    return sec
