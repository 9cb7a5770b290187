"""One accelerate rank: ``accelerate launch ... -m vct.batch.workers.rank WORKDIR``.

The parent (:class:`vct.batch.workers.accelerate.AccelerateBackend`) wrote ``WORKDIR/jobs.json``
with the settings, the world size it launched and its pid. Each rank loads the model once onto
its own device, says so (``{"event": "ready", "load_s"}``), then serves the units the parent
appends to ``WORKDIR/inbox-<r>.jsonl`` until ``{"stop": true}`` (or until the parent is gone):
it runs each unit with :func:`vct.batch.jobs.run_in_order` and appends one JSON line per
outcome to ``WORKDIR/rank-<r>.jsonl``, flushed per line, so the parent sees progress as it
happens and a crash loses only unfinished jobs.

A rank never exits non-zero for a job failure: torchrun takes every rank down when one fails,
which would turn one bad image into a failed run. Results go to the stage cache only.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import TextIO

from vct.batch.jobs import Job, JobOutcome, error_line, run_in_order
from vct.batch.workers import ExecutorSettings
from vct.batch.workers.accelerate import CPU_ENV, JOBS_FILE, rank_file

EXIT_BAD_WORLD = 3


def rank_device(settings: ExecutorSettings, cpu: bool, local_index: int) -> str:
    """``cuda:<local rank>`` on a GPU node (one GPU per rank), else CPU; an explicit
    ``device="cpu"`` is honoured, any CUDA choice is replaced by the rank's own GPU."""
    import torch

    if cpu or settings.device == "cpu" or not torch.cuda.is_available():
        return "cpu"
    return f"cuda:{local_index}"


IDLE_POLL_SECONDS = 0.02


def _write(out: TextIO, record: dict) -> None:
    out.write(json.dumps(record) + "\n")
    out.flush()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, not ours
        return True
    return True


def serve(models, load_error: BaseException | None, settings: ExecutorSettings, workdir: Path,
          rank: int, parent_pid: int, out: TextIO) -> None:
    """Run the units of this rank's inbox until told to stop or the parent is gone. Without
    models (their load failed) every job fails with the model's own message."""
    from vct.batch.workers.accelerate import LineTail, inbox_file
    from vct.cache import StageCache

    cache = StageCache(settings.cache_uri)
    inbox = LineTail(inbox_file(workdir, rank))
    while True:
        messages = inbox.poll()
        if not messages:
            if parent_pid and not _alive(parent_pid):
                return
            time.sleep(IDLE_POLL_SECONDS)
            continue
        for message in messages:
            if message.get("stop"):
                return
            uid, jobs = message["unit"], [Job.from_dict(d) for d in message["jobs"]]
            if models is None:
                for i, job in enumerate(jobs):
                    _write(out, {**JobOutcome(job.kind, job.key, ok=False, rank=rank,
                                              seconds=0.0,
                                              error=error_line(job, load_error)).to_dict(),
                                 "unit": uid, "index": i})
                continue
            for i, outcome in run_in_order(models, jobs, list(range(len(jobs))), cache, rank,
                                           max(1, len(jobs))):
                _write(out, {**outcome.to_dict(), "unit": uid, "index": i})


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: accelerate launch ... -m vct.batch.workers.rank WORKDIR", file=sys.stderr)
        return 2
    workdir = Path(args[0])
    spec = json.loads((workdir / JOBS_FILE).read_text())
    settings = ExecutorSettings.from_dict(spec["settings"])
    cpu = os.environ.get(CPU_ENV) == "1"

    from vct.logs import quiet_libraries

    quiet_libraries()  # the launcher's stderr tail goes into error messages: keep it ours
    from accelerate import PartialState

    from vct.threads import apply_thread_budget

    state = PartialState(cpu=cpu)
    rank, world = state.process_index, state.num_processes
    if world != spec["world"]:
        # Every process believing it is alone would serve (and report) as rank 0.
        print(f"vct rank: launched as a world of {spec['world']} but this process sees "
              f"{world} (on CPU set {CPU_ENV}=1 and launch with --multi_gpu)", file=sys.stderr)
        return EXIT_BAD_WORLD
    # N processes on a node: N x all-cores threads would oversubscribe it badly.
    apply_thread_budget(world, settings.threads)

    from vct.models import load_models

    with open(rank_file(workdir, rank), "a", encoding="utf-8") as out:
        start = time.perf_counter()
        models, load_error = None, None
        try:
            device = rank_device(settings, cpu, state.local_process_index)
            models = load_models(settings.model, device, settings.dtype,
                                 config=settings.model_config)
        except Exception as exc:  # every job of this rank fails with the model's own message
            load_error = exc
        _write(out, {"event": "ready", "rank": rank, "load_s": time.perf_counter() - start,
                     "ok": models is not None})
        serve(models, load_error, settings, workdir, rank, int(spec.get("parent_pid") or 0), out)
    # No barrier: ranks finish at different times, and a barrier's timeout would kill the
    # slower ranks' work. Destroying the group is local and silences torch's exit warning.
    state.destroy_process_group()
    return 0


def exit_now(code: int) -> None:
    """Leave without the interpreter's teardown: everything this rank reports is written and
    flushed (its events file is closed), and tearing down torch's modules and threads took
    about 2 s on CPU ranks, which the parent waits for at the end of every run."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
