"""GPU readiness: each stage at SD 1.5 scale in fp32 / fp16 / bf16, with and without SDPA.

    make bench-gpu                                  # on a CUDA node: python -m benchmarks.gpu
    python -m benchmarks.gpu --device cpu --size 64 --quick --model tiny   # CPU rehearsal

For every precision and attention path it runs concept (S3), content (S1+S2) and fusion (S4)
with reduced steps on the SD 1.5-architecture random model (`benchmarks/sd15.py`, built offline
into VCT_HOME on first use) at 512 px, and records per stage: wall seconds, UNet evaluations
(counted by `VCTModels.eps`), seconds per evaluation, peak GPU memory
(`torch.cuda.max_memory_allocated`) and the difference of its output from the fp32 run with
the same attention path. Every stage of every precision starts from the same fp32 inputs (the
fusion from the fp32 content and concept), so a difference is that stage's own. Results go to
`benchmarks/results-gpu.json` (rewritten after every row, so a cut run keeps what it measured)
and a table is printed.

SDPA on: diffusers' AttnProcessor2_0 in concept and content, `attention_impl="sdpa"` in
fusion. SDPA off: diffusers' classic AttnProcessor, `attention_impl="explicit"` in fusion.
On the CPU, bf16 runs through the explicit opt-in of `load_models` and fp16 is skipped (it
needs CUDA). `--device cuda` on a machine without CUDA fails at once with exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python benchmarks/gpu.py` as well as `python -m`
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from vct.errors import UserError  # noqa: E402
from vct.models import resolve_device  # noqa: E402

DTYPES = ("fp32", "fp16", "bf16")
ATTENTION = {"sdpa": "sdpa", "nosdpa": "explicit"}
STAGES = ("concept", "content", "fusion")


def parse(argv: list[str] | None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default cuda)")
    p.add_argument("--model", default="sd15",
                   help="sd15 (the SD 1.5-architecture random model), tiny, or a folder")
    p.add_argument("--size", type=int, default=512, help="working resolution in pixels")
    p.add_argument("--dtypes", default=None,
                   help="comma list of fp32,fp16,bf16 (default: all on CUDA, fp32,bf16 on CPU)")
    p.add_argument("--attention", default="sdpa,nosdpa", help="comma list of sdpa,nosdpa")
    p.add_argument("--quick", action="store_true",
                   help="tiny step counts (a smoke run: 1 concept update, T=3, 2 fit iterations)")
    p.add_argument("--concept-steps", type=int, default=None, help="concept updates (default 5)")
    p.add_argument("--steps", type=int, default=None, help="T of content and fusion (default 10)")
    p.add_argument("--inner-steps", type=int, default=None,
                   help="content fit iterations per step (default 5)")
    p.add_argument("--deadline-s", type=float, default=450.0,
                   help="stop starting new rows after this many seconds (default 450)")
    p.add_argument("--output", default=str(ROOT / "benchmarks" / "results-gpu.json"))
    args = p.parse_args(argv)
    quick = args.quick
    args.concept_steps = args.concept_steps or (1 if quick else 5)
    args.steps = args.steps or (3 if quick else 10)
    args.inner_steps = args.inner_steps or (2 if quick else 5)
    return args


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def model_folder(spec: str) -> str:
    if spec == "sd15":
        from benchmarks.sd15 import build_sd15_model

        return str(build_sd15_model())
    if spec == "tiny":
        from vct.batch.engine import tiny_model_folder

        return tiny_model_folder()
    return spec


def set_sdpa(models, on: bool) -> None:
    """diffusers' SDPA processors, or its classic ones (explicit softmax(QK^T) V)."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    models.unet.set_attn_processor(AttnProcessor2_0() if on else AttnProcessor())


def warm_up(models, size: int) -> None:
    """One UNet forward+backward at the working size outside the measurements (kernel
    selection, lazy CUDA initialisation)."""
    from vct.text import encode_prompt

    h = size // models.vae_scale_factor
    z = torch.randn(1, 4, h, h, device=models.device)
    e = encode_prompt(models, "").requires_grad_(True)
    models.eps(z, 500, e, stage="warmup", grad=True).sum().backward()
    sync(models.device)


