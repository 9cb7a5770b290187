"""Regenerate `original_tiny.safetensors`: what the ORIGINAL VCT code computes on the tiny model.

Why: every other fidelity test compares vct with formulas we wrote down ourselves; this fixture
is the one place where the reference numbers come from the authors' code itself, run once on
the tiny random model. `tests/test_original_golden.py` compares vct at its defaults with it.
None of the original's code is in this repository, only the numbers it produced.

How to run (minutes of CPU, outside `make test`; nothing here needs a GPU or the network
beyond the two installs):

1. The original's code, commit 8a65252 of github.com/CrystalNeuro/visual-concept-translator,
   in a folder of its own outside the checkout, e.g.
   `git clone https://github.com/CrystalNeuro/visual-concept-translator /tmp/vct-original`
   then `git -C /tmp/vct-original checkout 8a65252`.
2. An old virtual environment outside the checkout, every pin in ONE pip command (otherwise
   pip picks a CUDA torch or a numpy 2 the old packages cannot load)::

       python3.11 -m venv /tmp/orig-venv
       /tmp/orig-venv/bin/pip install "torch==2.13.0" diffusers==0.10.1 \\
           transformers==4.26.1 accelerate==0.15.0 tokenizers==0.13.3 \\
           huggingface_hub==0.12.1 "numpy<2" pillow safetensors

   torchvision is not installed (it does not import with torch 2.13): `old_side.py` supplies
   a stand-in for the one thing the original uses from it, `RandomHorizontalFlip`, and one for
   `datasets`, which it only uses to set log levels.
3. From the checkout root, with the project venv::

       PYTHONPATH=. .venv/bin/python -m tests.golden.original.regenerate \\
           --original /tmp/vct-original --old-python /tmp/orig-venv/bin/python

   `--check` recomputes everything and prints the differences from the stored file without
   writing it.

What it does: builds the tiny model (`build_tiny_model(dir, seed=0)`), converts it to the
layout diffusers 0.10 / transformers 4.26 load (`old_side.py convert`), checks that every
component gives the same outputs in both environments on fixed inputs (max |diff| <= 1e-6, same
token ids, same timestep grid), then runs a patched temporary copy of the original
(`old_side.py run`: `.to("cuda")` -> `.to("cpu")`, its hard-coded 512 px -> 64 px, nothing
else) with the README's settings except 100 concept updates: n = 3, initializer "girl", L1 on,
injection ratios 0.2 / 0.9, seed 0, one torch thread. The source and reference are
`tests.golden.make_golden.source_image()` / `reference_image()`. The fixture stores the inputs,
x_T, the DDIM inversion latents, the 50 per-step content embeddings, the fit's per-step
iteration counts, the timestep grid the original's scheduler actually ran, the concept vectors,
the final latents and the final image, with a JSON header (settings, versions, the original's
commit and file digests, the patches, the parity numbers, the tiny model's weight digest).
Only safetensors and JSON are written into the repository.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

FIXTURE = Path(__file__).with_name("original_tiny.safetensors")
OLD_SIDE = Path(__file__).with_name("old_side.py")
ORIGINAL_COMMIT = "8a65252"
ORIGINAL_REPO = "github.com/CrystalNeuro/visual-concept-translator"
SETTINGS = {"max_train_steps": 100, "num_vectors": 3, "initializer": "girl", "seed": 0,
            "resolution": 64, "use_l1": True, "cross_attention_injection_ratio": 0.2,
            "self_attention_injection_ratio": 0.9, "num_inference_steps": 50, "threads": 1}
PARITY_PROMPTS = ["", "girl", "a painting of a girl"]
# float32: the VAE decoder's outputs reach 2.5 and its attention kernels differ between the
# two diffusers versions (measured 4.2e-6 there, <= 1e-6 elsewhere). float64: the same math to
# 1e-15, except that diffusers 0.10's VAE AttentionBlock computes its softmax in float32
# (`softmax(scores.float())`) even in a float64 model, hence a float32-sized bound there.
PARITY_ATOL = {"float32": 1e-5, "float64": 1e-12}
PARITY_ATOL_VAE64 = 1e-6


def _old(python: str, *args: str) -> str:
    """Run old_side.py in the old venv, one thread, no project code on its path."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1")
    done = subprocess.run([python, str(OLD_SIDE), *args], env=env, cwd=tempfile.gettempdir(),
                          capture_output=True, text=True)
    if done.returncode:
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-8000:])
        raise SystemExit(f"old_side.py {args[0]} failed ({done.returncode})")
    return done.stdout


@torch.no_grad()
def component_outputs(models, x: dict[str, torch.Tensor], dtype: torch.dtype) -> dict:
    """UNet, VAE encode/decode, scheduler and text encoder of the project venv on inputs x."""
    from vct.ddim import make_scheduler

    unet, vae, text = (copy.deepcopy(m).to(dtype) for m in
                       (models.unet, models.vae, models.text_encoder))
    x = {k: v.to(dtype) if v.is_floating_point() else v for k, v in x.items()}
    sched = make_scheduler(models.scheduler_config, 50, 1)
    dist = vae.encode(x["image"]).latent_dist
    out = {"unet": unet(x["z"], 500, encoder_hidden_states=x["states"]).sample,
           "vae_decode": vae.decode(x["latent"]).sample, "vae_mean": dist.mean,
           "vae_std": dist.std, "alphas_cumprod": sched.alphas_cumprod,
           "timesteps": sched.timesteps.to(torch.int64)}
    for i, prompt in enumerate(PARITY_PROMPTS):
        ids = models.tokenizer(prompt, padding="max_length", max_length=models.max_length,
                               truncation=True, return_tensors="pt").input_ids
        out[f"ids_{i}"] = ids.to(torch.int64)
        out[f"text_{i}"] = text(ids)[0]
    return out


