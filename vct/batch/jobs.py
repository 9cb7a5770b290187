"""Stage jobs: what one unit of expensive work is, and its body (read, compute, store).

A :class:`Job` carries its cache key, computed by the planner (:mod:`vct.batch.keys`); its body
stores the result under exactly that key, with the provenance the math does not know (key, model,
input hash, UNet evaluations counted by the model's counting wrapper). Every executor (in
process, accelerate ranks) runs jobs through :func:`run_in_order`, so a result never depends on
where it ran.

Contracts: a job's failure is an outcome, never an exception (one line naming its input); a job
never reads a result it did not ask for by key; results land only in the stage cache (atomic
writes), so a crashed run loses nothing that finished; a result holding NaN or Inf is never
stored (:func:`check_finite`): it would answer its key for every later pair, each reported ok.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from vct import storage
from vct.artifacts import FusedImages, Stored, load_result, result_bytes
from vct.cache import StageCache, active_memo
from vct.config import ConceptConfig, ContentConfig, FusionConfig, from_dict
from vct.errors import UserError
from vct.faults import checkpoint
from vct.inversion import Progress
from vct.models import VCTModels, precision_identity
from vct.sidecar import model_info

log = logging.getLogger("vct.batch")

KINDS = ("concept", "content", "fusion")
# How the input is named in error messages (decode_image prefixes its errors with this name).
ROLE = {"concept": "reference", "content": "source", "fusion": "source"}
_KEY_RE = re.compile(r"^[0-9a-f]{64}$")

# How a failure names the stage that produced a result.
STAGE = {"concept": "concept inversion", "content": "content inversion", "fusion": "fusion"}
# The floating tensors of each stage's result that must be finite: everything stored, and for
# fusion the final latents (its stored images are uint8, which cannot hold a NaN).
FINITE = {"concept": ("vectors",),
          "content": ("x_T", "embeddings", "reconstruction", "inversion_latents"),
          "fusion": ("latents",)}

ProgressFactory = Callable[[str, int], Progress | None]
"""(description, total) -> a per-step callback for one job, or None: progress bars of the CLI."""


def from_fields(cls, d: dict):
    """Rebuild a dataclass from its dict, ignoring keys it does not have (newer writers)."""
    return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


@dataclass(frozen=True)
class Job:
    """One stage computation: ``kind`` on the image at ``input_uri`` with ``config``; fusion
    jobs carry the keys of their content and concepts in ``config`` instead."""

    kind: str
    key: str
    input_uri: str
    config: dict
    cost: float = 1.0
    # What is stored beside the result, not how it is computed (never in ``config``): for a
    # content job, {"keep_trajectories": True} keeps the inversion latents too.
    store: dict = field(default_factory=dict)
    # A concept of several reference images: every one, by hash (``input_uri`` is the
    # first); empty for one image.
    inputs: list[str] = field(default_factory=list)

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
        return from_fields(cls, d)


@dataclass
class JobOutcome:
    """What happened to one job. ``rank`` is the accelerate rank that ran it (0 in process).
    ``unet_evals`` are the counting wrapper's counts for this job."""

    kind: str
    key: str
    ok: bool
    rank: int
    seconds: float
    error: str | None = None
    unet_evals: dict[str, int] = field(default_factory=dict)
    bad_input: bool = False  # failed because its input image could not be decoded

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> JobOutcome:
        return from_fields(cls, d)


def is_bad_input(exc: BaseException) -> bool:
    """An input whose header passed planning's probe but whose pixels do not decode (a
    half-written PNG): the row is bad, not the computation."""
    from vct.images import ImageError

    return isinstance(exc, ImageError)


def failed(job: Job, rank: int, error: str, bad_input: bool = False) -> JobOutcome:
    return JobOutcome(job.kind, job.key, ok=False, rank=rank, seconds=0.0, error=error,
                      bad_input=bad_input)


def _first_line(text: str) -> str:
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    return lines[0] if lines else ""


def error_line(job: Job, exc: BaseException) -> str:
    """One line that names the job's input: user errors keep their message, anything else
    becomes ``Type: first line``; the input is prefixed when the message names none of the
    job's inputs."""
    detail = _first_line(str(exc))
    if isinstance(exc, UserError):
        message = detail or type(exc).__name__
    else:
        message = f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
    if not any(uri in message for uri in job.inputs or [job.input_uri]):
        message = f"{ROLE[job.kind]} {job.input_uri}: {message}"
    return message


class NonFiniteResult(UserError, ValueError):
    """A stage's result holds NaN or Inf (half precision overflowing, typically): refused."""


