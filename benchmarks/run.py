"""Benchmarks, run on demand (`make bench`): every figure measured side by side in one run,
printed as a table (each target met or not) and written to benchmarks/results.json.

Sections (each a module of benchmarks/):
- stages: per-stage cost at the defaults and with each fast option (batched micro-steps,
  content batch, SDPA), the fused-latent MSE of each against the defaults;
- sd15: each stage once on an SD 1.5-architecture random model at 128 px: s per UNet
  evaluation and peak RSS of the real shapes (--sd15: the whole stages section on it);
- amortization: UNet evaluations of a crossed 6 x 3 manifest, naive / the original's pattern /
  cold / warm, counted by the hook; the amortization-limit formula;
- overhead + report: 4 000 pairs with the model cost removed: seconds per pair, report bytes;
- planning: engine.plan on 10 000 distinct inputs, local disk and moto S3;
- utilization: 2 accelerate CPU ranks in the job pool;
- threads: a stage idle vs with one busy process, budgeted threads vs torch's default.

Default: the tiny model on CPU (a 2-core box: under 15 minutes). `--quick` is a smoke run of
every section at toy sizes (written to a temporary file unless --output is given). On a GPU
node: `--device cuda --steps 50 --concept-steps 500 --sd15` (see docs/performance.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's vct and benchmarks, whatever is installed
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)

import torch  # noqa: E402

from benchmarks import threads as threads_bench  # noqa: E402  (reads torch's default count)
from benchmarks.common import Section, markdown, table, tiny_model  # noqa: E402

SECTIONS = ("stages", "sd15", "amortization", "overhead", "planning", "utilization", "threads")
RESULTS = ROOT / "benchmarks" / "results.json"


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def run_section(name: str, args) -> list[Section]:
    quick = args.quick
    if name == "stages":
        from benchmarks import stages

        return [stages.measure(args.model or tiny_model(), args.device,
                               steps=4 if quick else args.steps,
                               concept_steps=2 if quick else args.concept_steps,
                               inner_steps=2 if quick else None,
                               resolution=args.resolution)]
    if name == "sd15":
        from benchmarks import stages

        if args.quick:
            return []
        return [stages.sd15(args.device, args.sd15)]
    if name == "amortization":
        from benchmarks import amortization

        return [amortization.measure(quick, threads=args.threads)]
    if name == "overhead":
        from benchmarks import overhead

        return list(overhead.measure(*((20, 10) if quick else (200, 20))))
    if name == "planning":
        from benchmarks import planning

        return [planning.measure(300 if quick else 10_000,
                                 100 if quick else args.s3_inputs)]
    if name == "utilization":
        from benchmarks import utilization

        return [utilization.measure(quick)]
    if name == "threads":
        return [threads_bench.measure(quick)]
    raise ValueError(name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="toy sizes: a smoke run")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, help="run these sections only")
    parser.add_argument("--output", default=None,
                        help=f"results file (default {RESULTS.relative_to(ROOT)}; "
                        "a temporary file with --quick)")
    parser.add_argument("--model", default=None, help="SD 1.x folder for the stages section "
                        "(default: the tiny model)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=10,
                        help="T for content and fusion in the stages section (default 10 on "
                        "CPU; the method's default is 50)")
    parser.add_argument("--concept-steps", type=int, default=25,
                        help="concept updates in the stages section (the default is 500)")
    parser.add_argument("--resolution", type=int, default=32,
                        help="working size of the stages section (px)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of the in-process sections (default 1)")
    parser.add_argument("--s3-inputs", type=int, default=1_000,
                        help="inputs planned on moto S3 (below 10 000: extrapolated, labelled)")
    parser.add_argument("--sd15", action="store_true",
                        help="run the whole stages section on the SD 1.5-architecture model (a GPU node)")
    parser.add_argument("--markdown", metavar="RESULTS", default=None,
                        help="print the targets of an existing results file as Markdown "
                        "(measures nothing)")
    args = parser.parse_args(argv)
    if args.markdown:
        print(markdown(json.loads(Path(args.markdown).read_text())))
        return 0
    out = Path(args.output) if args.output else (
        Path(tempfile.gettempdir()) / "vct-bench-quick.json" if args.quick else RESULTS)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    results: dict = {"meta": {
        "date": datetime.now(UTC).isoformat(timespec="seconds"), "quick": args.quick,
        "host": platform.node(), "python": platform.python_version(),
        "torch": torch.__version__, "cores": os.cpu_count(), "device": args.device,
        "threads": args.threads, "torch_default_threads": threads_bench.TORCH_DEFAULT_THREADS,
        "loadavg_start": _loadavg()}, "sections_s": {}}
    sections: list[Section] = []
    for name in args.only or SECTIONS:
        t = time.perf_counter()
        print(f"== {name}", flush=True)
        try:
            got = run_section(name, args)
        except Exception as exc:  # one broken section must not lose the others' figures
            traceback.print_exc()
            got = [Section(name, data={"error": f"{type(exc).__name__}: {exc}"})]
            got[0].row("error", got[0].data["error"])
        for sec in got:
            sections.append(sec)
            results[sec.name] = sec.data
            for line in sec.rows:
                print(f"   {line[0]}: {line[1]}", flush=True)
        results["sections_s"][name] = round(time.perf_counter() - t, 2)
    results["targets"] = {t.name: t.to_dict() for s in sections for t in s.targets}
    results["meta"]["loadavg_end"] = _loadavg()
    results["meta"]["total_s"] = round(time.perf_counter() - started, 2)
    results["meta"]["cpu_s"] = round(_cpu_seconds(), 1)
    results["meta"]["cpu_note"] = ("CPU seconds of this process and its children (accelerate "
                                   "ranks, busy loop): on an idle 2-core box the wall time is "
                                   "at least cpu_s / 2")
    out.write_text(json.dumps(results, indent=2, sort_keys=False, default=str) + "\n")
    print()
    print(table(sections))
    met = [t.met for s in sections for t in s.targets]
    print(f"\n{sum(m is True for m in met)} of {len(met)} targets met; "
          f"{results['meta']['total_s']:.0f} s wall, {results['meta']['cpu_s']:.0f} CPU s "
          f"(load average {results['meta']['loadavg_start']} -> "
          f"{results['meta']['loadavg_end']}); results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
