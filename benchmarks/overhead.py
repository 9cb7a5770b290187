"""Orchestration overhead of a large crossed manifest, with the model cost removed entirely.

The engine runs for real (prepare, plan with every input read and hashed, the job pool with its
claims, cache stores and verified loads, each pair's PNG and sidecar, run.json, the report with
its thumbnails and contact sheets); only the job bodies are replaced by a fake runner that
stores a valid tiny result for every job without touching a model (the approach of
tests/test_batch_engine.py's FakeRunner). So ``seconds_per_pair`` is everything but UNet/VAE/text
encoder time. The report's size per pair and its largest page are measured on the same run.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import Section, crossed, dir_bytes, tiny_model
from vct.artifacts import FusedImages, Stored, result_bytes
from vct.batch import engine
from vct.batch.jobs import Job, JobOutcome
from vct.batch.workers import ExecutorSettings
from vct.cache import StageCache
from vct.concept import ConceptResult, ConceptStats
from vct.config import ConceptConfig, ContentConfig
from vct.content import ContentResult, ContentStats

TRIVIAL = {"concept": {"max_train_steps": 1, "gradient_accumulation_steps": 1},
           "content": {"num_inference_steps": 2, "num_inner_steps": 0}, "fusion": {}}


class FakeRunner:
    """Stores a valid entry for every job (no model): the job layer's store, without compute."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.jobs = 0

    def __call__(self, jobs: list[Job], settings: ExecutorSettings, **_: object):
        start = time.perf_counter()
        cache = StageCache(settings.cache_uri)
        out = []
        for job in jobs:
            cache.put(job.kind, job.key, result_bytes(job.kind, _stored(job)))
            out.append(JobOutcome(job.kind, job.key, True, 0, 0.0, unet_evals={}))
        self.jobs += len(jobs)
        self.seconds += time.perf_counter() - start
        return out


def _stored(job: Job) -> Stored:
    prov = {"cache_key": job.key, "unet_evals": {}, "seconds": 0.0,
            "model": {"identity": "fake", "source": "benchmarks/overhead.py"}}
    if job.kind == "concept":
        return Stored(ConceptResult(torch.zeros(1, 4), ConceptConfig(**job.config),
                                    ConceptStats([0.5], 1e-3, {"concept": 0.0})), prov)
    if job.kind == "content":
        cfg = ContentConfig(**job.config)
        t = cfg.num_inference_steps
        z = torch.zeros(1, 4, 2, 2)
        return Stored(ContentResult(z, torch.zeros(t, 2, 4), torch.zeros(t + 1, 4, 2, 2),
                                    torch.zeros(t + 1, 4, 2, 2), cfg,
                                    ContentStats([0] * t, [0.0] * t, [0.0] * t, [0] * t, 16,
                                                 seconds={"inversion": 0.0, "fit": 0.0})),
                      prov)
    k = len(job.config["concept_keys"])
    images = torch.full((k, 16, 16, 3), int(job.key[:2], 16), dtype=torch.uint8)
    summary = {"cache_key": "x", "seconds": {}, "unet_evals": {}}
    return Stored(FusedImages(images), {**prov, "fusion_seconds": {"fusion": 0.0},
                                        "content": summary, "concepts": [summary] * k})


def measure(sources: int = 200, references: int = 20, size: int = 16) -> tuple[Section, Section]:
    """The overhead section and the report section, measured on the same run."""
    sec, rep = Section("overhead"), Section("report")
    model = tiny_model()
    pairs = sources * references
    with tempfile.TemporaryDirectory(prefix="vct-bench-overhead-") as tmp:
        root = Path(tmp)
        manifest, _, _ = crossed(root / "in", sources, references, size=size)
        request = engine.prepare(str(manifest), str(root / "out"), model,
                                 {**TRIVIAL, "threads": 1}, run_id="bench")
        runner = FakeRunner()
        times = {}
        cpu = time.process_time()
        start = time.perf_counter()
        the_plan = engine.plan(request)
        times["plan_s"] = time.perf_counter() - start
        t = time.perf_counter()
        outcome = engine.run_pool(the_plan, request.executor(), runner=runner)
        times["pool_s"] = time.perf_counter() - t
        summary = engine.summarize(the_plan, outcome.pairs, outcome.stages,
                                   details=outcome.details())
        run = Path(the_plan.run_uri)
        before = {p for p in run.rglob("*") if p.is_file()}
        t = time.perf_counter()
        engine.finish(summary, "2026-01-01T00:00:00+00:00")
        times["finish_s"] = time.perf_counter() - t
        wall = time.perf_counter() - start
        cpu = time.process_time() - cpu
        if summary.status != "complete":
            raise RuntimeError(f"overhead run not complete: {summary.message}")
        written = [p for p in run.rglob("*") if p.is_file() and p not in before]
        report_files = [p for p in written if p.name not in ("run.json", "_SUCCESS")]
        pages = [p for p in report_files if p.suffix == ".html"]
        report_bytes = sum(p.stat().st_size for p in report_files)
        biggest = max(pages, key=lambda p: p.stat().st_size)
        sec.data = {
            "manifest": {"sources": sources, "references": references, "pairs": pairs,
                         "image_px": size},
            "method": "engine for real, job bodies replaced by a fake runner (no model cost)",
            "settings": TRIVIAL,
            "jobs": {k: len(v.computed) for k, v in outcome.stages.items()},
            "wall_s": wall, **times, "fake_job_bodies_s": runner.seconds,
            "seconds_per_pair": wall / pairs,
            "cpu_seconds_per_pair": cpu / pairs,
            "cpu_note": "this process's CPU seconds (time.process_time): what the wall time "
                        "would be on an otherwise idle core",
            "run_json_bytes": (run / "run.json").stat().st_size,
            "output_folder_bytes": dir_bytes(run),
        }
        rep.data = {"files": len(report_files), "pages": len(pages),
                              "bytes": report_bytes, "bytes_per_pair": report_bytes / pairs,
                              "max_page_bytes": biggest.stat().st_size,
                              "max_page": str(biggest.relative_to(run))}
    sec.target("overhead.seconds_per_pair", sec.data["seconds_per_pair"], "<=", 0.025,
               f"{pairs} pairs, model cost removed (fake job bodies)")
    r = rep.data
    rep.target("report.bytes_per_pair", r["bytes_per_pair"], "<=", 30_000,
               f"report files over {pairs} pairs")
    rep.target("report.max_page_bytes", r["max_page_bytes"], "<=", 2_000_000)
    sec.row("seconds per pair: wall / CPU", f"{wall / pairs * 1000:.1f} ms / "
            f"{cpu / pairs * 1000:.1f} ms")
    sec.row(f"{pairs} pairs: plan / pool / finish s",
            f"{times['plan_s']:.1f} / {times['pool_s']:.1f} / {times['finish_s']:.1f}")
    rep.row("report", f"{r['files']} files, {r['pages']} pages, {r['bytes']:,} bytes; "
            f"largest page {r['max_page']}")
    return sec, rep
