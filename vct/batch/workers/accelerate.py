"""Accelerate execution: one ``accelerate launch`` per pool, one rank per GPU of the node.

The parent writes the jobs to a work folder, launches the ranks (:mod:`vct.batch.workers.rank`),
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

from vct.batch.jobs import ROLE, Job, JobOutcome, failed
from vct.batch.workers import ExecutorSettings
from vct.cache import StageCache

log = logging.getLogger("vct.batch")

POLL_SECONDS = 0.05
"""How often the parent reads the ranks' outcome lines: a rank waits about this long between
two units, so it is short (reading a few small files costs nothing)."""
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
    return argv + ["-m", "vct.batch.workers.rank", str(workdir)]


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
    """Where a rank appends its events (ready, outcomes), one JSON line each."""
    return workdir / f"rank-{rank}.jsonl"


def inbox_file(workdir: Path, rank: int) -> Path:
    """Where the parent appends a rank's units of work (and finally ``{"stop": true}``)."""
    return workdir / f"inbox-{rank}.jsonl"


class LineTail:
    """Reads the JSON lines another process appends to a file: only complete lines, from where
    the last call stopped. An unreadable line is logged and skipped."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = 0
        self.partial = b""

    def poll(self) -> list[dict]:
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self.offset)
                chunk = fh.read()
        except FileNotFoundError:
            return []
        self.offset += len(chunk)
        *lines, self.partial = (self.partial + chunk).split(b"\n")
        out = []
        for line in lines:
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                log.warning("%s: an unreadable line (ignored)", self.path.name)
        return out


def append_line(path: Path, record: dict) -> None:
    """One JSON line, written and flushed in one call so a reader never sees half of it."""
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")
        fh.flush()


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


class AccelerateBackend:
    """The pool's workers: one ``accelerate launch`` for the whole run, one rank per GPU.

    Each rank loads the model once, then serves the units the parent appends to its inbox
    (:mod:`vct.batch.workers.rank`), :data:`SLOTS_PER_RANK` outstanding per rank: one, so no unit
    ever waits behind another on a busy rank while a rank that finished sits idle (a rank only
    waits for the parent's next poll, :data:`POLL_SECONDS`, between two units); units go to the
    rank with the fewest outstanding. If the launcher dies (torchrun takes every rank down with one), the units
    still outstanding fail with its exit code and the tail of its stderr, and anything
    submitted later fails at once: nothing hangs, and finished results stay in the cache.
    """

    SLOTS_PER_RANK = 1

    def __init__(self, settings: ExecutorSettings, world: int | None = None):
        self.settings = settings
        self.cache = StageCache(settings.cache_uri)
        cpu = _use_cpu(settings)
        self.world = max(1, min(_num_processes(settings), world or 1 << 30))
        self.workdir = Path(tempfile.mkdtemp(prefix="vct-exec-"))
        self.units: dict[int, tuple[int, list[Job]]] = {}  # unit id -> (rank, jobs)
        self.pending: dict[int, dict[int, JobOutcome]] = {}  # unit id -> outcomes so far
        self.per_rank = [0] * self.world
        self.usage_ = [{"rank": r, "jobs": 0, "busy_s": 0.0, "load_s": 0.0, "ready_at": None}
                       for r in range(self.world)]
        self.ready: list[JobOutcome] = []
        self.next_unit = 0
        self.exit_error: str | None = None
        self.cpu = cpu
        self.proc: subprocess.Popen | None = None
        self.tails = [LineTail(rank_file(self.workdir, r)) for r in range(self.world)]

    def _start(self) -> None:
        """Launch at the first unit: a run whose jobs are all cached loads no model at all."""
        settings, cpu = self.settings, self.cpu
        config_file = config_path(settings, self.world, cpu)
        (self.workdir / JOBS_FILE).write_text(json.dumps({
            "settings": settings.to_dict(), "world": self.world, "parent_pid": os.getpid()}))
        argv = launcher_argv(config_file, self.world, self.workdir)
        log.info("launching %d rank(s): %s", self.world, " ".join(argv))
        with open(self.workdir / LAUNCHER_STDOUT, "wb") as out, \
                open(self.workdir / LAUNCHER_STDERR, "wb") as err:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                         env=_child_env(cpu), cwd=str(self.workdir),
                                         start_new_session=True)

    # ---------------------------------------------------------------- the pool's side
    def free_slots(self) -> int:
        if self.exit_error is not None:
            return 1 << 30  # whatever is left fails at once
        return sum(max(0, self.SLOTS_PER_RANK - n) for n in self.per_rank)

    def outstanding(self) -> int:
        return len(self.units) + (1 if self.ready else 0)

    def submit(self, unit: list[Job]) -> None:
        uid, self.next_unit = self.next_unit, self.next_unit + 1
        rank = min(range(self.world), key=lambda r: (self.per_rank[r], r))
        self.units[uid] = (rank, unit)
        self.pending[uid] = {}
        self.per_rank[rank] += 1
        if self.proc is None and self.exit_error is None:
            try:
                self._start()
            except Exception as exc:  # a missing accelerate config, say: every unit fails
                self.exit_error = f"could not be launched: {type(exc).__name__}: {exc}"
        if self.exit_error is not None:
            self._fail_outstanding()
            return
        append_line(inbox_file(self.workdir, rank),
                    {"unit": uid, "jobs": [job.to_dict() for job in unit]})

    def poll(self, timeout: float) -> list[JobOutcome]:
        deadline = time.monotonic() + timeout
        while True:
            self._collect()
            if self.ready or not self.units:
                break
            if self.proc is not None and self.proc.poll() is not None:
                self._collect()  # lines written just before the exit
                self._launcher_died()
                break
            if time.monotonic() >= deadline:
                break
            time.sleep(min(POLL_SECONDS, max(0.0, deadline - time.monotonic())))
        out, self.ready = self.ready, []
        return out

    def usage(self) -> list[dict]:
        return [dict(u) for u in self.usage_]

    def close(self) -> None:
        try:
            if self.proc is not None and self.proc.poll() is None:
                for rank in range(self.world):
                    append_line(inbox_file(self.workdir, rank), {"stop": True})
                try:
                    self.proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    _terminate(self.proc)
        except BaseException:
            self.cancel()
            raise
        finally:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def cancel(self) -> None:
        """Cancelled (Ctrl-C, flow cancellation): take the ranks down too."""
        if self.proc is not None:
            _terminate(self.proc)

    # ---------------------------------------------------------------- the ranks' lines
    def _collect(self) -> None:
        for rank, tail in enumerate(self.tails):
            for line in tail.poll():
                self._line(rank, line)

    def _line(self, rank: int, line: dict) -> None:
        if line.get("event") == "ready":
            self.usage_[rank]["ready_at"] = time.time()
            self.usage_[rank]["load_s"] = float(line.get("load_s", 0.0))
            return
        uid, index = line.get("unit"), line.get("index")
        entry = self.units.get(uid) if isinstance(uid, int) else None
        if entry is None or not isinstance(index, int) or not 0 <= index < len(entry[1]) \
                or entry[1][index].key != line.get("key") or index in self.pending[uid]:
            log.warning("rank %d reported an unknown job (ignored): %s", rank, line)
            return
        job = entry[1][index]
        outcome = JobOutcome.from_dict(line)
        if outcome.ok and not self.cache.contains(job.kind, job.key):
            outcome = failed(job, outcome.rank,
                             f"{ROLE[job.kind]} {job.input_uri}: rank {outcome.rank} reported "
                             f"success but {self.cache.uri(job.kind, job.key)} is missing")
        self.usage_[rank]["jobs"] += 1
        self.usage_[rank]["busy_s"] += max(0.0, outcome.seconds)
        self._deliver(uid, index, outcome)

    def _deliver(self, uid: int, index: int, outcome: JobOutcome) -> None:
        rank, unit = self.units[uid]
        self.pending[uid][index] = outcome
        self.ready.append(outcome)
        if len(self.pending[uid]) == len(unit):
            del self.units[uid], self.pending[uid]
            self.per_rank[rank] -= 1

    def _launcher_died(self) -> None:
        code = self.proc.returncode if self.proc is not None else None
        tail = _tail(self.workdir / LAUNCHER_STDERR)
        self.exit_error = (f"exited with code {code}" if code != 0
                           else "exited without reporting this job (code 0)")
        if tail:
            self.exit_error += f"; launcher stderr: {tail}"
        self._fail_outstanding()

    def _fail_outstanding(self) -> None:
        for uid in sorted(self.units):
            rank, unit = self.units[uid]
            for index, job in enumerate(unit):
                if index not in self.pending.get(uid, {}):
                    self._deliver(uid, index, failed(
                        job, rank, f"{ROLE[job.kind]} {job.input_uri}: worker rank {rank} "
                                   f"{self.exit_error}"))
