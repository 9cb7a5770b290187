"""Run a batch of expensive stage jobs (concept / content inversions) in process or on all GPUs.

The flow decides *what* to compute (it builds :class:`Job` objects with their cache keys); this
module decides *where*: in this process (``mode="local"``, CPU or one GPU) or across every GPU
of the node with ``accelerate launch`` (``mode="accelerate"``, one rank per GPU, see
``vct/worker.py``). Both modes share :func:`run_job`, so a result does not depend on the mode.

Contracts the callers rely on:

- Results land only in the content-addressed :class:`~vct.cache.StageCache` (atomic writes);
  an outcome says whether its job's entry is there, it never carries the result itself. So a
  crashed run loses nothing that finished, and a rerun skips every job whose key is cached.
- A failing job fails only itself: every exception is caught per job and becomes one line
  naming the input (``ok=False``); a dying accelerate rank fails only the jobs it had not
  finished. :func:`run_jobs` returns exactly one outcome per input job, in input order.
- Jobs run biggest-first (``cost``), so the long ones start early and ranks finish together.

The library never imports Prefect; the flow wraps :func:`run_jobs` in a task.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from vct import storage
from vct.cache import StageCache
from vct.config import ConceptConfig, ContentConfig, from_dict
from vct.errors import user_errors
from vct.models import VCTModels

log = logging.getLogger("vct.executor")

KINDS = ("concept", "content", "fusion")
MODES = ("local", "accelerate")
# How the input is named in error messages (decode_image prefixes its errors with this name).
ROLE = {"concept": "reference", "content": "source", "fusion": "source"}
_KEY_RE = re.compile(r"^[0-9a-f]{64}$")

POLL_SECONDS = 0.5
STDERR_TAIL_LINES = 8
JOBS_FILE = "jobs.json"
LAUNCHER_STDOUT = "launcher.out"
LAUNCHER_STDERR = "launcher.err"
# Set in the child's environment when the ranks must run on CPU (tests, CPU dev boxes); the
# worker then builds PartialState(cpu=True), which is what makes 2 CPU processes a gloo world.
CPU_ENV = "VCT_ACCELERATE_CPU"

ACCELERATE_CONFIG_DIR = Path(__file__).resolve().parent.parent / "infra" / "accelerate"

ProgressCallback = Callable[[dict], None]


# ---------------------------------------------------------------- data
def _from_fields(cls, d: dict):
    """Rebuild a dataclass from its dict, ignoring keys it does not have (newer writers)."""
    return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


@dataclass(frozen=True)
class Job:
    """One stage computation: ``kind`` on the image at ``input_uri`` with ``config``.

    ``key`` is computed by the caller (``vct.stages.concept_key`` / ``content_key``); the executor
    checks that the stage produced a result under that same key, so a caller whose key recipe
    drifted from the stages' gets a loud failure rather than an entry nobody will ever read.
    """

    kind: str
    key: str
    input_uri: str
    config: dict
    cost: float = 1.0

    def __post_init__(self) -> None:
        # Caller bugs, not job failures: refuse them when the job is built.
        if self.kind not in KINDS:
            raise ValueError(f"job kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if not _KEY_RE.match(self.key):
            raise ValueError(f"job key {self.key!r} is not a 64-hex-digit cache key")
        if not isinstance(self.cost, int | float) or not math.isfinite(self.cost):
            raise ValueError(f"job cost must be a finite number, got {self.cost!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Job:
        return _from_fields(cls, d)


@dataclass
class JobOutcome:
    """What happened to one job. ``rank`` is the accelerate rank that ran it (0 in local mode;
    -1 when the parent settled it without a worker: a cache hit before launch). ``skipped``
    marks a job whose key was already cached (``seconds`` 0, no UNet evaluations)."""

    kind: str
    key: str
    ok: bool
    rank: int
    seconds: float
    error: str | None = None
    unet_evals: dict[str, int] = field(default_factory=dict)
    skipped: bool = False

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> JobOutcome:
        return _from_fields(cls, d)


@dataclass(frozen=True)
class ExecutorSettings:
    """Where and how jobs run.

    ``num_processes`` (accelerate) defaults to one per visible GPU, or 2 with ``cpu=True``;
    ``accelerate_config`` defaults to a file of ``infra/accelerate/`` that matches the launch.
    ``cpu=True`` runs the accelerate ranks on CPU with gloo (tests, CPU dev boxes).
    """

    model: str
    cache_uri: str
    device: str = "auto"
    dtype: str = "fp32"
    mode: str = "local"
    num_processes: int | None = None
    accelerate_config: str | None = None
    cpu: bool = False
    content_batch: int = 1

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"executor mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.content_batch < 1:
            raise ValueError(f"content_batch must be >= 1, got {self.content_batch}")
        if self.num_processes is not None and self.num_processes < 1:
            raise ValueError(f"num_processes must be >= 1, got {self.num_processes}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ExecutorSettings:
        return _from_fields(cls, d)


# ---------------------------------------------------------------- the single-job body
def _first_line(text: str) -> str:
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    return lines[0] if lines else ""


def error_line(job: Job, exc: BaseException) -> str:
    """One line that names the job's input: user errors keep their message, anything else
    becomes ``Type: first line``; the input is prefixed when the message does not name it."""
    if isinstance(exc, user_errors()):
        message = _first_line(str(exc)) or type(exc).__name__
    else:
        detail = _first_line(str(exc))
        message = f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
    if job.input_uri not in message:
        message = f"{ROLE[job.kind]} {job.input_uri}: {message}"
    return message


def run_job(models: VCTModels, job: Job, cache: StageCache, rank: int = 0) -> JobOutcome:
    """Compute one job into the cache; never raises for a job-level failure.

    A job whose key is already cached is skipped (idempotent reruns after a crash). The models
    must not be used by another thread meanwhile (concept inversion swaps the text encoder's
    embedding table while it runs); :func:`run_jobs` holds a per-model lock for that.
    """
    from vct.stages import run_concept, run_content

    start = time.perf_counter()
    evals_before = Counter(models.unet_evals)
    try:
        if cache.contains(job.kind, job.key):
            return JobOutcome(job.kind, job.key, ok=True, rank=rank, seconds=0.0, skipped=True)
        if job.kind == "fusion":
            result = _fusion(models, job, cache)
        else:
            data = storage.read_bytes(job.input_uri)
            name = f"{ROLE[job.kind]} {job.input_uri}"
            if job.kind == "concept":
                # num_processes=1 always: a job runs on one device, and the learning rate
                # scaling must not depend on the executor, or one key would hold two results.
                result = run_concept(models, data, name, from_dict(ConceptConfig, job.config))
            else:
                result = run_content(models, data, name, from_dict(ContentConfig, job.config))
        _store(cache, job, result)
        ok, error = True, None
    except Exception as exc:  # one job's failure must not end the batch
        ok, error = False, error_line(job, exc)
        log.warning("job %s %s failed: %s", job.kind, job.key[:12], error)
        _release_accelerator_memory()
    evals = Counter(models.unet_evals)
    evals.subtract(evals_before)
    return JobOutcome(job.kind, job.key, ok=ok, rank=rank, seconds=time.perf_counter() - start,
                      error=error, unet_evals={k: int(v) for k, v in evals.items() if v})


def _store(cache: StageCache, job: Job, result) -> None:
    """Put a result under the job's key, refusing one the stage computed under another key."""
    made = result.meta.get("cache_key")
    if made != job.key:
        raise RuntimeError(f"cache key mismatch: the job says {job.key[:12]}..., the stage "
                           f"computed {str(made)[:12]}... (the caller's key recipe differs "
                           "from vct.stages'; this is a bug)")
    cache.put(job.kind, job.key, result.to_bytes())


