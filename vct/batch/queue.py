"""The pool's queue of runnable jobs: the critical path first, content batches of one config.

Kept apart from the pool (:mod:`vct.batch.pool`), which decides *when* a job is runnable; this
decides *which* runnable job a free worker gets.
"""

from __future__ import annotations

import heapq
import json

from vct.batch.jobs import Job


class JobQueue:
    """Runnable jobs by priority: a job's own cost plus the cost of the fusions it unblocks
    (``unblocks``; a concept gates every fusion of its reference, a content its source's, a
    fusion nothing), highest first, ties in insertion order: list scheduling by the critical
    path, so the jobs others wait on run early and no worker ends up waiting on the last
    concept while the fusions queue up behind it. Without dependencies that is biggest first.

    ``pop_unit`` takes the first and, for a content job, up to ``content_batch - 1`` more
    runnable content jobs of the same config in the same order (a content batch)."""

    def __init__(self, content_batch: int = 1):
        self.content_batch = max(1, content_batch)
        self._heap: list[tuple[float, int, str]] = []
        self._jobs: dict[str, Job] = {}
        self._by_config: dict[str, list[tuple[float, int, str]]] = {}
        self._seq = 0

    def __len__(self) -> int:
        return len(self._jobs)

    def push(self, job: Job, unblocks: float = 0.0) -> None:
        if job.key in self._jobs:
            return
        entry = (-(job.cost + unblocks), self._seq, job.key)
        self._seq += 1
        self._jobs[job.key] = job
        heapq.heappush(self._heap, entry)
        if job.kind == "content" and self.content_batch > 1:
            heapq.heappush(self._by_config.setdefault(_config_id(job), []), entry)

    def _pop_from(self, heap: list) -> Job | None:
        while heap:
            key = heapq.heappop(heap)[-1]
            job = self._jobs.pop(key, None)
            if job is not None:
                return job
        return None

    def pop_unit(self) -> list[Job]:
        first = self._pop_from(self._heap)
        if first is None:
            return []
        unit = [first]
        if first.kind == "content" and self.content_batch > 1:
            same = self._by_config[_config_id(first)]
            while len(unit) < self.content_batch:
                job = self._pop_from(same)
                if job is None:
                    break
                unit.append(job)
        return unit


def _config_id(job: Job) -> str:
    return json.dumps(job.config, sort_keys=True)