def nonfinite(tensors: dict[str, Any]) -> dict[str, str]:
    """{name: "NaN" or "Inf"} for each tensor holding a non-finite value (None is skipped)."""
    import torch

    bad = {}
    for name, tensor in tensors.items():
        if tensor is None or not tensor.is_floating_point():
            continue
        if torch.isnan(tensor).any():
            bad[name] = "NaN"
        elif torch.isinf(tensor).any():
            bad[name] = "Inf"
    return bad


def check_finite(job: Job, result: Any, models: VCTModels) -> None:
    """Refuse a result with NaN or Inf before it is stored, in one line naming the stage, the
    input and the precision: stored, it would poison every pair that uses its key."""
    bad = nonfinite({name: getattr(result, name, None) for name in FINITE[job.kind]})
    if not bad:
        return
    from vct.models import DTYPES

    precision = next((n for n, d in DTYPES.items() if d == models.dtype), str(models.dtype))
    what = ", ".join(f"{kind} in {name}" for name, kind in bad.items())
    hint = ("rerun with --dtype fp32 (or bf16)" if precision != "fp32"
            else "check the model's weights and this stage's learning rate")
    raise NonFiniteResult(
        f"{ROLE[job.kind]} {job.input_uri}: {STAGE[job.kind]} produced non-finite values "
        f"({what}) at {precision}; nothing was cached; {hint}")


# ---------------------------------------------------------------- reading the cache
def load(cache: StageCache, kind: str, key: str) -> Stored | None:
    """The verified entry for (kind, key), or None when missing or failing verification (a
    bad entry is never trusted; its recomputation overwrites it atomically). Inside
    :func:`vct.cache.result_memo` an entry is read and verified once."""
    memo, ident = active_memo(), (cache.root_uri, kind, key)
    if memo is not None and (stored := memo.get(ident)) is not None:
        return stored
    size = [0]

    def verify(data: bytes) -> Stored:
        size[0] = len(data)
        return load_result(kind, data, key=key)

    stored = cache.get(kind, key, verify)
    if memo is not None and stored is not None:
        memo.put(ident, stored, size[0])
    return stored


def store(cache: StageCache, kind: str, key: str, stored: Stored) -> None:
    """Write a result to the cache (atomically) and, inside :func:`vct.cache.result_memo`, keep it as
    read back from those bytes (not the object given: storing may change dtypes)."""
    data = result_bytes(kind, stored)
    cache.put(kind, key, data)
    model = stored.provenance.get("model") or {}
    if model.get("identity"):  # the identity the keys use: the files', plus a non-fp32 dtype
        dtype = {"float16": "fp16", "bfloat16": "bf16"}.get(model.get("dtype"), "fp32")
        cache.record_model(kind, key, precision_identity(model["identity"], dtype))
    if (memo := active_memo()) is not None:  # what a later read would give, bit for bit
        memo.put((cache.root_uri, kind, key), load_result(kind, data, key=key), len(data))


def require(cache: StageCache, kind: str, key: str) -> Stored:
    stored = load(cache, kind, key)
    if stored is None:
        raise RuntimeError(f"{kind} result {key[:12]} is not in the cache; run its stage first")
    return stored


# ---------------------------------------------------------------- job bodies
class _Counted:
    """The UNet evaluations and seconds a block of work spent, from the counting wrapper."""

    def __init__(self, models: VCTModels):
        self.models = models

    def __enter__(self) -> _Counted:
        self.before = Counter(self.models.unet_evals)
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start
        delta = Counter(self.models.unet_evals)
        delta.subtract(self.before)
        self.evals = {k: int(v) for k, v in delta.items() if v}


def _provenance(models: VCTModels, job: Job, counted: _Counted, **extra: Any) -> dict:
    return {"cache_key": job.key, "model": model_info(models), "input_uri": job.input_uri,
            "unet_evals": counted.evals, "seconds": counted.seconds, **extra}


def _decode_input(job: Job, uri: str | None = None):
    """(bytes, image) of the job's input, or of ``uri``, one of its inputs."""
    from vct.images import decode_image

    uri = uri or job.input_uri
    data = storage.read_input(uri)
    return data, decode_image(data, f"{ROLE[job.kind]} {uri}")