def run_in_order(models: VCTModels, jobs: list[Job], order: list[int], cache: StageCache,
                 rank: int = 0, content_batch: int = 1) -> Iterator[tuple[int, JobOutcome]]:
    """Run jobs[i] for i in `order`, yielding (i, outcome) as each finishes. Content jobs with
    the same config are fitted `content_batch` at a time in one batch (the GPU stays busy with
    small latents); the order is otherwise kept."""
    pending = list(order)
    while pending:
        i = pending.pop(0)
        job = jobs[i]
        if job.kind != "content" or content_batch <= 1:
            yield i, run_job(models, job, cache, rank)
            continue
        group = [i] + [k for k in pending if jobs[k].kind == "content"
                       and jobs[k].config == job.config][:content_batch - 1]
        for k in group[1:]:
            pending.remove(k)
        yield from zip(group, run_content_batch(models, [jobs[k] for k in group], cache, rank))


def run_content_batch(models: VCTModels, jobs: list[Job], cache: StageCache,
                      rank: int = 0) -> list[JobOutcome]:
    """Several content jobs as one batched fit. Unreadable inputs fail alone before the batch;
    if the batch itself fails (say, out of memory) each job is retried on its own."""
    from vct.images import decode_image
    from vct.stages import run_contents

    outcomes: dict[int, JobOutcome] = {}
    ready: list[tuple[int, bytes]] = []
    for n, job in enumerate(jobs):
        if cache.contains(job.kind, job.key):
            outcomes[n] = JobOutcome(job.kind, job.key, ok=True, rank=rank, seconds=0.0,
                                     skipped=True)
            continue
        try:
            data = storage.read_bytes(job.input_uri)
            decode_image(data, f"{ROLE[job.kind]} {job.input_uri}")
            ready.append((n, data))
        except Exception as exc:  # noqa: BLE001 - this input's failure only
            outcomes[n] = _failed(job, rank, error_line(job, exc))
    if len(ready) == 1:
        n = ready[0][0]
        outcomes[n] = run_job(models, jobs[n], cache, rank)
    elif ready:
        start = time.perf_counter()
        try:
            results = run_contents(models, [d for _, d in ready],
                                   [f"source {jobs[n].input_uri}" for n, _ in ready],
                                   from_dict(ContentConfig, jobs[ready[0][0]].config))
            seconds = (time.perf_counter() - start) / len(ready)
            for (n, _), result in zip(ready, results):
                _store(cache, jobs[n], result)
                outcomes[n] = JobOutcome("content", jobs[n].key, ok=True, rank=rank,
                                         seconds=seconds, unet_evals=result.meta["unet_evals"])
        except Exception as exc:  # noqa: BLE001 - fall back to one at a time
            log.warning("content batch of %d failed (%s); running each alone", len(ready), exc)
            _release_accelerator_memory()
            for n, _ in ready:
                outcomes[n] = run_job(models, jobs[n], cache, rank)
    return [outcomes[n] for n in range(len(jobs))]


