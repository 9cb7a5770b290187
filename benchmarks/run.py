"""Benchmarks, run on demand (`make bench`): each prints ratios measured side by side in one run.

- fusion: SDPA fast path vs explicit attention probabilities (same outputs within tolerance)
- concept: accumulation micro-steps batched vs sequential
- content: target 'pivot' (the code) vs 'x0' (the article's reading): time, iterations,
  reconstruction error
Every line also reports UNet sample-evaluations per stage. Default: the tiny model on CPU;
`--model DIR --device cuda` measures at SD 1.5 scale.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from vct.concept import learn_concept  # noqa: E402
from vct.config import ConceptConfig, ContentConfig, FusionConfig  # noqa: E402
from vct.content import invert_content, invert_contents  # noqa: E402
from vct.fusion import fuse  # noqa: E402
from vct.models import load_models  # noqa: E402
from vct.tiny_model import build_tiny_model  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def timed(fn, repeats: int = 1):
    """Best of `repeats` wall times (seconds) and the last result."""
    best, result = float("inf"), None
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best, result


def evals(models, fn):
    """fn's result and the UNet evaluations the counting wrapper saw during it."""
    before = dict(models.unet_evals)
    result = fn()
    return result, {k: v - before.get(k, 0) for k, v in models.unet_evals.items()
                    if v != before.get(k, 0)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="SD 1.x folder (default: tiny model)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--steps", type=int, default=50, help="T for content and fusion")
    parser.add_argument("--concept-steps", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    model = args.model or str(build_tiny_model(ROOT / ".models" / "tiny-model-seed0"))
    models = load_models(model, device=args.device)
    source = Image.open(ROOT / "manifests/images/house.png").convert("RGB")
    reference = Image.open(ROOT / "manifests/images/stripes.png").convert("RGB")
    print(f"model {model} on {models.device}, T={args.steps}")

    content_cfg = ContentConfig(num_inference_steps=args.steps)
    rows = []
    for target in ("pivot", "x0"):
        cfg = content_cfg.model_copy(update={"content_target": target})
        seconds, (result, used) = timed(
            lambda c=cfg: evals(models, lambda: invert_content(models, source, c)))
        err = float(((result.reconstruction[-1] - result.inversion_latents[0]) ** 2).mean())
        rows.append((target, seconds, result))
        print(f"content[{target}]: {seconds:.2f}s, sum J_s={result.stats.total_iterations}, "
              f"recon mse={err:.3e}, unet evals={used}")
    print(f"content x0/pivot time ratio: {rows[1][1] / rows[0][1]:.2f}")
    content = rows[0][2]
    tree = Image.open(ROOT / "manifests/images/tree.png").convert("RGB")
    one_s, _ = timed(lambda: [invert_content(models, img, content_cfg) for img in (source, tree)])
    two_s, _ = timed(lambda: invert_contents(models, [source, tree], content_cfg))
    print(f"content, 2 sources: one by one {one_s:.2f}s, batched {two_s:.2f}s, "
          f"speed-up x{one_s / two_s:.2f}")

    base = ConceptConfig(max_train_steps=args.concept_steps)
    seq_s, (concept, concept_evals) = timed(
        lambda: evals(models, lambda: learn_concept(models, reference, base)))
    bat_s, _ = timed(lambda: learn_concept(
        models, reference, base.model_copy(update={"batch_microsteps": True})))
    print(f"concept {args.concept_steps} updates: sequential {seq_s:.2f}s, batched {bat_s:.2f}s, "
          f"speed-up x{seq_s / bat_s:.2f} (UNet fwd+bwd: {concept_evals})")

    fast_s, (fast, fusion_evals) = timed(
        lambda: evals(models, lambda: fuse(models, content, [concept], FusionConfig())),
        args.repeats)
    slow_s, slow = timed(lambda: fuse(models, content, [concept],
                                      FusionConfig(attention_impl="explicit")), args.repeats)
    diff = float((fast.latents - slow.latents).abs().max())
    print(f"fusion: sdpa {fast_s:.3f}s, explicit {slow_s:.3f}s, speed-up x{slow_s / fast_s:.2f}, "
          f"max |diff| {diff:.1e}, unet evals {fusion_evals}")
    shared_s, _ = timed(lambda: fuse(models, content, [concept, concept, concept],
                                     FusionConfig()), args.repeats)
    print(f"fusion, 3 pairs sharing B*: {shared_s:.3f}s vs 3 separate runs {3 * fast_s:.3f}s, "
          f"speed-up x{3 * fast_s / shared_s:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
