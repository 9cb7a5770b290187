"""Rank utilization on 2 accelerate CPU ranks, on the crossed manifest, in the job pool.

``engine.run`` with executor=accelerate, one launch for the run: run.json's
``details.ranks[*].utilization`` (busy / the time from its model being loaded to the pool's
last outcome; the ranks' start-up and shutdown are in the pool's wall time, not in it), and
busy / the run's whole pool wall time. The stage-by-stage path this was first compared with
(a launch and a barrier per stage) is gone: every run, sharded or not, is the pool now.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from benchmarks.common import QUICK, Section, crossed, tiny_model
from vct.batch import engine

# Jobs of seconds each on a 1-thread CPU rank (the tiny model), so that each launch's model
# load does not dominate.
SETTINGS = {"concept": {"max_train_steps": 25, "gradient_accumulation_steps": 4,
                        "reference_resolution": 32},
            "content": {"num_inference_steps": 10, "num_inner_steps": 15, "resolution": 32},
            "fusion": {}}


def _settings(root: Path, name: str, quick: bool) -> dict:
    return {**(QUICK if quick else SETTINGS), "cache_uri": str(root / name / "cache"),
            "executor": "accelerate", "num_processes": 2, "device": "cpu"}


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
        a = after(manifest, root, model, quick)
    sec.data = {"manifest": {"sources": s_count, "references": r_count},
                "settings": QUICK if quick else SETTINGS,
                "min_rank": {"after": a["min_utilization"],
                             "after_busy_over_pool_wall": a["min_busy_over_pool_wall"]},
                "after": a}
    sec.target("utilization.min_rank.after", a["min_utilization"], ">=", 0.9,
               "run.json details.pool.min_utilization (busy / ready)")
    sec.row("min rank utilization in the pool",
            f"{a['min_utilization']:.3f} (busy / ready); busy / pool wall "
            f"{a['min_busy_over_pool_wall']:.3f}")
    sec.row("wall s (1 launch)", f"{a['wall_s']:.1f}")
    return sec
