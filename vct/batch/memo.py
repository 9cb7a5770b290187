"""A run's verified stage results kept in memory, so a cache hit is read and verified once.

The pool checks a content entry, then its fusion job uses it; a fusion result is stored, then
its pair files are written from it. :func:`vct.batch.jobs.load` and :func:`vct.batch.jobs.store`
use the memo that :func:`result_memo` makes active for one run in one thread (a context
variable, so concurrent flow tasks in other threads never share it; the run's own lookup
threads get it by running in a copy of that context).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from vct.artifacts import Stored


class ResultMemo:
    """Verified results of one run kept in memory, so a cache hit is read and verified once
    and then used (a pool checks a content, then its fusion job uses it; a fusion result is
    stored, then its pair files are written from it). Entries are content-addressed, so a
    memoised result is the stored one. Bounded by the bytes of the entries it holds (least
    recently used first out)."""

    def __init__(self, max_bytes: int = 512 * 2**20):
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple[str, str, str], tuple[Stored, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()  # the pool looks entries up from several threads

    def get(self, ident: tuple[str, str, str]) -> Stored | None:
        with self._lock:
            item = self._items.get(ident)
            if item is None:
                return None
            self._items.move_to_end(ident)
            return item[0]

    def put(self, ident: tuple[str, str, str], stored: Stored, size: int) -> None:
        with self._lock:
            if size > self.max_bytes or ident in self._items:
                return
            self._items[ident] = (stored, size)
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, (_, dropped) = self._items.popitem(last=False)
                self._bytes -= dropped


_memo: ContextVar[ResultMemo | None] = ContextVar("vct_result_memo", default=None)


@contextmanager
def result_memo(max_bytes: int = 512 * 2**20) -> Iterator[ResultMemo]:
    """Within the block (one run, one thread), :func:`load` and :func:`store` share a memo."""
    memo = ResultMemo(max_bytes)
    token = _memo.set(memo)
    try:
        yield memo
    finally:
        _memo.reset(token)


def active_memo() -> ResultMemo | None:
    """The memo of the current :func:`result_memo` block, or None outside one."""
    return _memo.get()