def fusion_job_config(content_key: str, concept_keys: list[str], fusion: dict) -> dict:
    """What a fusion Job carries: the cached inputs by key, and the fusion settings."""
    return {"content_key": content_key, "concept_keys": list(concept_keys), "fusion": fusion}


def _fusion(models: VCTModels, job: Job, cache: StageCache):
    """Fuse from cached stage results; a missing input is this job's failure, not a crash."""
    from vct.config import FusionConfig
    from vct.stages import LOADERS, run_fusion

    cfg = job.config

    def cached(kind: str, key: str):
        result = cache.get(kind, key, lambda data: LOADERS[kind](data, key))
        if result is None:
            raise RuntimeError(f"{kind} result {key[:12]} is not in the cache; run its stage "
                               "first")
        return result

    content = cached("content", cfg["content_key"])
    concepts = [cached("concept", k) for k in cfg["concept_keys"]]
    return run_fusion(models, content, concepts, from_dict(FusionConfig, cfg["fusion"]), job.key)


def _release_accelerator_memory() -> None:
    """After a failure (often an OOM) give the cached blocks back before the next job."""
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # best effort only
        pass


# ---------------------------------------------------------------- scheduling
def biggest_first(jobs: list[Job]) -> list[int]:
    """Indices of jobs by cost, largest first; ties keep input order (stable sort)."""
    return sorted(range(len(jobs)), key=lambda i: -jobs[i].cost)


def assign(jobs: list[Job], world: int) -> list[list[int]]:
    """Each rank's job indices: biggest-first, dealt round-robin (``order[rank::world]``).

    Parent and workers both call this, so the parent knows which rank owed which job when a
    rank dies, and can report per-rank progress totals.
    """
    order = biggest_first(jobs)
    return [order[rank::world] for rank in range(world)]


def _unique(jobs: list[Job]) -> tuple[list[Job], list[int]]:
    """Jobs with distinct (kind, key), and for each input job the index of its representative:
    the same image under two names is computed once (and never by two ranks at a time)."""
    seen: dict[tuple[str, str], int] = {}
    unique: list[Job] = []
    index: list[int] = []
    for job in jobs:
        ident = (job.kind, job.key)
        if ident not in seen:
            seen[ident] = len(unique)
            unique.append(job)
        index.append(seen[ident])
    return unique, index


def _notify(on_progress: ProgressCallback | None, event: dict) -> None:
    """A broken progress callback must not fail the batch whose progress it reports."""
    if on_progress is None:
        return
    try:
        on_progress(event)
    except Exception:
        log.exception("on_progress callback failed (ignored)")


# ---------------------------------------------------------------- local mode
@dataclass
class _Loaded:
    models: VCTModels
    lock: threading.Lock = field(default_factory=threading.Lock)


_MEMO_SIZE = 2
_memo: dict[tuple[str, str, str], _Loaded] = {}
_memo_lock = threading.Lock()


