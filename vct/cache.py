"""Content-addressed store of stage results (inversions, concept embeddings, latents), and a
run's memo of the verified ones it read or wrote (:func:`result_memo`).

A stage result is stored under a key that hashes everything that determines it, so a hit can be
reused without asking whether it is stale: a change of any input byte, model, setting, seed or
storage format gives a different key. Entries are validated on every read and a bad one is
never trusted: it is logged, treated as a miss, and atomically overwritten by the recomputation
(never deleted first: another run may have just written a good one).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, TypeVar

from vct import storage

if TYPE_CHECKING:
    from vct.artifacts import Stored

T = TypeVar("T")

log = logging.getLogger("vct.cache")

_KIND_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_KEY_RE = re.compile(r"^[0-9a-f]{64}$")
SUFFIX = ".safetensors"
USED_DIR = "_used"
"""``_used/<kind>/<key>``: an empty object rewritten when an entry is read, so its time is the
entry's last use (S3 keeps no access time). Written at most once an hour per entry and process."""
MODELS_DIR = "_models"
"""``_models/<model identity>/<kind>/<key>``: an empty object written with the entry, so one
listing tells which model every entry belongs to (the key itself is a one-way hash)."""
USE_INTERVAL_S = 3600.0
_recorded: dict[tuple[str, str, str], float] = {}
_recorded_lock = threading.Lock()
_IDENTITY_RE = re.compile(r"^[0-9A-Za-z][0-9A-Za-z_.+-]{0,199}$")


def cache_key(kind: str, parts: dict[str, Any]) -> str:
    """The sha256 hex of the canonical JSON of ``{"kind": kind, **parts}``.

    ``parts`` must identify the result completely and by content, not by name:

    - input *byte* hashes (sha256 of the image files, not their paths: a renamed file still hits,
      an edited file with the same name does not),
    - the model identity (e.g. the ETag/mtime digest of the model folder),
    - the stage's full config dict (``vct.config.to_dict``), not only the non-default fields,
    - the seed and a format version (bump it when the stored layout or the algorithm changes).

    Canonical JSON (sorted keys, no spaces, strict: no NaN, no ``default=str``) makes the key
    independent of dict order and refuses values whose text form would be ambiguous.
    """
    if "kind" in parts:
        raise ValueError("cache_key parts may not contain 'kind' (it is the first argument)")
    blob = json.dumps({"kind": kind, **parts}, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False, allow_nan=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class StageCache:
    """Stage results under ``root/<kind>/<key[:2]>/<key>.safetensors`` on local disk or S3.

    The two-character fan-out keeps folders small on local filesystems.
    """

    def __init__(self, root_uri: str):
        self.root_uri = str(root_uri)

    def uri(self, kind: str, key: str) -> str:
        """Where the entry for (kind, key) lives; both are checked so neither can escape root."""
        if not _KIND_RE.match(kind):
            raise ValueError(f"invalid cache kind {kind!r}")
        if not _KEY_RE.match(key):
            raise ValueError(f"invalid cache key {key!r} (expected 64 lowercase hex chars)")
        return storage.join(self.root_uri, kind, key[:2], key + SUFFIX)

    def get(self, kind: str, key: str, validate: Callable[[bytes], T]) -> T | None:
        """The validated entry, or None when missing or bad.

        ``validate`` parses the bytes and raises on anything wrong (truncated file, wrong
        shapes, wrong metadata). Storage errors other than "not found" propagate: a network
        failure must not silently turn into a recomputation.
        """
        uri = self.uri(kind, key)
        try:
            data = storage.read_bytes(uri)
        except storage.StorageNotFound:
            return None
        try:
            value = validate(data)
        except Exception as exc:  # any failure means "do not trust this entry"
            log.warning("rejecting bad cache entry %s (%s: %s); it will be recomputed",
                        uri, type(exc).__name__, exc)
            return None
        self.record_use(kind, key)
        return value

    def used_uri(self, kind: str, key: str) -> str:
        self.uri(kind, key)  # the same checks
        return storage.join(self.root_uri, USED_DIR, kind, key)

    def model_uri(self, kind: str, key: str, model: str) -> str:
        self.uri(kind, key)
        if not _IDENTITY_RE.match(model):
            raise ValueError(f"invalid model identity {model!r}")
        return storage.join(self.root_uri, MODELS_DIR, model, kind, key)

    def record_use(self, kind: str, key: str) -> None:
        """Mark the entry as used now (`vct cache prune` ages entries by last use). Bookkeeping
        only: a failure is logged and never fails the read."""
        ident, now = (self.root_uri, kind, key), time.monotonic()
        with _recorded_lock:
            if now - _recorded.get(ident, -USE_INTERVAL_S) < USE_INTERVAL_S:
                return
            _recorded[ident] = now
        self._mark(self.used_uri(kind, key))

    def record_model(self, kind: str, key: str, model: str) -> None:
        """Say which model the entry was computed with (bookkeeping, like :meth:`record_use`)."""
        self._mark(self.model_uri(kind, key, model))

    @staticmethod
    def _mark(uri: str) -> None:
        try:
            storage.write_bytes(uri, b"")
        except storage.StorageError as exc:
            log.warning("could not record cache bookkeeping %s (%s)", uri, exc)

    def put(self, kind: str, key: str, data: bytes) -> str:
        """Store an entry atomically (replacing a bad one); returns its URI."""
        uri = self.uri(kind, key)
        storage.write_bytes(uri, data, content_type="application/octet-stream")
        return uri

    def contains(self, kind: str, key: str) -> bool:
        """Whether an entry exists (unvalidated; use get to trust it)."""
        return storage.exists(self.uri(kind, key))


# ---------------------------------------------------------------- a run's memo
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
