"""The `vct` command: argument parsing and one-line errors; the work lives in the library.

Exit codes: 0 when every pair is done, 1 when a run finished with failed pairs, 2 for any error
the user can fix (a missing file, a wrong model folder, an out-of-range flag: one line naming
it, never a traceback), 3 when `vct run` lost its Prefect API (one line saying what to do; a
rerun resumes from the cache), 130 when interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from vct import config as C
from vct.errors import UserError
from vct.logs import quiet_libraries

EXIT_FAILED_PAIRS = 1
EXIT_USAGE = 2
EXIT_API_LOST = 3
EMBEDDED_PREFECT_SETTINGS = {
    # Prefect's wait loop counts only its own 0.1 s sleeps, and a first start migrates the
    # database: 12 s idle, over 30 s on a busy 2-core machine, where the default 20 failed.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "300",
    # a starved server answers late rather than never: wait, and retry more (the retries also
    # cover refused connections once the client has connected)
    "PREFECT_API_REQUEST_TIMEOUT": "300",
    "PREFECT_CLIENT_MAX_RETRIES": "10",
    # sqlite under load: wait for a lock instead of failing the request
    "PREFECT_SERVER_DATABASE_TIMEOUT": "60",
    "PREFECT_SERVER_DATABASE_CONNECTION_TIMEOUT": "30",
}
"""Prefect's own settings that `vct run` sets (unless already set) when it runs Prefect
embedded, i.e. without PREFECT_API_URL; see docs/reliability.md for the failures behind them."""
RUN_FLAGS = {"cache_uri": "--cache", "checkpoint_config": "--model-config"}
"""Run settings whose flag is not simply the field name."""


def tqdm_progress(quiet: bool) -> Callable | None:
    """A factory of per-job progress callbacks drawing tqdm bars on stderr."""
    if quiet:
        return None
    from tqdm import tqdm

    def factory(desc: str, total: int):
        bar = tqdm(total=total, desc=desc, unit="step", leave=False, dynamic_ncols=True)

        def update(i: int, n: int) -> None:
            bar.update(i - bar.n)
            if i >= n:
                bar.close()

        return update

    return factory


def add_settings_arguments(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """Flags generated from the typed run settings: the run-level ones, then every stage
    hyperparameter (`--max-train-steps`, `--num-inner-steps`, ...)."""
    from vct.batch.settings import RunSettings

    group = parser.add_argument_group("run settings")
    for name, info in RunSettings.model_fields.items():
        if name in ("concept", "content", "fusion") + skip:
            continue
        flag = RUN_FLAGS.get(name, "--" + name.replace("_", "-"))
        help_text = f"{info.description} (default: {info.default!r})"
        if info.annotation is bool:
            group.add_argument(flag, dest=name, default=None,
                               action=argparse.BooleanOptionalAction, help=help_text)
        else:
            group.add_argument(flag, dest=name, default=None, metavar=name.upper(),
                               help=help_text)
    C.add_arguments(parser, C.ConceptConfig, "concept inversion (stage 3, per reference)",
                    skip=("seed",))
    C.add_arguments(parser, C.ContentConfig, "content inversion (stages 1-2, per source)")
    C.add_arguments(parser, C.FusionConfig, "fusion (stage 4, per pair)")


def settings_from(args: argparse.Namespace):
    """The checked run settings from the flags, then `--set stage.field=value` on top."""
    from vct.batch.settings import RunSettings

    values = {name: getattr(args, name) for name in RunSettings.model_fields
              if getattr(args, name, None) is not None}
    stages = {"concept": C.from_namespace(C.ConceptConfig, args),
              "content": C.from_namespace(C.ContentConfig, args),
              "fusion": C.from_namespace(C.FusionConfig, args)}
    settings = RunSettings.build({**values, **stages})
    if getattr(args, "seed", None) is not None:
        settings = settings.with_stage_overrides({"concept": {"seed": args.seed}})
    return settings.with_stage_overrides(parse_sets(getattr(args, "set", [])))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vct", description="Restyle images with VCT "
                                     "(Visual Concept Translator, ICCV 2023).")
    sub = parser.add_subparsers(dest="command", required=True)
    model_help = ("diffusers SD 1.x folder, single-file .safetensors/.ckpt checkpoint, an "
                  "s3:// URI of either, 'mini' for the "
                  "small model trained on procedural shapes (shipped), or 'tiny' for the "
                  "offline random-weight test model")

    tr = sub.add_parser("translate", help="restyle source images after one reference image")
    tr.add_argument("--model", required=True, help=model_help)
    tr.add_argument("--reference", required=True, type=Path, help="the reference (style) image")
    tr.add_argument("--source", required=True, type=Path, action="append",
                    help="a source (content) image; repeat for several")
    tr.add_argument("--out", required=True, type=Path, help="output folder")
    tr.add_argument("--seed", type=int, default=None, help="seed of the concept inversion")
    tr.add_argument("--quiet", action="store_true", help="no progress bars")
    add_settings_arguments(tr, skip=("strict", "executor", "num_processes", "shards",
                                      "shard_jobs", "report_link_expiry_s"))

    tiny = sub.add_parser("tiny-model", help="build the offline random-weight SD 1.x test model")
    tiny.add_argument("dir", type=Path, help="folder to create")
    tiny.add_argument("--seed", type=int, default=None, help="weight seed (default 0)")

    mini = sub.add_parser("train-mini", help="train the mini model on procedural images "
                          "(resumable: rerun the same command to continue)")
    mini.add_argument("dir", type=Path, help="training folder (checkpoints, logs, DIR/model)")
    from vct.mini.config_flags import add_train_arguments

    add_train_arguments(mini)

    run = sub.add_parser("run", help="run the restyle flow on a CSV manifest (embedded Prefect)")
    run.add_argument("manifest", help="manifest CSV: local path or s3:// URI")
    run.add_argument("--output", required=True, help="output prefix: folder or s3:// URI")
    run.add_argument("--model", required=True, help=model_help)
    run.add_argument("--run-id", default=None, help="output folder name (default: derived from "
                     "the manifest bytes and settings, so a rerun resumes)")
    run.add_argument("--seed", type=int, default=None, help="concept seed for rows without one")
    run.add_argument("--set", action="append", default=[], metavar="STAGE.FIELD=VALUE",
                     help="stage setting, e.g. --set concept.max_train_steps=100")
    add_settings_arguments(run)

    cache = sub.add_parser("cache", help="what a stage cache (or the model cache) holds, and "
                           "pruning it")
    what = cache.add_subparsers(dest="cache_command", required=True)
    cache_help = "the stage cache: a folder or s3:// prefix (a run's default: OUTPUT/_cache)"
    ls = what.add_parser("ls", help="every entry: kind, size, age (since written), time "
                         "unused (since its last read or write), model, key")
    du = what.add_parser("du", help="entries and bytes by kind and by model, and the total")
    prune = what.add_parser("prune", help="delete entries by age and/or to fit a size; prints "
                            "what would go unless --yes (never an entry under a live claim)")
    for p in (ls, du, prune):
        p.add_argument("cache", nargs="?", help=cache_help)
        p.add_argument("--model-cache", action="store_true", help="the model cache instead "
                       "(VCT_MODEL_CACHE, default ~/.cache/vct/models: s3:// models synced, "
                       "single files downloaded and converted)")
        p.add_argument("--kind", action="append", choices=(
            "concept", "content", "fusion", "single-file", "s3-model", "s3-file"),
            help="only entries of this kind (repeat for several)")
        p.add_argument("--model", action="append", metavar="IDENTITY",
                       help="only entries of this model: its identity or a prefix of it, as "
                       "`ls` shows it (repeat for several)")
    prune.add_argument("--older-than", type=_flag(_age), metavar="AGE",
                       help="entries unused (not read or written) for longer than this: 30d, "
                       "12h, 90m, 45s")
    prune.add_argument("--max-size", type=_flag(_size), metavar="SIZE",
                       help="then the oldest, until the entries in scope fit: 500M, 50G, 1.5T "
                       "(powers of 1024)")
    mode = prune.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="print what would go (the "
                      "default)")
    mode.add_argument("--yes", action="store_true", help="delete it")
    return parser


def _age(text: str) -> float:
    from vct.batch.cache_admin import parse_age

    return parse_age(text)


def _size(text: str) -> int:
    from vct.batch.cache_admin import parse_size

    return parse_size(text)


def _flag(parse: Callable[[str], object]) -> Callable[[str], object]:
    """An argparse type whose error is the parser's own one-line message."""
    def convert(text: str) -> object:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return convert