def _concept(models: VCTModels, job: Job, progress: Progress | None) -> Stored:
    """One concept from its reference image, or from each of several (``job.inputs``)."""
    from vct.batch.keys import references_digest, sha256_bytes
    from vct.concept import learn_concept

    uris = job.inputs or [job.input_uri]
    decoded = [_decode_input(job, uri) for uri in uris]  # a bad image fails naming it
    images = [image for _, image in decoded]
    with _Counted(models) as counted:
        result = learn_concept(models, images if len(images) > 1 else images[0],
                               from_dict(ConceptConfig, job.config), progress=progress)
    check_finite(job, result, models)
    shas = [sha256_bytes(data) for data, _ in decoded]
    extra: dict[str, Any] = {"reference_sha256": references_digest(shas)}
    if len(uris) > 1:
        extra["references"] = [{"uri": u, "sha256": s} for u, s in zip(uris, shas)]
    return Stored(result, _provenance(models, job, counted, **extra))


def _contents(models: VCTModels, jobs: list[Job], progress: Progress | None,
              inputs: list | None = None) -> list[Stored | NonFiniteResult]:
    """Several sources of one content config in one batched fit. The batch's UNet evaluations
    are counted once; each source is attributed its own gradient evaluations (its fit
    iterations, one per evaluation) and an equal share of the batched no-grad ones.
    ``inputs``: the jobs' (bytes, image) when the caller has decoded them already. A source
    whose result is not finite gets its error in place of a result: it fails alone, and the
    batch's other sources are still stored."""
    from vct.batch.keys import sha256_bytes
    from vct.content import invert_contents

    if inputs is None:
        inputs = [_decode_input(job) for job in jobs]

    def step(i: int, n: int) -> None:  # a named kill point inside the job (vct.faults)
        checkpoint("content.step")
        if progress is not None:
            progress(i, n)

    with _Counted(models) as counted:
        results = invert_contents(models, [image for _, image in inputs],
                                  from_dict(ContentConfig, jobs[0].config), progress=step)
    if not jobs[0].store.get("keep_trajectories"):  # fusion needs x_T, c_s and z-bar only
        results = [replace(r, inversion_latents=None) for r in results]
    out: list[Stored | NonFiniteResult] = []
    n = len(jobs)
    for job, (data, _), result in zip(jobs, inputs, results):
        try:
            check_finite(job, result, models)
        except NonFiniteResult as exc:
            out.append(exc)
            continue
        evals = {k: (result.stats.total_iterations if k == "content_grad" else v // n)
                 for k, v in counted.evals.items()}
        share = _Counted(models)
        share.evals, share.seconds = evals, counted.seconds / n
        out.append(Stored(result, _provenance(models, job, share,
                                              source_sha256=sha256_bytes(data),
                                              batch_size=n, batch_unet_evals=counted.evals)))
    return out


def _summary(stored: Stored) -> dict:
    """What a sidecar reports of an input stage result: its key and costs, not its tensors."""
    p = stored.provenance
    out = {k: p[k] for k in ("cache_key", "unet_evals") if k in p}
    stats = stored.result.stats
    out["seconds"] = dict(stats.seconds)
    out["job_seconds"] = p.get("seconds")
    if hasattr(stats, "total_iterations"):
        out["total_iterations"] = stats.total_iterations
    return out


def _fusion(models: VCTModels, job: Job, cache: StageCache, progress: Progress | None) -> Stored:
    """Fuse from cached stage results; a missing input is this job's failure, not a crash."""
    import torch

    from vct.fusion import fuse

    cfg = job.config
    content = require(cache, "content", cfg["content_key"])
    concepts = [require(cache, "concept", k) for k in cfg["concept_keys"]]
    with _Counted(models) as counted:
        result = fuse(models, content.result, [c.result for c in concepts],
                      from_dict(FusionConfig, cfg["fusion"]), progress=progress)
    check_finite(job, result, models)
    images = FusedImages(images=torch.from_numpy(result.images.copy()))
    return Stored(images, _provenance(models, job, counted,
                                      fusion_seconds=result.stats.seconds,
                                      content=_summary(content),
                                      concepts=[_summary(c) for c in concepts]))


def _release_accelerator_memory() -> None:
    """After a failure (often an OOM) give the cached blocks back before the next job."""
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # best effort only
        pass


def _bar(progress: ProgressFactory | None, job: Job, total: int) -> Progress | None:
    if progress is None:
        return None
    name = job.input_uri.rstrip("/").rsplit("/", 1)[-1]
    return progress(f"{job.kind} {name}", total)


def _steps(job: Job) -> int:
    """Progress steps of a job: updates for a concept, 2T for a content, T for a fusion."""
    if job.kind == "concept":
        return int(job.config.get("max_train_steps", 1))
    if job.kind == "content":
        return 2 * int(job.config.get("num_inference_steps", 1))
    return int(job.config.get("num_inference_steps", 1))


def run_job(models: VCTModels, job: Job, cache: StageCache, rank: int = 0,
            progress: ProgressFactory | None = None) -> JobOutcome:
    """Compute one job into the cache; never raises for a job-level failure.

    The models must not be used by another thread meanwhile (concept inversion routes the text
    encoder's embedding while it runs); executors hold a per-model lock for that.
    """
    start = time.perf_counter()
    try:
        bar = _bar(progress, job, _steps(job))
        if job.kind == "concept":
            stored = _concept(models, job, bar)
        elif job.kind == "content":
            stored = _contents(models, [job], bar)[0]
            if isinstance(stored, NonFiniteResult):
                raise stored
        else:
            stored = _fusion(models, job, cache, bar)
        store(cache, job.kind, job.key, stored)
        checkpoint(f"{job.kind}.stored")
    except Exception as exc:  # one job's failure must not end the batch
        error = error_line(job, exc)
        log.warning("job %s %s failed: %s", job.kind, job.key[:12], error)
        _release_accelerator_memory()
        return JobOutcome(job.kind, job.key, ok=False, rank=rank,
                          seconds=time.perf_counter() - start, error=error,
                          bad_input=is_bad_input(exc))
    return JobOutcome(job.kind, job.key, ok=True, rank=rank, seconds=time.perf_counter() - start,
                      unet_evals=stored.provenance["unet_evals"])


def run_content_batch(models: VCTModels, jobs: list[Job], cache: StageCache,
                      rank: int = 0) -> list[JobOutcome]:
    """Several content jobs as one batched fit. Unreadable inputs fail alone before the batch
    (each input is read and decoded once, here, for the batch); if the batch itself fails (say,
    out of memory) each job is retried on its own."""
    outcomes: dict[int, JobOutcome] = {}
    ready: list[int] = []
    decoded: dict[int, tuple] = {}
    for n, job in enumerate(jobs):
        try:
            decoded[n] = _decode_input(job)
            ready.append(n)
        except Exception as exc:  # noqa: BLE001 - this input's failure only
            outcomes[n] = failed(job, rank, error_line(job, exc), is_bad_input(exc))
    if len(ready) == 1:
        outcomes[ready[0]] = run_job(models, jobs[ready[0]], cache, rank)
    elif ready:
        start = time.perf_counter()
        try:
            stored = _contents(models, [jobs[n] for n in ready], None,
                               inputs=[decoded[n] for n in ready])
            seconds = (time.perf_counter() - start) / len(ready)
            for n, item in zip(ready, stored):
                if isinstance(item, NonFiniteResult):  # this source alone; never stored
                    outcomes[n] = failed(jobs[n], rank, error_line(jobs[n], item))
                    continue
                store(cache, "content", jobs[n].key, item)
                checkpoint("content.stored")
                outcomes[n] = JobOutcome("content", jobs[n].key, ok=True, rank=rank,
                                         seconds=seconds,
                                         unet_evals=item.provenance["unet_evals"])
        except Exception as exc:  # noqa: BLE001 - fall back to one at a time
            log.warning("content batch of %d failed (%s); running each alone", len(ready), exc)
            _release_accelerator_memory()
            for n in ready:
                outcomes[n] = run_job(models, jobs[n], cache, rank)
    return [outcomes[n] for n in range(len(jobs))]


def run_in_order(models: VCTModels, jobs: list[Job], order: list[int], cache: StageCache,
                 rank: int = 0, content_batch: int = 1,
                 progress: ProgressFactory | None = None) -> Iterator[tuple[int, JobOutcome]]:
    """Run jobs[i] for i in `order`, yielding (i, outcome) as each finishes. Content jobs with
    the same config are fitted `content_batch` at a time in one batch (the GPU stays busy with
    small latents); the order is otherwise kept."""
    pending = list(order)
    while pending:
        i = pending.pop(0)
        job = jobs[i]
        if job.kind != "content" or content_batch <= 1:
            yield i, run_job(models, job, cache, rank, progress)
            continue
        group = [i] + [k for k in pending if jobs[k].kind == "content"
                       and jobs[k].config == job.config
                       and jobs[k].store == job.store][:content_batch - 1]
        for k in group[1:]:
            pending.remove(k)
        yield from zip(group, run_content_batch(models, [jobs[k] for k in group], cache, rank))


def biggest_first(jobs: list[Job]) -> list[int]:
    """Indices of jobs by cost, largest first; ties keep input order (stable sort)."""
    return sorted(range(len(jobs)), key=lambda i: -jobs[i].cost)
