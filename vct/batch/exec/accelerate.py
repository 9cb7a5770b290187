"""Accelerate execution: one ``accelerate launch`` per batch, one rank per GPU of the node.

The parent writes the jobs to a work folder, launches the ranks (:mod:`vct.batch.exec.rank`),
reads the outcome lines they append as jobs finish, and turns a rank that died into failed
outcomes for exactly the jobs it had not reported. Results land in the stage cache only; an ok
that left no cache entry is a failure (trust the cache, not a claim).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vct.batch.exec import ExecutorSettings, ProgressCallback, notify
from vct.batch.jobs import ROLE, Job, JobOutcome, assign, failed
from vct.cache import StageCache

log = logging.getLogger("vct.batch")

POLL_SECONDS = 0.5
STDERR_TAIL_LINES = 8
JOBS_FILE = "jobs.json"
LAUNCHER_STDOUT = "launcher.out"
LAUNCHER_STDERR = "launcher.err"
# Set in the child's environment when the ranks must run on CPU (tests, CPU dev boxes); the
# rank then builds PartialState(cpu=True), which is what makes 2 CPU processes a gloo world.
CPU_ENV = "VCT_ACCELERATE_CPU"
CONFIG_DIR = Path(__file__).resolve().parent / "configs"
"""accelerate launch configs, shipped inside the package (a wheel has no infra/)."""


def _num_processes(settings: ExecutorSettings) -> int:
    if settings.num_processes is not None:
        return settings.num_processes
    if settings.cpu:
        return 2
    import torch

    return max(1, torch.cuda.device_count())


def _use_cpu(settings: ExecutorSettings) -> bool:
    """CPU ranks when asked, or when there is no GPU: a bare PartialState without CUDA makes
    every process believe it is alone, so each would run every job."""
    if settings.cpu or settings.device == "cpu":
        return True
    import torch

    return not torch.cuda.is_available()


def config_path(settings: ExecutorSettings, world: int, cpu: bool) -> str:
    """The config file passed with ``--config_file``: always one, so a user-level
    ``default_config.yaml`` never changes what we launch."""
    if settings.accelerate_config:
        if not Path(settings.accelerate_config).is_file():
            raise FileNotFoundError(f"accelerate config {settings.accelerate_config}: no such file")
        return settings.accelerate_config
    name = "single_gpu.yaml" if world == 1 else ("cpu_2proc.yaml" if cpu else "multi_gpu.yaml")
    return str(CONFIG_DIR / name)


def launcher_argv(config_file: str, world: int, workdir: Path) -> list[str]:
    """``accelerate launch`` with every setting that matters given as a flag (platform notes:
    on CPU only ``--multi_gpu`` with ``PartialState(cpu=True)`` gives a real 2-process world;
    ``--cpu --num_processes 2`` silently runs one process)."""
    argv = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config_file,
            "--num_processes", str(world), "--num_machines", "1", "--machine_rank", "0",
            "--main_process_port", "0", "--mixed_precision", "no", "--dynamo_backend", "no"]
    if world > 1:
        argv.append("--multi_gpu")
    return argv + ["-m", "vct.batch.exec.rank", str(workdir)]


def _child_env(cpu: bool) -> dict[str, str]:
    """Inherit everything (AWS, HF_HUB_OFFLINE, CUDA_VISIBLE_DEVICES); make sure the ranks import
    this very vct package; flag CPU ranks."""
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parents[3])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    if cpu:
        env[CPU_ENV] = "1"
    else:
        env.pop(CPU_ENV, None)
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    env.setdefault("DIFFUSERS_VERBOSITY", "error")
    return env


def rank_file(workdir: Path, rank: int) -> Path:
    return workdir / f"rank-{rank}.jsonl"


class _RankReader:
    """Reads the outcome lines ranks append, only complete lines, remembering the offset."""

    def __init__(self, workdir: Path, world: int):
        self.workdir = workdir
        self.offsets = [0] * world
        self.partial = [b""] * world

    def poll(self) -> list[tuple[int, dict]]:
        new: list[tuple[int, dict]] = []
        for rank in range(len(self.offsets)):
            try:
                with open(rank_file(self.workdir, rank), "rb") as fh:
                    fh.seek(self.offsets[rank])
                    chunk = fh.read()
            except FileNotFoundError:
                continue
            self.offsets[rank] += len(chunk)
            data = self.partial[rank] + chunk
            *lines, self.partial[rank] = data.split(b"\n")
            for line in lines:
                if not line.strip():
                    continue
                try:
                    new.append((rank, json.loads(line)))
                except json.JSONDecodeError:
                    log.warning("rank %d wrote an unreadable outcome line (ignored)", rank)
        return new


def _tail(path: Path, lines: int = STDERR_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    kept = [line.rstrip() for line in text.splitlines() if line.strip()]
    return " | ".join(kept[-lines:])


def _terminate(proc: subprocess.Popen) -> None:
    """Stop the launcher and its ranks (their own process group, started by us)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def run(jobs: list[Job], settings: ExecutorSettings,
        on_progress: ProgressCallback | None) -> list[JobOutcome]:
    cache = StageCache(settings.cache_uri)
    cpu = _use_cpu(settings)
    world = min(_num_processes(settings), len(jobs))  # an idle rank only costs a model load
    shares = assign(jobs, world)
    owner = {j: rank for rank, share in enumerate(shares) for j in share}
    workdir = Path(tempfile.mkdtemp(prefix="vct-exec-"))
    try:
        config_file = config_path(settings, world, cpu)
        (workdir / JOBS_FILE).write_text(json.dumps({
            "settings": settings.to_dict(), "world": world,
            "jobs": [job.to_dict() for job in jobs]}))
        argv = launcher_argv(config_file, world, workdir)
        log.info("launching %d rank(s) for %d job(s): %s", world, len(jobs), " ".join(argv))
        with open(workdir / LAUNCHER_STDOUT, "wb") as out, \
                open(workdir / LAUNCHER_STDERR, "wb") as err:
            proc = subprocess.Popen(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                    env=_child_env(cpu), cwd=str(workdir),
                                    start_new_session=True)
        reader = _RankReader(workdir, world)
        done = [0] * world
        got: dict[int, JobOutcome] = {}

        def collect() -> None:
            for rank, line in reader.poll():
                outcome = JobOutcome.from_dict(line)
                j = line.get("index")
                if not isinstance(j, int) or not 0 <= j < len(jobs) or j in got \
                        or jobs[j].key != outcome.key:
                    log.warning("rank %d reported an unknown job (ignored): %s", rank, line)
                    continue
                got[j] = outcome
                done[rank] += 1
                notify(on_progress, {"rank": rank, "done": done[rank],
                                     "total": len(shares[rank]), "key": outcome.key,
                                     "kind": outcome.kind, "ok": outcome.ok})

        try:
            while proc.poll() is None:
                collect()
                time.sleep(POLL_SECONDS)
        except BaseException:  # cancelled (Ctrl-C, flow cancellation): take the ranks down too
            _terminate(proc)
            raise
        collect()
        code = proc.returncode
        tail = _tail(workdir / LAUNCHER_STDERR)
        outcomes = []
        for j, job in enumerate(jobs):
            outcome = got.get(j)
            if outcome is None:
                rank = owner[j]
                error = f"worker rank {rank} exited with code {code}"
                if code == 0:
                    error = f"worker rank {rank} exited without reporting this job (code 0)"
                outcome = failed(job, rank, f"{ROLE[job.kind]} {job.input_uri}: {error}"
                                 + (f"; launcher stderr: {tail}" if tail else ""))
            elif outcome.ok and not cache.contains(job.kind, job.key):
                outcome = failed(job, outcome.rank,
                                 f"{ROLE[job.kind]} {job.input_uri}: rank {outcome.rank} "
                                 f"reported success but {cache.uri(job.kind, job.key)} is "
                                 "missing")
            outcomes.append(outcome)
        return outcomes
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