def cmd_cache(args: argparse.Namespace) -> int:
    """`vct cache ls|du|prune`: listing and choosing live in vct.batch.cache_admin."""
    import time

    from vct import storage
    from vct.batch import cache_admin as A

    root = args.cache
    if root and not storage.is_s3(root) and not Path(root.removeprefix("file://")).expanduser(
            ).is_dir():
        raise UserError(f"cache {root}: no such folder")
    now = time.time()
    listing = A.list_cache(root, args.model_cache, now)
    entries_all, live = listing.entries, listing.protected
    entries = A.in_scope(entries_all, args.kind, args.model)
    if args.cache_command == "ls":
        print(f"{'kind':11} {'size':>10} {'age':>7} {'unused':>7}  {'model':16} key")
        for e in entries:
            print(f"{e.kind:11} {A.human_size(e.size):>10} "
                  f"{A.human_age(max(0.0, now - e.modified)):>7} {A.human_age(e.age(now)):>7}  "
                  f"{(e.model or '?')[:16]:16} {e.key}")
        return 0
    if args.cache_command == "du":
        for by in ("kind", "model"):
            for name, (count, size) in A.totals(entries, by).items():
                print(f"{by} {name[:24]:24} {count:8d} entries {A.human_size(size):>10}")
        print(f"{'total':29} {len(entries):8d} entries "
              f"{A.human_size(sum(e.size for e in entries)):>10}")
        return 0
    if args.older_than is None and args.max_size is None:
        raise UserError("vct cache prune: say what to delete: --older-than, --max-size or both")
    chosen = A.select(entries_all, now, older_than_s=args.older_than, max_bytes=args.max_size,
                      kinds=args.kind, models=args.model, protected=live)
    held = [e for e in entries if (e.kind, e.key) in live]
    why = "in use" if args.model_cache else "under a live claim"
    if not args.yes:
        for e in chosen:
            print(f"would delete {e.kind} {e.key} ({A.human_size(e.size)}, unused "
                  f"{A.human_age(e.age(now))})")
        print(f"{len(chosen)} entries, {A.human_size(sum(e.size for e in chosen))} would go; "
              f"{len(held)} {why} kept. Nothing was deleted: add --yes to delete")
        return 0
    pruned = A.prune(listing, chosen)
    for e in pruned.deleted:
        print(f"deleted {e.kind} {e.key} ({A.human_size(e.size)})")
    print(f"deleted {len(pruned.deleted)} entries, "
          f"{A.human_size(sum(e.size for e in pruned.deleted))}; "
          f"{len(held) + len(pruned.kept_claimed)} {why} kept")
    return 0


