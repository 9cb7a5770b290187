"""Measure what the deliberate deviations change, on the tiny model (the numbers in
docs/fidelity.md): the identity-step skip, the SDPA fast path, the shared B*, batched content
fits and batched concept micro-steps. Not a test (minutes of CPU): run it by hand.

    PYTHONPATH=. python -m tests.golden.measure_deviations [--steps 50] [--inner 50]

Prints one JSON object per measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch

from tests.conftest import make_image as _picture  # the test pictures


def _iterations(result) -> list[int]:
    return list(result.stats.iterations)


def _max(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


def identity_step(models, steps: int, inner: int) -> None:
    from vct.config import ContentConfig
    from vct.content import invert_content

    for kind, size in ((0, (80, 64)), (2, (64, 96))):
        for label, kw in (("defaults", {}),
                          ("0.1+0.02s", {"early_stop_epsilon": 0.1, "early_stop_slope": 0.02})):
            runs = {}
            for skip in (True, False):
                before = sum(models.unet_evals.values())
                cfg = ContentConfig(num_inference_steps=steps, num_inner_steps=inner,
                                    skip_identity_step=skip, **kw)
                result = invert_content(models, _picture(kind, size), cfg)
                runs[skip] = (result, sum(models.unet_evals.values()) - before)
            (a, evals_a), (b, evals_b) = runs[True], runs[False]
            ia, ib = _iterations(a), _iterations(b)
            print(json.dumps({
                "measure": "identity step skip", "source": kind, "thresholds": label,
                "max_dx_T": _max(a.x_T, b.x_T), "max_abs_x_T": float(b.x_T.abs().max()),
                "max_dc": _max(a.embeddings, b.embeddings),
                "max_dz_final": _max(a.reconstruction[-1], b.reconstruction[-1]),
                "iteration_diffs": {s: ia[s] - ib[s] for s in range(steps) if ia[s] != ib[s]},
                "sum_iterations": [sum(ia), sum(ib)], "unet_evals": [evals_a, evals_b]}),
                flush=True)


def fast_paths(models, steps: int) -> None:
    from vct.concept import learn_concept
    from vct.config import ConceptConfig, ContentConfig, FusionConfig
    from vct.content import invert_content, invert_contents
    from vct.fusion import fuse

    cfg = ContentConfig(num_inference_steps=steps, num_inner_steps=10)
    sources = [_picture(0, (80, 64)), _picture(2, (64, 96))]
    content = invert_content(models, sources[0], cfg)
    reference = _picture(1, (64, 64))
    concept = learn_concept(models, reference, ConceptConfig(max_train_steps=20))
    fast = fuse(models, content, [concept], FusionConfig(), keep_trajectory=True)
    slow = fuse(models, content, [concept], FusionConfig(attention_impl="explicit"))
    shared = fuse(models, content, [concept, None], FusionConfig())
    print(json.dumps({"measure": "fusion", "sdpa_vs_explicit": _max(fast.latents, slow.latents),
                      "max_abs_latent": float(fast.latents.abs().max()),
                      "shared_b_star_vs_alone": _max(shared.latents[1], fast.latents[1]),
                      "b_star_vs_reconstruction": _max(fast.star_trajectory,
                                                       content.reconstruction)}), flush=True)
    alone = [content, invert_content(models, sources[1], cfg)]
    batched = invert_contents(models, sources, cfg)
    print(json.dumps({"measure": "batched content", "relative_dc": [
        float((b.embeddings - a.embeddings).norm() / a.embeddings.norm())
        for a, b in zip(alone, batched)],
        "max_dz": [_max(b.reconstruction, a.reconstruction) for a, b in zip(alone, batched)],
        "iteration_diffs": [sum(x != y for x, y in zip(_iterations(a), _iterations(b)))
                            for a, b in zip(alone, batched)]}), flush=True)
    seq = learn_concept(models, reference, ConceptConfig(max_train_steps=20))
    bat = learn_concept(models, reference, ConceptConfig(max_train_steps=20,
                                                         batch_microsteps=True))
    print(json.dumps({"measure": "batch_microsteps", "max_dv": _max(seq.vectors, bat.vectors),
                      "max_abs_v": float(seq.vectors.abs().max())}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--inner", type=int, default=50)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    from vct.models import load_models
    from vct.tiny_model import build_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        models = load_models(str(build_tiny_model(Path(tmp) / "tiny", seed=0)), device="cpu")
        identity_step(models, args.steps, args.inner)
        fast_paths(models, args.steps)


if __name__ == "__main__":
    main()