def _local(settings: ExecutorSettings) -> _Loaded:
    """The models for (model, device, dtype), loaded once per process: a flow calls run_jobs
    once per task, and reloading SD weights for each would cost more than small jobs do.
    At most two combinations are kept so a long-lived process does not pile up GPU copies."""
    from vct.models import load_models

    ident = (settings.model, settings.device, settings.dtype)
    with _memo_lock:
        loaded = _memo.get(ident)
        if loaded is None:
            loaded = _Loaded(load_models(settings.model, settings.device, settings.dtype))
            while len(_memo) >= _MEMO_SIZE:
                _memo.pop(next(iter(_memo)))
            _memo[ident] = loaded
        return loaded


def local_models(settings: ExecutorSettings) -> VCTModels:
    """The memoised models local mode uses for these settings (loads them if needed)."""
    return _local(settings).models


def clear_model_memo() -> None:
    """Forget the memoised models (frees their memory once nothing else holds them)."""
    with _memo_lock:
        _memo.clear()


def _run_local(jobs: list[Job], settings: ExecutorSettings,
               on_progress: ProgressCallback | None) -> list[JobOutcome]:
    cache = StageCache(settings.cache_uri)
    try:
        loaded = _local(settings)
    except Exception as exc:  # a bad model fails every job, with the model's own message
        return [_failed(job, 0, error_line(job, exc)) for job in jobs]
    outcomes: list[JobOutcome | None] = [None] * len(jobs)
    with loaded.lock:  # flow tasks in threads share the models; stages are not re-entrant
        for done, (i, outcome) in enumerate(run_in_order(
                loaded.models, jobs, biggest_first(jobs), cache, 0, settings.content_batch),
                start=1):
            outcomes[i] = outcome
            _notify(on_progress, {"rank": 0, "done": done, "total": len(jobs),
                                  "key": outcome.key, "kind": outcome.kind, "ok": outcome.ok})
    return [o for o in outcomes if o is not None]


def _failed(job: Job, rank: int, error: str) -> JobOutcome:
    return JobOutcome(job.kind, job.key, ok=False, rank=rank, seconds=0.0, error=error)


# ---------------------------------------------------------------- accelerate mode
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


# The recipes of infra/accelerate/, used when the package runs without its repository checkout.
_FALLBACK_CONFIGS = {
    "multi_gpu.yaml": {"compute_environment": "LOCAL_MACHINE", "distributed_type": "MULTI_GPU",
                       "num_machines": 1, "machine_rank": 0, "gpu_ids": "all",
                       "mixed_precision": "no", "use_cpu": False, "num_processes": -1},
    "cpu_2proc.yaml": {"compute_environment": "LOCAL_MACHINE", "distributed_type": "MULTI_GPU",
                       "num_machines": 1, "machine_rank": 0, "mixed_precision": "no",
                       "use_cpu": False, "num_processes": 2},
    "single_gpu.yaml": {"compute_environment": "LOCAL_MACHINE", "distributed_type": "NO",
                        "num_machines": 1, "machine_rank": 0, "gpu_ids": "all",
                        "mixed_precision": "no", "use_cpu": False, "num_processes": 1},
}


def accelerate_config_path(settings: ExecutorSettings, world: int, cpu: bool,
                           workdir: Path) -> str:
    """The config file passed with ``--config_file``: always one, so a user-level
    ``default_config.yaml`` never changes what we launch."""
    if settings.accelerate_config:
        if not Path(settings.accelerate_config).is_file():
            raise FileNotFoundError(f"accelerate config {settings.accelerate_config}: no such file")
        return settings.accelerate_config
    name = "single_gpu.yaml" if world == 1 else ("cpu_2proc.yaml" if cpu else "multi_gpu.yaml")
    path = ACCELERATE_CONFIG_DIR / name
    if path.is_file():
        return str(path)
    fallback = workdir / name
    fallback.write_text(json.dumps(_FALLBACK_CONFIGS[name]))  # JSON is valid YAML
    return str(fallback)


def launcher_argv(config_file: str, world: int, workdir: Path) -> list[str]:
    """``accelerate launch`` with every setting that matters given as a flag (platform notes:
    on CPU only ``--multi_gpu`` with ``PartialState(cpu=True)`` gives a real 2-process world;
    ``--cpu --num_processes 2`` silently runs one process)."""
    argv = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config_file,
            "--num_processes", str(world), "--num_machines", "1", "--machine_rank", "0",
            "--main_process_port", "0", "--mixed_precision", "no", "--dynamo_backend", "no"]
    if world > 1:
        argv.append("--multi_gpu")
    return argv + ["-m", "vct.worker", str(workdir)]


