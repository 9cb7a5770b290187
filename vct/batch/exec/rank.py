"""One accelerate rank: ``accelerate launch ... -m vct.batch.exec.rank WORKDIR``.

The parent (:mod:`vct.batch.exec.accelerate`) wrote ``WORKDIR/jobs.json`` with the settings,
the world size it launched and the jobs. Each rank loads the model once onto its own device,
takes its share (:func:`vct.batch.jobs.assign`, the same the parent uses to know who owed
what), runs it with :func:`vct.batch.jobs.run_in_order` and appends one JSON line per outcome
to ``WORKDIR/rank-<r>.jsonl``, flushed per line, so the parent can report progress and a crash
loses only unfinished jobs.

A rank never exits non-zero for a job failure: torchrun takes every rank down when one fails,
which would turn one bad image into a failed batch. Results go to the stage cache only.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import TextIO

from vct.batch.exec import ExecutorSettings
from vct.batch.exec.accelerate import CPU_ENV, JOBS_FILE, rank_file
from vct.batch.jobs import Job, JobOutcome, assign, error_line, run_in_order

EXIT_BAD_WORLD = 3


def rank_device(settings: ExecutorSettings, cpu: bool, local_index: int) -> str:
    """``cuda:<local rank>`` on a GPU node (one GPU per rank), else CPU; an explicit
    ``device="cpu"`` is honoured, any CUDA choice is replaced by the rank's own GPU."""
    import torch

    if cpu or settings.device == "cpu" or not torch.cuda.is_available():
        return "cpu"
    return f"cuda:{local_index}"


def _write(out: TextIO, index: int, outcome: JobOutcome) -> None:
    out.write(json.dumps({**outcome.to_dict(), "index": index}) + "\n")
    out.flush()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: accelerate launch ... -m vct.batch.exec.rank WORKDIR", file=sys.stderr)
        return 2
    workdir = Path(args[0])
    spec = json.loads((workdir / JOBS_FILE).read_text())
    settings = ExecutorSettings.from_dict(spec["settings"])
    jobs = [Job.from_dict(d) for d in spec["jobs"]]
    cpu = os.environ.get(CPU_ENV) == "1"

    from vct.logs import quiet_libraries

    quiet_libraries()  # the launcher's stderr tail goes into error messages: keep it ours
    from accelerate import PartialState

    from vct.threads import apply_thread_budget

    state = PartialState(cpu=cpu)
    rank, world = state.process_index, state.num_processes
    if world != spec["world"]:
        # Every process believing it is alone would run (and report) every job as rank 0.
        print(f"vct rank: launched as a world of {spec['world']} but this process sees "
              f"{world} (on CPU set {CPU_ENV}=1 and launch with --multi_gpu)", file=sys.stderr)
        return EXIT_BAD_WORLD
    # N processes on a node: N x all-cores threads would oversubscribe it badly.
    apply_thread_budget(world, settings.threads)
    share = assign(jobs, world)[rank]

    from vct.cache import StageCache
    from vct.models import load_models

    cache = StageCache(settings.cache_uri)
    with open(rank_file(workdir, rank), "a", encoding="utf-8") as out:
        try:
            device = rank_device(settings, cpu, state.local_process_index)
            models = load_models(settings.model, device, settings.dtype)
        except Exception as exc:  # every job of this rank fails with the model's own message
            for j in share:
                _write(out, j, JobOutcome(jobs[j].kind, jobs[j].key, ok=False, rank=rank,
                                          seconds=0.0, error=error_line(jobs[j], exc)))
            models = None
        if models is not None:
            for j, outcome in run_in_order(models, jobs, share, cache, rank,
                                           settings.content_batch):
                _write(out, j, outcome)
    # No barrier: ranks finish at different times, and a barrier's timeout would kill the
    # slower ranks' work. Destroying the group is local and silences torch's exit warning.
    state.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
