"""In-process execution: the models loaded once per process, jobs biggest-first."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from vct.batch.jobs import (
    Job,
    JobOutcome,
    ProgressFactory,
    biggest_first,
    error_line,
    failed,
    run_in_order,
)
from vct.batch.workers import ExecutorSettings, Runner
from vct.cache import StageCache
from vct.models import VCTModels
from vct.threads import apply_thread_budget


@dataclass
class _Loaded:
    models: VCTModels
    lock: threading.Lock = field(default_factory=threading.Lock)


_MEMO_SIZE = 2
_memo: dict[tuple[str, str | None, str, str], _Loaded] = {}
_memo_lock = threading.Lock()


def _loaded(settings: ExecutorSettings) -> _Loaded:
    """The models for (model, device, dtype), loaded once per process: a flow runs one stage
    per task, and reloading SD weights for each would cost more than small jobs do. At most two
    combinations are kept so a long-lived process does not pile up GPU copies."""
    from vct.models import load_models

    ident = (settings.model, settings.model_config, settings.device, settings.dtype)
    with _memo_lock:
        loaded = _memo.get(ident)
        if loaded is None:
            loaded = _Loaded(load_models(settings.model, settings.device, settings.dtype,
                                         config=settings.model_config))
            while len(_memo) >= _MEMO_SIZE:
                _memo.pop(next(iter(_memo)))
            _memo[ident] = loaded
        return loaded


def models_for(settings: ExecutorSettings) -> VCTModels:
    """The memoised models this process uses for these settings (loads them if needed)."""
    return _loaded(settings).models


def run(jobs: list[Job], settings: ExecutorSettings,
        progress: ProgressFactory | None = None) -> list[JobOutcome]:
    """One unit of distinct jobs on this process's models: one outcome per job, in order."""
    cache = StageCache(settings.cache_uri)
    try:
        loaded = _loaded(settings)
    except Exception as exc:  # a bad model fails every job, with the model's own message
        return [failed(job, 0, error_line(job, exc)) for job in jobs]
    outcomes: list[JobOutcome | None] = [None] * len(jobs)
    with loaded.lock:  # flow tasks in threads share the models; stages are not re-entrant
        apply_thread_budget(1, settings.threads)
        for i, outcome in run_in_order(loaded.models, jobs, biggest_first(jobs), cache, 0,
                                       settings.content_batch, progress):
            outcomes[i] = outcome
    return [o for o in outcomes if o is not None]


class LocalBackend:
    """The pool's in-process worker: one unit at a time, run when the pool polls (rank 0).

    ``runner`` runs one unit into the cache: this module's :func:`run` (the models memoised
    per process), or a fake in tests."""

    def __init__(self, settings: ExecutorSettings, runner: Runner | None = None,
                 progress: ProgressFactory | None = None):
        self.settings = settings
        self.runner = runner or run
        self.progress = progress
        self._queue: list[list[Job]] = []
        self._jobs = 0
        self._busy = 0.0
        self._ready_at = time.time()

    def free_slots(self) -> int:
        return 0 if self._queue else 1

    def outstanding(self) -> int:
        return len(self._queue)

    def submit(self, unit: list[Job]) -> None:
        self._queue.append(unit)

    def poll(self, timeout: float) -> list[JobOutcome]:
        if not self._queue:
            return []
        unit = self._queue.pop(0)
        start = time.perf_counter()
        outcomes = self.runner(unit, self.settings, progress=self.progress)
        self._busy += time.perf_counter() - start
        self._jobs += len(unit)
        return outcomes

    def usage(self) -> list[dict]:
        return [{"rank": 0, "jobs": self._jobs, "busy_s": self._busy, "load_s": 0.0,
                 "ready_at": self._ready_at}]

    def close(self) -> None:
        self._queue.clear()

    cancel = close
