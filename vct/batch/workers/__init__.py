"""Where the job pool's units run: in this process (``local.LocalBackend``) or across every
GPU of the node (``accelerate.AccelerateBackend``, one rank per GPU). Both run each job through
:func:`vct.batch.jobs.run_in_order`, so a result does not depend on the mode, and both are the
pool's one executor interface (:class:`vct.batch.pool.Backend`). A failing job fails only
itself, and a dying rank fails only the jobs it had not finished.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

from vct.batch.jobs import JobOutcome, from_fields

MODES = ("local", "accelerate")
Runner = Callable[..., list[JobOutcome]]
"""Runs one unit of jobs into the cache in this process, one outcome per job, in order:
``runner(jobs, settings, progress=None)``; :func:`vct.batch.workers.local.run`, or a fake in
unit tests."""


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