def _child_env(cpu: bool) -> dict[str, str]:
    """Inherit everything (AWS, HF_HUB_OFFLINE, CUDA_VISIBLE_DEVICES); make sure the ranks import
    this very vct package; flag CPU ranks."""
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parent.parent)
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
            path = rank_file(self.workdir, rank)
            try:
                with open(path, "rb") as fh:
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


def _run_accelerate(jobs: list[Job], settings: ExecutorSettings,
                    on_progress: ProgressCallback | None) -> list[JobOutcome]:
    cache = StageCache(settings.cache_uri)
    outcomes: list[JobOutcome | None] = [None] * len(jobs)
    # Cache hits are settled here: no launch (4 s + model loads per rank) for a finished batch.
    todo = []
    for i, job in enumerate(jobs):
        if cache.contains(job.kind, job.key):
            outcomes[i] = JobOutcome(job.kind, job.key, ok=True, rank=-1, seconds=0.0,
                                     skipped=True)
        else:
            todo.append(i)
    if not todo:
        return [o for o in outcomes if o is not None]
    pending = [jobs[i] for i in todo]
    cpu = _use_cpu(settings)
    world = min(_num_processes(settings), len(pending))  # an idle rank only costs a model load
    shares = assign(pending, world)
    owner = {j: rank for rank, share in enumerate(shares) for j in share}

    workdir = Path(tempfile.mkdtemp(prefix="vct-exec-"))
    try:
        config_file = accelerate_config_path(settings, world, cpu, workdir)
        (workdir / JOBS_FILE).write_text(json.dumps({
            "settings": settings.to_dict(), "world": world,
            "jobs": [job.to_dict() for job in pending]}))
        argv = launcher_argv(config_file, world, workdir)
        log.info("launching %d rank(s) for %d job(s): %s", world, len(pending), " ".join(argv))
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
                if not isinstance(j, int) or not 0 <= j < len(pending) or j in got \
                        or pending[j].key != outcome.key:
                    log.warning("rank %d reported an unknown job (ignored): %s", rank, line)
                    continue
                got[j] = outcome
                done[rank] += 1
                _notify(on_progress, {"rank": rank, "done": done[rank],
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
        for j, job in enumerate(pending):
            outcome = got.get(j)
            if outcome is None:
                rank = owner[j]
                error = f"worker rank {rank} exited with code {code}"
                if code == 0:
                    error = f"worker rank {rank} exited without reporting this job (code 0)"
                outcome = _failed(job, rank, f"{ROLE[job.kind]} {job.input_uri}: {error}"
                                  + (f"; launcher stderr: {tail}" if tail else ""))
            elif outcome.ok and not cache.contains(job.kind, job.key):
                # Trust the cache, not a claim: an ok without an entry is a failure.
                outcome = _failed(job, outcome.rank,
                                  f"{ROLE[job.kind]} {job.input_uri}: rank {outcome.rank} "
                                  f"reported success but {cache.uri(job.kind, job.key)} is "
                                  "missing")
            outcomes[todo[j]] = outcome
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return [o for o in outcomes if o is not None]


# ---------------------------------------------------------------- entry point
def run_jobs(jobs: Iterable[Job], settings: ExecutorSettings,
             on_progress: ProgressCallback | None = None) -> list[JobOutcome]:
    """Run every job into ``settings.cache_uri``; one outcome per input job, in input order.

    ``on_progress`` gets ``{"rank", "done", "total", "key", "kind", "ok"}`` after each job
    (``done``/``total`` per rank in accelerate mode). Duplicate (kind, key) jobs run once and
    share the outcome. Exceptions are only raised for caller bugs (bad settings) and
    cancellation; job failures are outcomes.
    """
    jobs = list(jobs)
    unique, index = _unique(jobs)
    if not unique:
        return []
    if settings.mode == "local":
        results = _run_local(unique, settings, on_progress)
    else:
        results = _run_accelerate(unique, settings, on_progress)
    if len(results) != len(unique):  # the invariant every caller builds on
        raise AssertionError(f"executor lost jobs: {len(results)} outcomes for {len(unique)}")
    return [results[i] if first else _copy(results[i])
            for first, i in zip(_first_flags(index), index)]


def _first_flags(index: list[int]) -> list[bool]:
    seen: set[int] = set()
    flags = []
    for i in index:
        flags.append(i not in seen)
        seen.add(i)
    return flags


def _copy(outcome: JobOutcome) -> JobOutcome:
    return JobOutcome.from_dict(outcome.to_dict())