def cmd_translate(args: argparse.Namespace) -> int:
    from vct.translate import translate

    settings = settings_from(args)
    summary = translate(args.model, args.reference, args.source, args.out, settings,
                        cache=settings.cache_uri, progress=tqdm_progress(args.quiet))
    for pair in summary.pairs:
        if pair.png_name:
            print(f"{args.out / pair.png_name}  (metadata: {args.out / pair.sidecar_name})")
        else:
            print(f"failed: {pair.pair_id}: {pair.reason}", file=sys.stderr)
    print(f"concept embedding: {args.out / 'concept.safetensors'}")
    return 0 if summary.status == "complete" else EXIT_FAILED_PAIRS


def cmd_tiny_model(args: argparse.Namespace) -> int:
    from vct.tiny_model import build_tiny_model

    print(build_tiny_model(args.dir, seed=args.seed or 0))
    return 0


def cmd_train_mini(args: argparse.Namespace) -> int:
    import torch

    from vct.mini.config_flags import config_from
    from vct.mini.train import Trainer, time_steps

    torch.set_num_threads(args.threads)
    cfg = config_from(args)
    if args.time:
        for name, value in time_steps(cfg).items():
            print(f"{name}: {value:.3f}")
        return 0
    print(Trainer(args.dir, cfg, progress=not args.quiet).run())
    return 0


def parse_sets(items: list[str]) -> dict[str, dict[str, str]]:
    """--set stage.field=value pairs into the settings' stage overrides."""
    overrides: dict[str, dict[str, str]] = {}
    for item in items:
        name, sep, value = item.partition("=")
        stage, dot, fieldname = name.strip().partition(".")
        if not sep or not dot or not fieldname:
            raise C.ConfigError("set", f"{item!r} is not STAGE.FIELD=VALUE")
        overrides.setdefault(stage, {})[fieldname] = value
    return overrides


@contextlib.contextmanager
def _defaults(values: dict[str, str]) -> Iterator[None]:
    """Environment variables set for the block unless already set; removed again after."""
    added = [name for name in values if name not in os.environ]
    for name in added:
        os.environ[name] = values[name]
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


