"""`make quality`: VCT against img2img and text-to-image on held-out procedural pairs, scored
against the exactly rendered ideal translation (docs/quality.md defines every score).

The set is fixed: held-out sources and references of the procedural generator, each source
paired with references that differ from it in shape, colour and fill (so neither "return the
source" nor "return the reference" can score well). Every method runs on the same model with
the same DDIM sampler (T, w, grid) and the same seeds:

- vct: learn_concept + invert_contents + fuse, at a named preset (`vct/mini/presets.py`);
- sdedit-0.5 / sdedit-0.8: img2img from the source at two strengths, prompted with the
  reference's caption (which names the target colour, fill and background exactly);
- t2i-concept: text-to-image from the learned concept's prompt alone;
- ablations of VCT: attention injection off, content embeddings replaced by the source
  caption's text states, the cross-attention reweight on the concept's own columns or off,
  1 concept vector instead of 3;
- calibration rows: the source unchanged, and the ideal itself through the VAE (the best any
  method that decodes latents can score).

It also measures what the model itself can do: the classifier's accuracy on text-to-image
samples of held-out captions. Writes benchmarks/quality.json, docs/quality-sheet.png and the
table block of docs/quality.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from vct import baselines as B  # noqa: E402
from vct.concept import ConceptResult, learn_concept  # noqa: E402
from vct.config import ConceptConfig, ContentConfig, FusionConfig  # noqa: E402
from vct.content import ContentResult, invert_contents  # noqa: E402
from vct.ddim import guided_step, make_scheduler  # noqa: E402
from vct.fusion import decode, fuse  # noqa: E402
from vct.inversion import encode_source  # noqa: E402
from vct.mini import classifier as C  # noqa: E402
from vct.mini import data as D  # noqa: E402
from vct.mini import metrics as M  # noqa: E402
from vct.mini.presets import settings as preset_settings  # noqa: E402
from vct.models import VCTModels, load_models  # noqa: E402
from vct.text import encode_concept, encode_prompt  # noqa: E402

RESULTS = ROOT / "benchmarks" / "quality.json"
SHEET = ROOT / "docs" / "quality-sheet.png"
DOC = ROOT / "docs" / "quality.md"
TABLE_START, TABLE_END = "<!-- quality-table:start -->", "<!-- quality-table:end -->"
SOURCE_START = D.HELDOUT_START
REFERENCE_START = D.HELDOUT_START + 10_000
CAPTION_START = D.HELDOUT_START + 20_000
SDEDIT_STRENGTHS = (0.5, 0.8)
METHODS = ("vct", "sdedit-0.5", "sdedit-0.8", "t2i-concept")
ABLATIONS = ("vct-no-injection", "vct-caption-content", "vct-reweight-concept-tokens",
             "vct-no-reweight", "vct-1-vector")
CALIBRATION = ("source-unchanged", "ideal-via-vae")
SCORES = ("psnr", "ssim", "edge_corr", "mask_iou", "color_dist", "texture_dist",
          "cls_shape", "cls_color", "cls_fill", "cls_background", "cls_all")


def differs(src: D.Params, ref: D.Params) -> bool:
    """A usable pair: the reference has another shape, colour and fill than the source."""
    return src.shape != ref.shape and src.color != ref.color and src.fill != ref.fill


def pair_set(sources: int, per_source: int, references: int
             ) -> tuple[list[D.Params], list[D.Params], list[tuple[int, int]]]:
    """Held-out sources and references, and (source, reference) index pairs: source i takes
    the first `per_source` references, cycling from reference i, that differ from it."""
    refs = [D.params_for(i) for i in range(REFERENCE_START, REFERENCE_START + references)]
    srcs: list[D.Params] = []
    pairs: list[tuple[int, int]] = []
    index = SOURCE_START
    while len(srcs) < sources:
        src = D.params_for(index)
        index += 1
        k = len(srcs)
        picks = [j % references for j in range(k, k + references)
                 if differs(src, refs[j % references])][:per_source]
        if len(picks) < per_source:
            continue
        pairs += [(k, j) for j in picks]
        srcs.append(src)
    return srcs, refs, pairs


def score(output: np.ndarray, src: D.Params, ref: D.Params, pred: dict[str, str]) -> dict:
    """Every score of one output (uint8 64 x 64 x 3) of the pair (src, ref)."""
    ideal = np.asarray(D.ideal_translation(src, ref))
    src_img, ref_img = np.asarray(D.render(src)), np.asarray(D.render(ref))
    out = {
        "psnr": M.psnr(output, ideal),
        "ssim": M.ssim(output, ideal),
        "edge_corr": M.edge_correlation(output, src_img),
        "mask_iou": M.mask_iou(output, D.shape_mask(src)),
        "color_dist": M.color_distance(output, ref_img),
        "texture_dist": M.texture_distance(output, ref_img),
        "cls_shape": float(pred["shape"] == src.shape),
        "cls_color": float(pred["color"] == ref.color),
        "cls_fill": float(pred["fill"] == ref.fill),
        "cls_background": float(pred["background"] == ref.background),
    }
    out["cls_all"] = float(out["cls_shape"] and out["cls_color"] and out["cls_fill"])
    return out


def score_all(net, outputs: np.ndarray, srcs, refs, pairs) -> dict:
    """Mean of every score over the pairs, plus the per-pair rows."""
    preds = C.predict(net, outputs)
    rows = []
    for n, (i, j) in enumerate(pairs):
        rows.append(score(outputs[n], srcs[i], refs[j], {k: preds[k][n] for k in C.HEADS}))
    means = {k: float(np.mean([r[k] for r in rows])) for k in SCORES}
    return {"mean": means, "pairs": rows}


# ---------------------------------------------------------------- the methods
def concepts_for(models: VCTModels, refs, used: list[int], cfg: ConceptConfig, log
                 ) -> tuple[dict[int, ConceptResult], float]:
    start = time.perf_counter()
    out = {}
    for j in used:
        out[j] = learn_concept(models, D.render(refs[j]), cfg)
        log(f"  concept {j} (n={cfg.num_vectors}): {out[j].stats.seconds['concept']:.1f} s, "
            f"last loss {np.mean(out[j].stats.losses[-20:]):.4f}")
    return out, time.perf_counter() - start


def contents_for(models: VCTModels, srcs, cfg: ContentConfig, batch: int, log
                 ) -> tuple[list[ContentResult], float]:
    start = time.perf_counter()
    out: list[ContentResult] = []
    for k in range(0, len(srcs), batch):
        out += invert_contents(models, [D.render(p) for p in srcs[k:k + batch]], cfg)
        log(f"  contents {k}..{min(k + batch, len(srcs)) - 1}: "
            f"{time.perf_counter() - start:.1f} s so far")
    return out, time.perf_counter() - start


@torch.no_grad()
def trajectory_under(models: VCTModels, content: ContentResult, embeddings: torch.Tensor,
                     cfg: ContentConfig) -> torch.Tensor:
    """B*'s latents (T+1, 4, h, w) from the source's x_T with `embeddings` as its per-step
    c_s: the content fit's advance, guided from c_s towards the inversion prompt. With the
    fit's own embeddings it is the fit's stored reconstruction."""
    sched = make_scheduler(models.scheduler_config, cfg.num_inference_steps, cfg.steps_offset)
    e_null = encode_prompt(models, cfg.inversion_prompt)
    z = content.x_T.to(models.device)
    path = [z]
    for s, t in enumerate(int(t) for t in sched.timesteps):
        c_s = embeddings[s:s + 1].to(models.device)
        z = guided_step(sched, z, models.eps(z, t, c_s, stage="content"),
                        models.eps(z, t, e_null, stage="content"), cfg.guidance_scale, t)
        path.append(z)
    return torch.cat(path).cpu()


def caption_content(models: VCTModels, content: ContentResult, src: D.Params,
                    cfg: ContentConfig) -> ContentResult:
    """The ablation: every fitted c_s replaced by the source caption's text states, wherever
    fusion uses them. B_k's negative slot reads the embeddings; B* replays the stored
    reconstruction, so that is rerun under the caption too (else B* would still lend the
    fitted source's attention)."""
    states = encode_prompt(models, D.caption(src)).cpu()
    embeddings = states.expand(content.embeddings.shape[0], -1, -1).clone()
    return replace(content, embeddings=embeddings,
                   reconstruction=trajectory_under(models, content, embeddings, cfg))


def fuse_pairs(models, contents, concepts, pairs, cfg: FusionConfig, *, control: bool = True,
               content_fn=None) -> tuple[np.ndarray, float]:
    """Fuse every pair, one batched call per source (its concepts side by side)."""
    start = time.perf_counter()
    images: dict[int, np.ndarray] = {}
    for i in sorted({i for i, _ in pairs}):
        members = [(n, j) for n, (s, j) in enumerate(pairs) if s == i]
        content = contents[i] if content_fn is None else content_fn(i)
        result = fuse(models, content, [concepts[j] for _, j in members], cfg, control=control)
        for (n, _), img in zip(members, result.images):
            images[n] = img
    return np.stack([images[n] for n in range(len(pairs))]), time.perf_counter() - start


def run_baselines(models, srcs, refs, concepts, pairs, content_cfg: ContentConfig
                  ) -> dict[str, tuple[np.ndarray, float]]:
    """img2img at each strength with the reference caption, and text-to-image from the
    concept's prompt alone; seed = the pair's index."""
    kw = {"num_steps": content_cfg.num_inference_steps,
          "guidance": content_cfg.guidance_scale, "steps_offset": content_cfg.steps_offset}
    out = {}
    for strength in SDEDIT_STRENGTHS:
        start = time.perf_counter()
        imgs = [B.sdedit(models, D.render(srcs[i]), encode_prompt(models, D.caption(refs[j])),
                         strength, seed=n, **kw)[0] for n, (i, j) in enumerate(pairs)]
        out[f"sdedit-{strength}"] = (np.stack(imgs), time.perf_counter() - start)
    start = time.perf_counter()
    imgs = [B.text_to_image(models, encode_concept(models, concepts[j].vectors), seed=n,
                            **kw)[0] for n, (_, j) in enumerate(pairs)]
    out["t2i-concept"] = (np.stack(imgs), time.perf_counter() - start)
    return out


@torch.no_grad()
def through_vae(models: VCTModels, images: list[Image.Image]) -> np.ndarray:
    """Encode and decode: what the VAE alone does to an image."""
    return np.concatenate([decode(models, encode_source(models, im, None)) for im in images])


def caption_samples(models: VCTModels, net, count: int, content_cfg: ContentConfig,
                    batch: int = 16) -> dict:
    """Text-to-image from held-out captions; the classifier's accuracy on the samples."""
    params = [D.params_for(i) for i in range(CAPTION_START, CAPTION_START + count)]
    images = []
    start = time.perf_counter()
    for k in range(0, count, batch):
        chunk = params[k:k + batch]
        states = torch.cat([encode_prompt(models, D.caption(p)) for p in chunk])
        images.append(B.text_to_image(models, states, seed=k, count=len(chunk),
                                      num_steps=content_cfg.num_inference_steps,
                                      guidance=content_cfg.guidance_scale,
                                      steps_offset=content_cfg.steps_offset))
    images_arr = np.concatenate(images)
    acc = C.accuracy(C.predict(net, images_arr), params)
    return {"count": count, "accuracy": acc, "seconds": time.perf_counter() - start,
            "images": images_arr, "captions": [D.caption(p) for p in params]}


def concept_fidelity(net, samples: np.ndarray, refs, pairs) -> dict[str, float]:
    """The classifier on text-to-image samples of each pair's learned concept, against the
    *reference's* attributes: how much of the reference the concept carries. Set beside the
    caption samples' accuracy, it tells whether a transfer is lost in concept learning or is
    already beyond what the model's text conditioning can draw."""
    return C.accuracy(C.predict(net, samples), [refs[j] for _, j in pairs])


# ---------------------------------------------------------------- outputs
def contact_sheet(columns: dict[str, np.ndarray], path: Path, rows: int | None = None,
                  scale: int = 2) -> None:
    """One row per pair, one labelled column per image set (nearest-neighbour upscaled)."""
    names = list(columns)
    n = len(next(iter(columns.values()))) if rows is None else rows
    cell = D.SIZE * scale
    pad, head = 4, 18
    sheet = Image.new("RGB", (len(names) * (cell + pad) + pad, head + n * (cell + pad) + pad),
                      (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for c, name in enumerate(names):
        x = pad + c * (cell + pad)
        draw.text((x, 3), name, fill=(0, 0, 0))
        for r in range(n):
            img = Image.fromarray(columns[name][r]).resize((cell, cell), Image.NEAREST)
            sheet.paste(img, (x, head + r * (cell + pad)))
    path.parent.mkdir(parents=True, exist_ok=True)
    # A 256-colour palette without dithering: a third of the bytes in the repository, and the
    # flat procedural colours survive it.
    sheet.quantize(colors=256, method=Image.Quantize.MEDIANCUT,
                   dither=Image.Dither.NONE).save(path, optimize=True)


def markdown_table(results: dict) -> str:
    """The table of docs/quality.md: one row per method, every score's mean."""
    heads = ["method", "PSNR ↑", "SSIM ↑", "edge corr ↑", "mask IoU ↑", "colour dist ↓",
             "texture dist ↓", "cls shape ↑", "cls colour ↑", "cls fill ↑", "cls all ↑",
             "s / pair"]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for name, entry in results["methods"].items():
        m = entry["mean"]
        cells = [f"`{name}`", f"{m['psnr']:.2f}", f"{m['ssim']:.3f}", f"{m['edge_corr']:.3f}",
                 f"{m['mask_iou']:.3f}", f"{m['color_dist']:.3f}", f"{m['texture_dist']:.3f}",
                 f"{m['cls_shape']:.2f}", f"{m['cls_color']:.2f}", f"{m['cls_fill']:.2f}",
                 f"{m['cls_all']:.2f}",
                 "-" if entry.get("seconds_per_pair") is None
                 else f"{entry['seconds_per_pair']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    def heads(accuracy: dict[str, float]) -> str:
        return ", ".join(f"{k} {v:.3f}" for k, v in accuracy.items())

    cap = results["caption_samples"]
    lines += ["", f"Classifier on clean held-out renders: {results['classifier']['all']:.3f} "
              f"(all four heads right). On {cap['count']} text-to-image samples of held-out "
              f"captions: {heads(cap['accuracy'])}."]
    lines += ["", "Text-to-image from each pair's learned concept, classified against the "
              "reference's attributes (what the concept carries): "
              f"{heads(results['concept_fidelity'])}."]
    lines += ["", "Targets: " + "; ".join(
        f"{name}: {'met' if t['met'] else 'NOT met'} ({t['detail']})"
        for name, t in results["targets"].items()) + "."]
    return "\n".join(lines)


def write_doc_table(table: str, doc: Path) -> None:
    """Replace the block between the table markers of docs/quality.md (the prose stays)."""
    text = doc.read_text() if doc.is_file() else f"# Quality\n\n{TABLE_START}\n{TABLE_END}\n"
    head, _, rest = text.partition(TABLE_START)
    _, _, tail = rest.partition(TABLE_END)
    doc.write_text(f"{head}{TABLE_START}\n{table}\n{TABLE_END}{tail}")


def targets(methods: dict) -> dict:
    """VCT ahead of both img2img strengths on the ground truth (PSNR and SSIM), keeping the
    structure (edge correlation and mask IoU) at least as well as the weaker of the two."""
    v = methods["vct"]["mean"]
    sd = [methods[f"sdedit-{s}"]["mean"] for s in SDEDIT_STRENGTHS]
    out = {}
    for key in ("psnr", "ssim"):
        best = max(m[key] for m in sd)
        out[f"ground_truth_{key}"] = {"met": v[key] > best,
                                      "detail": f"vct {v[key]:.3f} vs best img2img {best:.3f}"}
    for key in ("edge_corr", "mask_iou"):
        weaker = min(m[key] for m in sd)
        out[f"structure_{key}"] = {"met": v[key] >= weaker,
                                   "detail": f"vct {v[key]:.3f} vs weaker img2img "
                                             f"{weaker:.3f}"}
    return out


# ---------------------------------------------------------------- main
def model_folder(spec: str) -> str:
    """A model folder for `spec`: 'mini' is the shipped mini model, anything else a path."""
    if spec != "mini":
        return spec
    from vct.batch.engine import named_model_folder

    return named_model_folder(spec)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mini", help="model folder, or 'mini' (shipped)")
    parser.add_argument("--preset", default="mini", help="stage settings (vct/mini/presets.py)")
    parser.add_argument("--sources", type=int, default=8)
    parser.add_argument("--per-source", type=int, default=3)
    parser.add_argument("--references", type=int, default=8)
    parser.add_argument("--caption-samples", type=int, default=48)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-ablations", action="store_true")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 2 sources, toy stage sizes, outputs to a temp folder")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--sheet", type=Path, default=SHEET)
    parser.add_argument("--doc", type=Path, default=DOC)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:7.1f} s] {msg}", flush=True)

    models = load_models(model_folder(args.model), device="cpu")
    run = preset_settings(args.preset)
    concept_cfg, content_cfg, fusion_cfg = run.concept, run.content, run.fusion
    if args.quick:
        args.sources, args.per_source, args.caption_samples = 2, 2, 4
        concept_cfg = concept_cfg.model_copy(update={"max_train_steps": 3})
        content_cfg = content_cfg.model_copy(update={"num_inference_steps": 4,
                                                     "num_inner_steps": 2})
        if args.output == RESULTS:
            import tempfile

            tmp = Path(tempfile.mkdtemp(prefix="vct-quality-quick-"))
            args.output, args.sheet, args.doc = tmp / "quality.json", tmp / "sheet.png", \
                tmp / "quality.md"
    srcs, refs, pairs = pair_set(args.sources, args.per_source, args.references)
    used = sorted({j for _, j in pairs})
    log(f"{len(pairs)} pairs: {len(srcs)} sources x {args.per_source} references "
        f"({len(used)} distinct); preset {args.preset}")
    net = C.load()
    clean = C.heldout_accuracy(net)
    log(f"classifier on clean held-out renders: {clean}")

    outputs: dict[str, np.ndarray] = {}
    seconds: dict[str, float] = {}
    concepts, t_concept = concepts_for(models, refs, used, concept_cfg, log)
    contents, t_content = contents_for(models, srcs, content_cfg, len(srcs), log)
    outputs["vct"], t_fuse = fuse_pairs(models, contents, concepts, pairs, fusion_cfg)
    seconds["vct"] = t_concept + t_content + t_fuse
    log(f"vct: concepts {t_concept:.0f} s, contents {t_content:.0f} s, fusion {t_fuse:.0f} s")
    for name, (imgs, secs) in run_baselines(models, srcs, refs, concepts, pairs,
                                            content_cfg).items():
        outputs[name], seconds[name] = imgs, secs
        log(f"{name}: {secs:.0f} s")
    if not args.no_ablations:
        outputs["vct-no-injection"], t = fuse_pairs(models, contents, concepts, pairs,
                                                    fusion_cfg, control=False)
        seconds["vct-no-injection"] = t_concept + t_content + t
        outputs["vct-caption-content"], t = fuse_pairs(
            models, contents, concepts, pairs, fusion_cfg,
            content_fn=lambda i: caption_content(models, contents[i], srcs[i],
                                                 content_cfg))
        seconds["vct-caption-content"] = t_concept + t_content + t
        # The original's reweight quirk (BOS and the first n-1 concept columns at 0.5): does
        # reweighting the concept columns themselves, or not at all, change the transfer?
        for name, update in (("vct-reweight-concept-tokens",
                              {"reweight_positions": "concept_tokens"}),
                             ("vct-no-reweight", {"reweight_value": 1.0})):
            outputs[name], t = fuse_pairs(models, contents, concepts, pairs,
                                          fusion_cfg.model_copy(update=update))
            seconds[name] = t_concept + t_content + t
        one_cfg = concept_cfg.model_copy(update={"num_vectors": 1})
        one, t_one = concepts_for(models, refs, used, one_cfg, log)
        outputs["vct-1-vector"], t = fuse_pairs(models, contents, one, pairs, fusion_cfg)
        seconds["vct-1-vector"] = t_one + t_content + t
        log("ablations done")
    outputs["source-unchanged"] = np.stack([np.asarray(D.render(srcs[i])) for i, _ in pairs])
    outputs["ideal-via-vae"] = through_vae(models, [D.ideal_translation(srcs[i], refs[j])
                                                    for i, j in pairs])
    cap = caption_samples(models, net, args.caption_samples, content_cfg)
    log(f"caption samples: {cap['accuracy']} ({cap['seconds']:.0f} s)")
    carried = concept_fidelity(net, outputs["t2i-concept"], refs, pairs)
    log(f"learned concepts, against their references: {carried}")

    methods = {}
    for name, imgs in outputs.items():
        scored = score_all(net, imgs, srcs, refs, pairs)
        methods[name] = {**scored, "seconds": seconds.get(name),
                         "seconds_per_pair": (seconds[name] / len(pairs)
                                              if name in seconds else None)}
    results = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": {"source": args.model, "identity": models.identity},
        "machine": {"cpus": os.cpu_count(), "threads": args.threads,
                    "platform": platform.platform(), "torch": torch.__version__,
                    "loadavg": list(os.getloadavg())},
        "preset": args.preset,
        "configs": {"concept": concept_cfg.model_dump(mode="json"),
                    "content": content_cfg.model_dump(mode="json"),
                    "fusion": fusion_cfg.model_dump(mode="json")},
        "pairs": [{"source": srcs[i].to_dict(), "reference": refs[j].to_dict(),
                   "source_caption": D.caption(srcs[i]), "reference_caption": D.caption(refs[j])}
                  for i, j in pairs],
        "classifier": clean,
        "caption_samples": {k: cap[k] for k in ("count", "accuracy", "seconds")},
        "concept_fidelity": carried,
        "methods": methods,
        "targets": targets(methods),
        "wall_s": time.perf_counter() - t_start,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=1) + "\n")
    columns = {"source": np.stack([np.asarray(D.render(srcs[i])) for i, _ in pairs]),
               "reference": np.stack([np.asarray(D.render(refs[j])) for _, j in pairs]),
               "ideal": np.stack([np.asarray(D.ideal_translation(srcs[i], refs[j]))
                                  for i, j in pairs])}
    columns.update({k: v for k, v in outputs.items() if k != "source-unchanged"})
    contact_sheet(columns, args.sheet)
    contact_sheet({"caption samples": cap["images"][:len(pairs)]},
                  args.sheet.with_name(args.sheet.stem + "-captions.png"))
    table = markdown_table(results)
    write_doc_table(table, args.doc)
    print(table)
    log(f"wrote {args.output}, {args.sheet}, {args.doc}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