def measure(models, fn, *args):
    """fn(models, *args): its result, wall seconds, the UNet evaluations it made, its peak GPU
    memory."""
    dev = models.device
    before = dict(models.unet_evals)
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    sync(dev)
    start = time.perf_counter()
    result = fn(models, *args)
    sync(dev)
    seconds = time.perf_counter() - start
    evals = {k: v - before.get(k, 0) for k, v in models.unet_evals.items()
             if v != before.get(k, 0)}
    peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None
    return result, seconds, evals, peak


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64 (nan when either is not finite)."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def outputs(stage: str, result) -> dict:
    """The tensors of a stage result that its difference is measured on."""
    if stage == "concept":
        return {"vectors": result.vectors}
    if stage == "content":
        return {"x_T": result.x_T, "embeddings": result.embeddings}
    return {"latents": result.latents, "images": torch.from_numpy(result.images)}


def differences(stage: str, result, reference) -> dict:
    if reference is None:
        return {}
    got, ref = outputs(stage, result), outputs(stage, reference)
    out = {}
    for name in got:
        if name == "images":
            out["image_mean_abs_levels"] = float(
                (got[name].float() - ref[name].float()).abs().mean())
        else:
            out[f"{name}_rel"] = rel(got[name], ref[name])
    return out


def finite(stage: str, result) -> bool:
    return all(bool(torch.isfinite(t.float()).all()) for t in outputs(stage, result).values())


def write(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1) + "\n")
    os.replace(tmp, path)