def embedded_environment() -> dict[str, str]:
    """What `vct run` sets for embedded Prefect: its settings, and one core reserved for the
    server when there are several (torch would otherwise take every core and starve it)."""
    from vct.threads import RESERVED_ENV, available_cores

    env = dict(EMBEDDED_PREFECT_SETTINGS)
    if available_cores() > 1:
        env[RESERVED_ENV] = "1"
    return env


def _lost_api(reason: str, embedded: bool) -> int:
    where = ("the embedded Prefect server" if embedded
             else f"the Prefect API at {os.environ.get('PREFECT_API_URL')}")
    advice = ("on a busy machine run a separate server (`prefect server start`) and set "
              "PREFECT_API_URL=http://127.0.0.1:4200/api" if embedded
              else "check that the server is up")
    print(f"vct: error: the run lost {where} ({reason}); finished stage results and outputs "
          f"are kept, so the same command resumes; {advice}", file=sys.stderr)
    return EXIT_API_LOST


def cmd_run(args: argparse.Namespace) -> int:
    """Run the Prefect flow in this process: on the configured server (PREFECT_API_URL), or
    on a temporary embedded one started here, which dies with this process."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    embedded = not os.environ.get("PREFECT_API_URL")
    from vct import storage
    from vct.batch import engine

    settings = settings_from(args)
    if not storage.is_s3(args.output):  # print paths a reader can open from anywhere
        args.output = str(Path(args.output).expanduser().resolve())
    # Bad flags, a missing or unreadable manifest and a wrong model folder fail here in one
    # line, before Prefect starts (inside the flow they would come with Prefect's traceback).
    request = engine.prepare(args.manifest, args.output, args.model, settings, args.run_id)
    if args.model == "tiny":
        print("vct: using the tiny random-weight test model: outputs are colourful noise, "
              "not restyled pictures (use --model with an SD 1.5 folder for real work)",
              file=sys.stderr)
    # the engine's one check of the manifest and model (the flow's planning starts with it
    # too); an s3:// model or a single file is synced or converted here, once, into the
    # model cache, where the flow finds it
    engine.read_inputs(request)
    home = os.environ.get("PREFECT_HOME")
    if embedded and home:  # Prefect creates one missing folder, not its parents; sqlite then
        Path(home).expanduser().mkdir(parents=True, exist_ok=True)  # fails after minutes
    # Prefect reads its settings when imported: set them first (embedded mode only).
    with _defaults(embedded_environment() if embedded else {}):
        from flows import embedded as server
        from flows.restyle import RunFailed, restyle

        try:
            if embedded:
                server.start_server()
            state = restyle(manifest_uri=args.manifest, output_uri=args.output,
                            model=request.model, settings=settings, run_id=args.run_id,
                            return_state=True)
        except Exception as exc:
            if (reason := server.api_failure(exc)) is None:
                raise
            return _lost_api(reason, embedded)
    outcome = state.result(raise_on_failure=False)
    summary = outcome.summary if isinstance(outcome, RunFailed) else outcome
    if isinstance(outcome, BaseException) and not isinstance(outcome, RunFailed):
        if isinstance(outcome, UserError):
            raise outcome
        if (reason := server.api_failure(outcome)) is not None:
            return _lost_api(reason, embedded)
        text = " ".join(str(outcome).split())
        print(f"vct: error: the run failed: {type(outcome).__name__}: {text}", file=sys.stderr)
        return EXIT_FAILED_PAIRS
    run = summary.run_uri
    print()
    print(f"status: {summary.status}  (" + ", ".join(
        f"{k}={v}" for k, v in summary.all_counts().items()) + ")")
    for failure in summary.failures:
        print(f"  {failure.stage}: line {failure.line}: {failure.reason}")
    print(f"outputs:       {run}")
    print(f"report:        {storage.join(run, 'report.html')}")
    print(f"contact sheet: {storage.join(run, 'contact_sheet.png')}")
    print(f"run summary:   {storage.join(run, 'run.json')}")
    return 0 if summary.status == "complete" else EXIT_FAILED_PAIRS


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    quiet_libraries()
    args = build_parser().parse_args(argv)
    handlers = {"translate": cmd_translate, "tiny-model": cmd_tiny_model, "run": cmd_run,
                "cache": cmd_cache, "train-mini": cmd_train_mini}
    try:
        return handlers[args.command](args)
    except (UserError, FileExistsError) as exc:
        print(f"vct: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("vct: interrupted; finished outputs are kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
