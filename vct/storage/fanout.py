"""Storage-bound work over many items, a bounded number of threads at once, results in order.

Why one helper: planning (every input), the resume check (every finished output) and the
pool's start (every stage result) each wait on many small storage reads; on S3 they are
latency-bound, so one thread costs minutes at 10 000 items where ``RunSettings.plan_threads``
threads cost seconds. Each call runs in a copy of the caller's context, so the workers see its
context variables (the run's result memo, :func:`vct.cache.result_memo`).
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def bounded_map(fn: Callable[[T], R], items: Sequence[T], threads: int,
                name: str = "vct-io") -> list[R]:
    """``[fn(x) for x in items]`` on at most ``threads`` threads (named ``name``); in this
    thread when one is enough. An exception of any call is raised here."""
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    if threads == 1 or len(items) <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(max_workers=min(threads, len(items)),
                            thread_name_prefix=name) as pool:
        futures = [pool.submit(contextvars.copy_context().run, fn, x) for x in items]
        return [f.result() for f in futures]
