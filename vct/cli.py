"""The `vct` command: argument parsing and one-line errors; the work lives in the library.

Every error a user can cause (a missing file, a file that is not an image, a wrong model folder,
an out-of-range flag) ends with one line naming the file or flag and exit code 2, never a
traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

from vct import config as C
from vct.errors import user_errors

EXIT_USAGE = 2


def quiet_libraries() -> None:
    """diffusers/transformers chatter (torchvision notices, weight-loading bars) is not ours."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="diffusers")
    for name in ("diffusers", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from diffusers.utils import logging as dlog
        from transformers.utils import logging as tlog

        dlog.disable_progress_bar()
        tlog.disable_progress_bar()
        dlog.set_verbosity_error()
        tlog.set_verbosity_error()
    except ImportError:
        pass


def tqdm_progress(quiet: bool) -> Callable:
    """A factory of per-stage progress callbacks drawing tqdm bars on stderr."""
    if quiet:
        return lambda desc, total: None
    from tqdm import tqdm

    def factory(desc: str, total: int):
        bar = tqdm(total=total, desc=desc, unit="step", leave=False, dynamic_ncols=True)

        def update(i: int, n: int) -> None:
            bar.update(i - bar.n)
            if i >= n:
                bar.close()

        return update

    return factory


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="diffusers SD 1.x folder or s3://bucket/prefix holding one")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"),
                        help="UNet precision; fp16/bf16 need CUDA (default fp32, faithful)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vct", description="Restyle images with VCT "
                                     "(Visual Concept Translator, ICCV 2023).")
    sub = parser.add_subparsers(dest="command", required=True)

    tr = sub.add_parser("translate", help="restyle source images after one reference image",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_arguments(tr)
    tr.add_argument("--reference", required=True, type=Path, help="the reference (style) image")
    tr.add_argument("--source", required=True, type=Path, action="append",
                    help="a source (content) image; repeat for several")
    tr.add_argument("--out", required=True, type=Path, help="output folder")
    tr.add_argument("--seed", type=int, default=None, help="seed of the concept inversion")
    tr.add_argument("--quiet", action="store_true", help="no progress bars")
    C.add_arguments(tr, C.ConceptConfig, "concept inversion (stage 3, per reference)",
                    skip=("seed",))
    C.add_arguments(tr, C.ContentConfig, "content inversion (stages 1-2, per source)")
    C.add_arguments(tr, C.FusionConfig, "fusion (stage 4, per pair)")

    tiny = sub.add_parser("tiny-model", help="build the offline random-weight SD 1.x test model")
    tiny.add_argument("dir", type=Path, help="folder to create")
    tiny.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")

    run = sub.add_parser("run", help="run the restyle flow on a CSV manifest (embedded Prefect)")
    run.add_argument("manifest", help="manifest CSV: local path or s3:// URI")
    run.add_argument("--output", required=True, help="output prefix: folder or s3:// URI")
    run.add_argument("--model", default=None,
                     help="diffusers SD 1.x folder or s3:// prefix (default: the tiny model, "
                          "built if missing)")
    run.add_argument("--cache", default=None, help="stage cache prefix (default OUTPUT/_cache)")
    run.add_argument("--strict", action="store_true",
                     help="fail before any model work if any manifest row is bad")
    run.add_argument("--executor", default="local", choices=("local", "accelerate"),
                     help="run stage jobs in this process or across GPUs with accelerate")
    run.add_argument("--num-processes", type=int, default=None,
                     help="accelerate processes (default: one per GPU)")
    run.add_argument("--content-batch", type=int, default=1, metavar="N",
                     help="fit N sources together in one batch, each with its own early stop "
                          "(default 1: bit-for-bit the one-source computation)")
    run.add_argument("--device", default="auto")
    run.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"))
    run.add_argument("--set", action="append", default=[], metavar="STAGE.FIELD=VALUE",
                     help="config override, e.g. --set concept.max_train_steps=100")
    return parser


def cmd_translate(args: argparse.Namespace) -> int:
    from vct.models import load_models
    from vct.translate import Settings, read_inputs, translate

    concept = C.from_namespace(C.ConceptConfig, args)
    if args.seed is not None:
        concept = C.with_overrides(concept, {"seed": args.seed})
    settings = Settings(model=C.validate(C.ModelConfig(model=args.model, device=args.device,
                                                       dtype=args.dtype)),
                        concept=concept, content=C.from_namespace(C.ContentConfig, args),
                        fusion=C.from_namespace(C.FusionConfig, args))
    read_inputs(args.reference, args.source)  # fail fast, before loading any model
    models = load_models(args.model, device=args.device, dtype=args.dtype)
    written = translate(models, args.reference, args.source, args.out, settings,
                        progress=tqdm_progress(args.quiet))
    for png in written:
        print(f"{png}  (metadata: {png.with_suffix('.json')})")
    print(f"concept embedding: {args.out / 'concept.safetensors'}")
    return 0


def cmd_tiny_model(args: argparse.Namespace) -> int:
    from vct.tiny_model import build_tiny_model

    print(build_tiny_model(args.dir, seed=args.seed))
    return 0


def parse_sets(items: list[str]) -> dict[str, dict[str, str]]:
    """--set stage.field=value pairs into the flow's overrides mapping."""
    overrides: dict[str, dict[str, str]] = {}
    for item in items:
        name, sep, value = item.partition("=")
        stage, dot, fieldname = name.strip().partition(".")
        if not sep or not dot or not fieldname:
            raise C.ConfigError("set", f"{item!r} is not STAGE.FIELD=VALUE")
        overrides.setdefault(stage, {})[fieldname] = value
    return overrides


def cmd_run(args: argparse.Namespace) -> int:
    """Run the Prefect flow in this process on embedded Prefect (no server to start)."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    overrides = parse_sets(args.set)
    from vct.plan import BaseSettings

    # Bad flags, a missing or unreadable manifest and a wrong model folder fail here in one
    # line, before Prefect starts (inside the flow they would come with Prefect's traceback).
    BaseSettings.from_overrides(overrides)
    if args.content_batch < 1:
        raise C.ConfigError("content_batch", f"must be >= 1, got {args.content_batch}")
    from vct.manifest import load_manifest
    from vct.models import check_layout

    manifest = load_manifest(args.manifest)
    if args.strict:
        manifest.raise_if_errors()
    if args.model and not args.model.startswith("s3://"):
        check_layout(Path(args.model).expanduser())
    from flows.restyle import restyle
    from vct import storage

    if not storage.is_s3(args.output):  # print paths a reader can open from anywhere
        args.output = str(Path(args.output).expanduser().resolve())

    summary = restyle(manifest_uri=args.manifest, output_uri=args.output, model=args.model,
                      cache_uri=args.cache, strict=args.strict, overrides=overrides,
                      executor=args.executor, num_processes=args.num_processes,
                      device=args.device, dtype=args.dtype, content_batch=args.content_batch)
    run = summary["output_uri"]
    counts = summary["counts"]
    print()
    print("counts: " + ", ".join(f"{k}={v}" for k, v in counts.items()))
    for failure in summary.get("failures", []):
        print(f"  failed: line {failure.get('line')}: {failure.get('reason')}")
    print(f"outputs:       {run}")
    print(f"report:        {storage.join(run, 'report.html')}")
    print(f"contact sheet: {storage.join(run, 'contact_sheet.png')}")
    print(f"run summary:   {storage.join(run, 'run.json')}")
    return 0 if counts.get("pairs_failed", 0) == 0 else 1


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    quiet_libraries()
    args = build_parser().parse_args(argv)
    handlers = {"translate": cmd_translate, "tiny-model": cmd_tiny_model, "run": cmd_run}
    try:
        return handlers[args.command](args)
    except user_errors() as exc:
        print(f"vct: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("vct: interrupted; finished outputs are kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
