"""How many intra-op threads a torch process may use: its share of the cores it may run on.

torch sizes its pool to every core of the machine, which assumes the process owns it. With two
accelerate ranks, or one other busy process, on 2 cores a UNet step then runs 4-5x slower than
with the right count (measured on a 2-core machine). Every process that runs torch (the
in-process executor, each rank, `vct translate`) sets its count from here: the cores in its
affinity mask divided by the ranks on the node, unless `--threads` / `VCT_THREADS` says
otherwise. CPU results are bit-identical only at equal thread counts, so the count is also
what makes two runs comparable.
"""

from __future__ import annotations

import os

from vct.errors import UserError

ENV = "VCT_THREADS"
RESERVED_ENV = "VCT_RESERVED_CORES"
"""Cores kept free for other processes of this run on the node (``vct run`` sets 1 for its
embedded Prefect server, which starves and drops the run if torch takes every core)."""


class ThreadsError(UserError, ValueError):
    """A thread count that is not a positive integer; names where it came from."""


def available_cores() -> int:
    """Cores this process may run on (its affinity mask, e.g. a container's cpuset)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def _positive(value: str | int, where: str) -> int:
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ThreadsError(f"{where}: expected a positive integer, got {value!r}") from None
    if n < 1:
        raise ThreadsError(f"{where}: expected a positive integer, got {value!r}")
    return n


def reserved_cores() -> int:
    """Cores the budget leaves to other processes (``VCT_RESERVED_CORES``, default 0)."""
    value = os.environ.get(RESERVED_ENV, "").strip()
    if not value:
        return 0
    try:
        n = int(value)
    except ValueError:
        raise ThreadsError(f"{RESERVED_ENV}: expected a non-negative integer, got {value!r}") \
            from None
    if n < 0:
        raise ThreadsError(f"{RESERVED_ENV}: expected a non-negative integer, got {value!r}")
    return n


def thread_budget(ranks: int = 1, override: int | None = None) -> int:
    """The intra-op threads of one of `ranks` torch processes on this node: `override` (a flag
    or setting), else `VCT_THREADS`, else its share of the available cores after the reserved
    ones (``VCT_RESERVED_CORES``; never fewer than one thread)."""
    if override is not None:
        return _positive(override, "threads (--threads)")
    if os.environ.get(ENV):
        return _positive(os.environ[ENV], ENV)
    return max(1, (available_cores() - reserved_cores()) // max(1, ranks))


def apply_thread_budget(ranks: int = 1, override: int | None = None) -> int:
    """Set torch's intra-op thread count to the budget; returns it."""
    import torch

    n = thread_budget(ranks, override)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n
