"""Where stage jobs run: in this process (``local``) or across every GPU of the node
(``accelerate``, one rank per GPU). Both run each job through :func:`vct.batch.jobs.run_in_order`,
so a result does not depend on the mode.

:func:`run_jobs` returns exactly one outcome per input job, in input order; a failing job fails
only itself, and a dying rank fails only the jobs it had not finished. The library never imports
Prefect; the flow wraps the engine's stage calls in tasks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

from vct.batch.jobs import Job, JobOutcome, ProgressFactory, from_fields

MODES = ("local", "accelerate")
ProgressCallback = Callable[[dict], None]
"""Gets ``{"rank", "done", "total", "key", "kind", "ok"}`` after each job."""


@dataclass(frozen=True)
class ExecutorSettings:
    """Where and how jobs run; travels to accelerate ranks as JSON.

    ``model`` is a local folder, s3:// prefix or single-file checkpoint (never empty), with
    ``model_config`` the config folder of a single file (None: SD 1.5's, shipped). ``num_processes`` (accelerate)
    defaults to one per visible GPU, or 2 with ``cpu=True``; ``cpu=True`` runs the ranks on CPU
    with gloo (tests, CPU dev boxes).
    """

    model: str
    cache_uri: str
    model_config: str | None = None
    device: str = "auto"
    dtype: str = "fp32"
    mode: str = "local"
    num_processes: int | None = None
    accelerate_config: str | None = None
    cpu: bool = False
    content_batch: int = 1
    threads: int | None = None

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
        return from_fields(cls, d)


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


def run_jobs(jobs: Iterable[Job], settings: ExecutorSettings,
             on_progress: ProgressCallback | None = None,
             progress: ProgressFactory | None = None) -> list[JobOutcome]:
    """Run every job into ``settings.cache_uri``; one outcome per input job, in input order.

    Duplicate (kind, key) jobs run once and share the outcome. Exceptions are raised only for
    caller bugs (bad settings) and cancellation; job failures are outcomes. ``progress`` draws
    per-step bars (in process only).
    """
    from vct.batch.workers import accelerate, local

    jobs = list(jobs)
    unique, index = _unique(jobs)
    if not unique:
        return []
    if settings.mode == "local":
        results = local.run(unique, settings, on_progress, progress)
    else:
        results = accelerate.run(unique, settings, on_progress)
    if len(results) != len(unique):  # the invariant every caller builds on
        raise AssertionError(f"executor lost jobs: {len(results)} outcomes for {len(unique)}")
    return [JobOutcome.from_dict(results[i].to_dict()) for i in index]


def notify(on_progress: ProgressCallback | None, event: dict) -> None:
    """A broken progress callback must not fail the batch whose progress it reports."""
    if on_progress is None:
        return
    try:
        on_progress(event)
    except Exception:
        import logging

        logging.getLogger("vct.batch").exception("on_progress callback failed (ignored)")