def parity(models, old_dir: Path, python: str, tmp: Path) -> dict[str, dict[str, float]]:
    """Max |diff| of every component between the project venv and the old venv, in float32
    (what both runs use: kernels round differently, e.g. the VAE's attention) and in float64
    (the same math: differences at the 1e-15 level). Same token ids and grid in both."""
    from safetensors.torch import load_file, save_file

    gen = torch.Generator().manual_seed(1)
    x = {"z": torch.randn(2, 4, 8, 8, generator=gen), "t": torch.tensor(500),
         "states": torch.randn(2, 77, 32, generator=gen),
         "latent": torch.randn(1, 4, 8, 8, generator=gen),
         "image": torch.rand(1, 3, 64, 64, generator=gen) * 2 - 1}
    save_file(x, str(tmp / "parity_in.safetensors"),
              metadata={"prompts": json.dumps(PARITY_PROMPTS)})
    result = {}
    for dtype, atol in PARITY_ATOL.items():
        _old(python, "parity", str(old_dir), str(tmp / "parity_in.safetensors"),
             str(tmp / "parity_out.safetensors"), dtype)
        old = load_file(str(tmp / "parity_out.safetensors"))
        new = component_outputs(models, x, getattr(torch, dtype))
        diffs = {k: float((new[k].double() - old[k].double()).abs().max()) for k in new}
        print(json.dumps({dtype: diffs}), flush=True)
        bad = {k: v for k, v in diffs.items()
               if v > (PARITY_ATOL_VAE64 if dtype == "float64" and k.startswith("vae") else atol)}
        if bad:
            raise SystemExit(f"old and new components disagree in {dtype} (bound {atol}): {bad}")
        result[dtype] = diffs
    return result


def regenerate(original: Path, python: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Everything the fixture holds, computed afresh."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from tests.golden.make_golden import reference_image, source_image, weights_digest
    from vct.models import load_models
    from vct.tiny_model import build_tiny_model

    with tempfile.TemporaryDirectory(prefix="vct-golden-original-") as name:
        tmp = Path(name)
        new_dir = build_tiny_model(tmp / "tiny", seed=0)
        old_dir = tmp / "tiny-old"
        conversion = json.loads(_old(python, "convert", str(new_dir), str(old_dir))
                                .strip().splitlines()[-1])
        models = load_models(str(new_dir), device="cpu")
        torch.set_num_threads(1)
        diffs = parity(models, old_dir, python, tmp)
        source, reference = source_image(), reference_image()
        source.save(tmp / "source.png")
        reference.save(tmp / "reference.png")
        s = SETTINGS
        _old(python, "run", "--original", str(original), "--model", str(old_dir),
             "--source", str(tmp / "source.png"), "--reference", str(tmp / "reference.png"),
             "--out", str(tmp / "run.safetensors"), "--initializer", s["initializer"],
             "--max_train_steps", str(s["max_train_steps"]),
             "--num_vectors", str(s["num_vectors"]), "--seed", str(s["seed"]),
             "--resolution", str(s["resolution"]))
        tensors = load_file(str(tmp / "run.safetensors"))
        with safe_open(str(tmp / "run.safetensors"), framework="pt") as f:
            run_meta = json.loads(f.metadata()["original_run"])
        digest = weights_digest(models)
    tensors["source"] = torch.from_numpy(np.array(source))
    tensors["reference"] = torch.from_numpy(np.array(reference))
    it = tensors["iterations"].tolist()
    meta = {"settings": SETTINGS, "original": {"repo": ORIGINAL_REPO, "commit": ORIGINAL_COMMIT,
                                               **run_meta},
            "tiny_model_seed": 0, "weights_sha256": digest, "conversion": conversion,
            "parity_max_abs_diff": diffs, "iterations": it, "total_iterations": sum(it),
            "made_by": "python -m tests.golden.original.regenerate"}
    return tensors, meta


def read() -> tuple[dict[str, torch.Tensor], dict]:
    """The stored fixture and its JSON header."""
    from tests.golden.make_golden import read_fixture

    return read_fixture(FIXTURE, "vct_original_golden")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--original", type=Path, required=True,
                        help=f"checkout of {ORIGINAL_REPO} at {ORIGINAL_COMMIT}")
    parser.add_argument("--old-python", required=True, help="python of the old venv")
    parser.add_argument("--check", action="store_true", help="compare, do not write")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from safetensors.torch import save_file

    tensors, meta = regenerate(args.original.resolve(), args.old_python)
    if args.check:
        old, _ = read()
        worst = {k: float((tensors[k].double() - old[k].double()).abs().max()) for k in old}
        print(json.dumps({"max_abs_diff": worst}, indent=1))
        return 0
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(FIXTURE),
              metadata={"vct_original_golden": json.dumps(meta, sort_keys=True)})
    print(f"wrote {FIXTURE} ({FIXTURE.stat().st_size} bytes); total fit iterations "
          f"{meta['total_iterations']}, steps_offset {meta['original']['steps_offset']}, "
          f"timesteps {tensors['timesteps'][:2].tolist()}..{tensors['timesteps'][-1:].tolist()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
