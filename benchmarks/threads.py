"""A stage's time idle and with one competing busy process, with the thread budget and with
torch's default thread count.

The stage: one content inversion of the tiny model. The competing process is a
``python -c 'while True: pass'`` subprocess. The budgeted count is
``vct.threads.thread_budget(ranks=2)``: this process's share of the node's cores when one other
process (here the busy one; in a run, the other rank or the embedded Prefect server) needs a
core; torch's default is its own count at start-up (every core). Each figure is the median of
``repeats`` runs (one run at torch's default). ``slowdown_under_load`` = budgeted time under load / budgeted time idle.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from contextlib import contextmanager

import torch
from PIL import Image

from benchmarks.common import ROOT, Section, tiny_model
from vct.config import ContentConfig
from vct.content import invert_content
from vct.models import load_models
from vct.threads import available_cores, thread_budget

TORCH_DEFAULT_THREADS = torch.get_num_threads()
"""torch's own count, read when this module is imported (before any budget is applied)."""


@contextmanager
def busy_process():
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    time.sleep(0.5)  # let it reach the spin loop
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def measure(quick: bool = False, repeats: int = 3, default_threads: int | None = None) -> Section:
    sec = Section("threads")
    default = default_threads or TORCH_DEFAULT_THREADS
    budget = thread_budget(ranks=2)
    models = load_models(tiny_model(), device="cpu")
    image = Image.open(ROOT / "manifests/images/house.png").convert("RGB")
    # A small stage: with every core's worth of threads on a shared box, torch's default can
    # run 20x slower than the budget (spinning threads), so its figures are one run each.
    cfg = ContentConfig(num_inference_steps=4, num_inner_steps=2, resolution=32)
    reps = 1 if quick else repeats

    def stage_seconds(threads: int, runs: int | None = None) -> float:
        torch.set_num_threads(threads)
        times = []
        for _ in range(runs or reps):
            start = time.perf_counter()
            invert_content(models, image, cfg)
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    previous = torch.get_num_threads()
    try:
        stage_seconds(budget)  # warm-up (first calls allocate)
        idle = {"budget": stage_seconds(budget), "default": stage_seconds(default, 1)}
        with busy_process():
            loaded = {"budget": stage_seconds(budget), "default": stage_seconds(default, 1)}
    finally:
        torch.set_num_threads(previous)
    sec.data = {
        "stage": f"one content inversion, T={cfg.num_inference_steps}, "
                 f"{cfg.num_inner_steps} inner steps, 32 px, tiny model",
        "cores": available_cores(), "budget_threads": budget, "default_threads": default,
        "repeats": reps, "repeats_default": 1, "idle_s": idle, "under_load_s": loaded,
        "slowdown_under_load": loaded["budget"] / idle["budget"],
        "slowdown_under_load_default": loaded["default"] / idle["budget"],
    }
    sec.target("threads.slowdown_under_load", sec.data["slowdown_under_load"], "<=", 2.5,
               f"{budget} budgeted thread(s), one busy process")
    sec.row(f"idle s: budget {budget} / default {default} threads",
            f"{idle['budget']:.2f} / {idle['default']:.2f}")
    sec.row("under load s: budget / default",
            f"{loaded['budget']:.2f} / {loaded['default']:.2f} "
            f"(default slowdown x{sec.data['slowdown_under_load_default']:.2f})")
    return sec
