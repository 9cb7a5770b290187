"""Rank utilization on 2 accelerate CPU ranks, on the crossed manifest, before and after the
job pool.

- before: the stage-by-stage path (``engine.run_stage`` for concepts, then contents, then
  ``engine.fuse_and_write``), each stage its own accelerate launch (the model loaded on every
  rank again) and a barrier. A rank's utilization = its busy seconds (the sum of its
  ``JobOutcome.seconds`` over the three stages) / the wall time of the three stages.
- after: ``engine.run`` with executor=accelerate, one launch for the run: run.json's
  ``details.ranks[*].utilization`` (busy / the time from its model being loaded to the pool's
  last outcome; the ranks' start-up and shutdown are in the pool's wall time, not in it),
  and busy / the run's whole pool wall time for comparison with "before".
"""

from __future__ import annotations

import json
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from benchmarks.common import QUICK, Section, crossed, tiny_model
from vct.batch import engine
from vct.batch.workers import run_jobs

# Jobs of seconds each on a 1-thread CPU rank (the tiny model), so that each launch's model
# load does not dominate; the same settings both ways.
SETTINGS = {"concept": {"max_train_steps": 25, "gradient_accumulation_steps": 4,
                        "reference_resolution": 32},
            "content": {"num_inference_steps": 10, "num_inner_steps": 15, "resolution": 32},
            "fusion": {}}


def _settings(root: Path, name: str, quick: bool) -> dict:
    return {**(QUICK if quick else SETTINGS), "cache_uri": str(root / name / "cache"),
            "executor": "accelerate", "num_processes": 2, "device": "cpu"}


def before(manifest: Path, root: Path, model: str, quick: bool) -> dict:
    request = engine.prepare(str(manifest), str(root / "before"), model,
                             _settings(root, "before", quick), run_id="bench")
    the_plan = engine.plan(request)
    executor = request.executor()
    outcomes = []

    def recording(jobs, settings, **kw):
        out = run_jobs(jobs, settings, **kw)
        outcomes.extend(out)
        return out

    stage_s = {}
    start = time.perf_counter()
    stages = {}
    for kind in ("concept", "content"):
        t = time.perf_counter()
        stages[kind] = engine.run_stage(kind, the_plan.jobs(kind), executor, runner=recording)
        stage_s[kind] = time.perf_counter() - t
    t = time.perf_counter()
    fused = engine.fuse_and_write(the_plan, stages, executor, runner=recording)
    stage_s["fusion"] = time.perf_counter() - t
    wall = time.perf_counter() - start
    if {p.status for p in fused.pairs.values()} != {"ok"}:
        raise RuntimeError("the stage-by-stage run did not complete")
    busy: dict[int, float] = defaultdict(float)
    jobs: dict[int, int] = defaultdict(int)
    for o in outcomes:
        busy[o.rank] += o.seconds
        jobs[o.rank] += 1
    ranks = [{"rank": r, "jobs": jobs[r], "busy_s": busy[r], "utilization": busy[r] / wall}
             for r in sorted(busy)]
    if len(ranks) < 2:  # a rank that never got a job was idle throughout
        ranks += [{"rank": r, "jobs": 0, "busy_s": 0.0, "utilization": 0.0}
                  for r in range(2) if r not in busy]
    return {"wall_s": wall, "stage_s": stage_s, "launches": 3, "ranks": ranks,
            "min_utilization": min(r["utilization"] for r in ranks)}


def after(manifest: Path, root: Path, model: str, quick: bool) -> dict:
    request = engine.prepare(str(manifest), str(root / "after"), model,
                             _settings(root, "after", quick), run_id="bench")
    start = time.perf_counter()
    summary = engine.run(request)
    wall = time.perf_counter() - start
    if summary.status != "complete":
        raise RuntimeError(f"the pooled run did not complete: {summary.message}")
    details = json.loads((Path(summary.run_uri) / "run.json").read_text())["details"]
    pool_wall = details["pool"]["wall_s"]
    ranks = [{**r, "busy_over_pool_wall": r["busy_s"] / pool_wall} for r in details["ranks"]]
    return {"wall_s": wall, "pool_wall_s": pool_wall, "launches": 1, "ranks": ranks,
            "min_utilization": details["pool"]["min_utilization"],
            "min_busy_over_pool_wall": min(r["busy_over_pool_wall"] for r in ranks)}


def measure(quick: bool = False) -> Section:
    sec = Section("utilization")
    model = tiny_model()
    s_count, r_count = (3, 2) if quick else (6, 3)
    with tempfile.TemporaryDirectory(prefix="vct-bench-util-") as tmp:
        root = Path(tmp)
        manifest, _, _ = crossed(root / "in", s_count, r_count)
        b = before(manifest, root, model, quick)
        a = after(manifest, root, model, quick)
    sec.data = {"manifest": {"sources": s_count, "references": r_count},
                "settings": QUICK if quick else SETTINGS,
                "min_rank": {"before": b["min_utilization"], "after": a["min_utilization"],
                             "after_busy_over_pool_wall": a["min_busy_over_pool_wall"]},
                "before": b, "after": a}
    sec.target("utilization.min_rank.after", a["min_utilization"], ">=", 0.9,
               "run.json details.pool.min_utilization (busy / ready)")
    sec.row("min rank utilization before / after",
            f"{b['min_utilization']:.3f} (busy / 3 stages' wall) / {a['min_utilization']:.3f} "
            f"(busy / ready); after busy / pool wall {a['min_busy_over_pool_wall']:.3f}")
    sec.row("wall s before (3 launches) / after (1)", f"{b['wall_s']:.1f} / {a['wall_s']:.1f}")
    return sec
