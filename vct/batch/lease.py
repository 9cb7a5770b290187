"""A lease on one storage object: the one mechanism behind cache-key claims and incoming
manifests' markers.

Two processes that must not do the same work share nothing but storage, so the lease lives
there, as a small JSON record with an expiry (``expires_at``, unix seconds):

- **create if absent, or replace a version**: :func:`create` writes the record only if the
  object is absent (``replacing=None``) or still has the version the caller read. Exactly one
  contender wins; the others get None.
- **renew**: its holder pushes the expiry forward from one background thread
  (:func:`renewing`), each write again a compare-and-swap on the version it last wrote.
- **take over after expiry**: a record whose expiry has passed (:func:`is_live` is False) is
  dead; whoever replaces its version first holds the lease.
- **release**: delete the object (:meth:`Lease.drop`) or replace it with a final record
  (:meth:`Lease.swap` then :meth:`Lease.close`), again only if it is still ours.

Once a write finds another version, the lease is ``lost`` and never writes again: a holder that
stalled past its expiry cannot overwrite its successor. What the record says beyond its expiry
is the caller's: :mod:`vct.batch.claims` keeps a lease per cache key, :mod:`vct.batch.incoming`
a lease inside each manifest's marker record.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from vct import storage

log = logging.getLogger("vct.batch")


def encode(record: dict[str, Any]) -> bytes:
    return (json.dumps(record, sort_keys=True, default=str) + "\n").encode()


def is_live(record: dict[str, Any], now: float) -> bool:
    """Whether a lease record is held: its expiry is a number still ahead of `now`."""
    expires = record.get("expires_at")
    return isinstance(expires, int | float) and not isinstance(expires, bool) and expires > now


class Lease:
    """A lease this process holds on `uri`, and the version of the record it last wrote."""

    def __init__(self, uri: str, version: str, record: dict[str, Any]):
        self.uri, self.version, self.record = uri, version, record
        self.lost = False  # another holder replaced the record: never write again
        self.closed = False  # released or finished by this holder
        self._lock = threading.Lock()  # a renewal against a release of the same lease

    def swap(self, record: dict[str, Any]) -> bool:
        """Replace the record if it is still ours; False (and ``lost``) if it is not."""
        with self._lock:
            if self.lost or self.closed:
                return False
            version = storage.conditional_put(self.uri, encode(record), self.version)
            if version is None:
                self.lost = True
                log.warning("lease on %s lost: its expiry passed and another holder took it "
                            "over", self.uri)
                return False
            self.version, self.record = version, record
            return True

    def drop(self) -> None:
        """Delete the record if it is still ours, and close the lease."""
        with self._lock:
            if not self.lost and not self.closed:
                storage.delete_if_match(self.uri, self.version)
            self.closed = True

    def close(self) -> None:
        with self._lock:
            self.closed = True


def create(uri: str, record: dict[str, Any], replacing: str | None = None) -> str | None:
    """Write `record` if `uri` is absent (``replacing=None``) or still at version `replacing`;
    the new version, or None when another process got there first."""
    return storage.conditional_put(uri, encode(record), replacing)


def read(uri: str) -> tuple[dict[str, Any], str] | None:
    """The record at `uri` and its version, or None when absent. A record that is not a JSON
    object reads as ``{}`` (no expiry: dead), so nobody's garbage blocks a lease forever."""
    got = storage.read_versioned(uri)
    if got is None:
        return None
    data, version = got
    try:
        record = json.loads(data)
    except ValueError:
        record = {}
    return (record if isinstance(record, dict) else {}), version


@contextmanager
def renewing(leases: list[Lease], renew: Callable[[Lease], bool], every_s: float,
             name: str) -> Iterator[None]:
    """Renew the leases every `every_s` seconds from one daemon thread while the block runs.
    `leases` is read at each tick, so one added meanwhile is renewed too; a lost or closed one
    is skipped. A renewal that raises is logged and tried again at the next tick, so a lease a
    few ticks long survives one failed write."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(every_s):
            for held in list(leases):
                if stop.is_set():
                    return
                if held.lost or held.closed:
                    continue
                try:
                    renew(held)
                except Exception as exc:  # noqa: BLE001 - retried at the next tick
                    log.warning("renewing the lease on %s failed: %s", held.uri, exc)

    thread = threading.Thread(target=loop, name=name, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=max(5.0, every_s))