def table(rows: list[dict]) -> str:
    head = (f"{'dtype':5} {'attn':6} {'stage':7} {'s':>7} {'evals':>6} {'ms/eval':>8} "
            f"{'peak MiB':>9}  diff vs fp32")
    lines = [head, "-" * len(head)]
    for r in rows:
        peak = f"{r['peak_mem_bytes'] / 2**20:9.0f}" if r["peak_mem_bytes"] else f"{'-':>9}"
        diff = ", ".join(f"{k} {v:.2e}" for k, v in r["diff_vs_fp32"].items()) or "(reference)"
        if not r["finite"]:
            diff += "  NOT FINITE"
        lines.append(f"{r['dtype']:5} {r['attention']:6} {r['stage']:7} {r['seconds']:7.2f} "
                     f"{r['evals']:6d} {1e3 * r['s_per_eval']:8.1f} {peak}  {diff}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    try:  # before anything slow: a missing CUDA is one line, never a hang
        device = resolve_device(args.device)
    except UserError as exc:
        print(f"benchmarks/gpu.py: {exc}", file=sys.stderr)
        return 2
    if device.type not in ("cuda", "cpu"):
        print(f"benchmarks/gpu.py: --device {args.device}: only cuda or cpu", file=sys.stderr)
        return 2
    dtypes = args.dtypes.split(",") if args.dtypes else (
        list(DTYPES) if device.type == "cuda" else ["fp32", "bf16"])
    attention = args.attention.split(",")
    bad = [d for d in dtypes if d not in DTYPES] + [a for a in attention if a not in ATTENTION]
    if bad or "fp32" not in dtypes:
        print(f"benchmarks/gpu.py: unknown {bad} or no fp32 (the reference) in --dtypes",
              file=sys.stderr)
        return 2
    if device.type != "cuda" and "fp16" in dtypes:
        print("benchmarks/gpu.py: fp16 needs CUDA; skipped on the CPU", file=sys.stderr)
        dtypes = [d for d in dtypes if d != "fp16"]
    dtypes = ["fp32"] + [d for d in dtypes if d != "fp32"]  # the reference first

    from vct.concept import learn_concept
    from vct.config import ConceptConfig, ContentConfig, FusionConfig
    from vct.content import invert_content
    from vct.fusion import fuse
    from vct.models import load_models

    begin = time.perf_counter()
    folder = model_folder(args.model)
    build_s = time.perf_counter() - begin
    source = Image.open(ROOT / "manifests/images/house.png").convert("RGB")
    reference = Image.open(ROOT / "manifests/images/stripes.png").convert("RGB")
    concept_cfg = ConceptConfig(max_train_steps=args.concept_steps,
                                reference_resolution=args.size)
    content_cfg = ContentConfig(num_inference_steps=args.steps, num_inner_steps=args.inner_steps,
                                resolution=args.size)
    meta = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__, "model": args.model, "folder": Path(str(folder)).name, "size": args.size,
        "concept_steps": args.concept_steps, "T": args.steps, "inner_steps": args.inner_steps,
        "threads": torch.get_num_threads(), "model_build_or_find_s": round(build_s, 2),
        "tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32,
                 "cudnn": torch.backends.cudnn.allow_tf32},
        "inputs": "every stage starts from the fp32 run's inputs; diff = ||x - x_fp32|| / "
                  "||x_fp32|| (rel), or the mean |difference| of the uint8 images (levels)",
    }
    payload = {"meta": meta, "rows": [], "complete": False}
    out_path = Path(args.output)
    refs: dict[tuple[str, str], object] = {}  # (attention, stage) -> the fp32 result
    inputs: dict[str, object] = {}  # the fp32 (sdpa) content and concept fusion starts from
    print(f"model {folder} ({args.model}) on {device}, {args.size} px, concept "
          f"{args.concept_steps} updates, T={args.steps}, {args.inner_steps} fit iterations; "
          f"{', '.join(dtypes)} x {', '.join(attention)}", flush=True)
    cut = False
    for dtype in dtypes:
        if time.perf_counter() - begin > args.deadline_s:
            cut = True
            break
        t0 = time.perf_counter()
        models = load_models(folder, device=str(device), dtype=dtype,
                             allow_cpu_bf16=device.type == "cpu")
        load_s = time.perf_counter() - t0
        for attn in attention:
            set_sdpa(models, attn == "sdpa")
            warm_up(models, args.size)
            fusion_cfg = FusionConfig(attention_impl=ATTENTION[attn])
            for stage in STAGES:
                if time.perf_counter() - begin > args.deadline_s:
                    cut = True
                    break
                if stage == "concept":
                    fn, fn_args = learn_concept, (reference, concept_cfg)
                elif stage == "content":
                    fn, fn_args = invert_content, (source, content_cfg)
                else:
                    fn, fn_args = fuse, (inputs["content"], [inputs["concept"]], fusion_cfg)
                result, seconds, evals, peak = measure(models, fn, *fn_args)
                if dtype == "fp32":
                    refs[(attn, stage)] = result
                    inputs.setdefault(stage, result)
                n = sum(evals.values())
                row = {"dtype": dtype, "attention": attn, "stage": stage,
                       "seconds": round(seconds, 4), "unet_evals": evals, "evals": n,
                       "s_per_eval": seconds / max(n, 1), "peak_mem_bytes": peak,
                       "load_s": round(load_s, 2), "finite": finite(stage, result),
                       "diff_vs_fp32": differences(stage, result, refs.get((attn, stage))
                                                   if dtype != "fp32" else None)}
                payload["rows"].append(row)
                write(out_path, payload)
                print(table([row]).splitlines()[-1], flush=True)
        models = None  # free this precision's weights before loading the next
        if device.type == "cuda":
            torch.cuda.empty_cache()
    payload["complete"] = not cut
    payload["meta"]["total_s"] = round(time.perf_counter() - begin, 2)
    write(out_path, payload)
    print()
    print(table(payload["rows"]))
    print(f"\n{'complete' if not cut else 'CUT at the deadline'} in "
          f"{payload['meta']['total_s']:.0f} s; results in {out_path}")
    return 0 if not cut else 1


if __name__ == "__main__":
    sys.exit(main())
