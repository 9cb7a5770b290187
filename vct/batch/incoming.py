"""Incoming manifests, each processed once per version, claimed with a lease.

An art team drops CSV manifests under a prefix; a schedule polls it (the ``restyle-incoming``
flow). Beside each manifest ``<name>.csv`` lives its marker ``<name>.csv.processed``, a small
JSON record. The rules, and why:

- **One listing per poll, no writes for what needs nothing.** :func:`poll` lists the prefix
  once, with ETags. A manifest without a marker is new. A manifest with one is judged from the
  marker's record (read, never rewritten): done for this version, held by a live lease,
  expired, released, or changed. Only a manifest that is about to run gets a write (its
  claim), so a prefix holding a thousand finished manifests costs one listing and reads, and
  the poll logs one line (:attr:`Poll.summary`).
- **A claim is a lease.** The record carries the owner, an expiry (``lease_s`` ahead) and the
  manifest's ETag and sha256. While the run works, a background thread renews the expiry every
  ``renew_s`` seconds (:meth:`Lease.renewing`). A run that is killed outright stops renewing,
  and once the expiry passes any poller may take the manifest over; a run that is cancelled,
  crashes or raises releases its claim at once (status ``released``: the flow's Prefect state
  hooks call :func:`release_held`; the ``renewing`` block releases on any exception leaving
  it), so the next poll takes it over without waiting.
- **Every write of a marker is a compare-and-swap** (the lease of :mod:`vct.batch.lease`,
  shared with the cache's claims):
  a claim creates the marker only if absent; a renewal, a release, a takeover and the final
  record replace it only if it still has the ETag this process last saw. Two pollers that
  judged the same marker can never both win, and a run whose lease was taken over (it stalled
  past its expiry) cannot overwrite its successor's record.
- **A marker is tied to a version of its manifest.** A marker records the manifest's ETag and
  sha256; a manifest re-uploaded with other bytes is processed again (even after ``done``). The
  ETag decides without reading the manifest when it matches; when it does not (a local file
  rewritten with the same bytes gets a new mtime but the same MD5; an S3 multipart upload has
  a different kind of ETag), the sha256 of the bytes decides.
- Finished states (``done``, ``partial``, ``failed``) are final for that version: delete the
  marker (or upload a changed manifest) to run it again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from vct import storage
from vct.batch import lease
from vct.config import ConfigError
from vct.report.run_record import RunSummary

log = logging.getLogger("vct.batch")

MARKER_SUFFIX = ".processed"
MANIFEST_SUFFIX = ".csv"
RUNNING, RELEASED = "running", "released"
FINISHED = ("done", "partial", "failed")
MAX_MARKER_BYTES = 1 << 20


@dataclass(frozen=True)
class LeasePolicy:
    """How long a claim lives without renewal, and how often a working run renews it. The
    renewal interval must leave room for at least two renewals per lease, so one slow write
    does not lose it."""

    lease_s: float = 900.0
    renew_s: float = 60.0

    def __post_init__(self) -> None:
        if not self.lease_s > 0:
            raise ConfigError("lease_seconds", f"must be > 0, got {self.lease_s}")
        if not 0 < self.renew_s <= self.lease_s / 2:
            raise ConfigError("renew_seconds", f"must be > 0 and at most half of lease_seconds "
                              f"({self.lease_s}), got {self.renew_s}")


def owner_id(run_id: str = "") -> str:
    """Who holds a claim: the flow run id (when there is one), host and process."""
    return f"{run_id or 'no-flow-run'}@{socket.gethostname()}:{os.getpid()}"


def marker_uri(manifest_uri: str) -> str:
    return manifest_uri + MARKER_SUFFIX


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------- judging a listing
@dataclass(frozen=True)
class Candidate:
    """A manifest a poll decided to run: why (``new``, ``changed``, ``expired``, ``released``,
    ``unreadable``), the listing's view of it, and the marker ETag a claim must replace (None:
    the marker must still be absent)."""

    manifest: storage.ObjectInfo
    reason: str
    marker_etag: str | None
    previous: dict[str, Any] = field(default_factory=dict)


@dataclass
class Poll:
    """What one poll found: the manifests to run, in listing order, and a count per verdict
    (the ones above plus ``done`` and ``held``)."""

    incoming_uri: str
    candidates: list[Candidate]
    verdicts: Counter[str]

    @property
    def summary(self) -> str:
        """The one line a poll logs, however many historical manifests the prefix holds."""
        total = sum(self.verdicts.values())
        parts = ", ".join(f"{n} {verdict}" for verdict, n in sorted(self.verdicts.items()))
        return (f"incoming {self.incoming_uri}: {total} manifest(s)"
                + (f": {parts}" if parts else "") + f"; {len(self.candidates)} to run")


def _read_record(uri: str) -> dict[str, Any] | None:
    """A marker's record, or None when it is not a readable JSON object (then it is taken
    over: a marker nobody can interpret must not block its manifest forever)."""
    try:
        record = json.loads(storage.read_bytes(uri, MAX_MARKER_BYTES))
    except storage.StorageNotFound:
        return None
    except (storage.InputTooLarge, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _same_version(record: dict[str, Any], manifest: storage.ObjectInfo) -> bool:
    if record.get("manifest_etag") == manifest.etag:
        return True
    sha = record.get("manifest_sha256")
    return bool(sha) and sha == _sha256(storage.read_input(manifest.uri))


def judge(manifest: storage.ObjectInfo, marker: storage.ObjectInfo | None,
          now: float) -> tuple[str, dict[str, Any]]:
    """The verdict on one manifest from the listing (and its marker's record when it has
    one): ``new``, ``done``, ``held``, ``expired``, ``released``, ``changed``, ``unreadable``."""
    if marker is None:
        return "new", {}
    record = _read_record(marker.uri)
    if record is None:  # deleted since the listing: a claim must create it
        return "new", {}
    if not record or "status" not in record:
        return "unreadable", {}
    status = record.get("status")
    if status == RUNNING:
        return ("held" if lease.is_live(record, now) else "expired"), record
    if status == RELEASED:
        return "released", record
    if status in FINISHED:
        return ("done", record) if _same_version(record, manifest) else ("changed", record)
    return "unreadable", record


def poll(incoming_uri: str, now: float | None = None) -> Poll:
    """One listing of the prefix, one verdict per manifest; writes nothing."""
    now = time.time() if now is None else now
    objects = storage.list_objects(incoming_uri, suffixes=(MANIFEST_SUFFIX,
                                                           MANIFEST_SUFFIX + MARKER_SUFFIX))
    by_uri = {o.uri: o for o in objects}
    candidates: list[Candidate] = []
    verdicts: Counter[str] = Counter()
    for manifest in objects:
        if not manifest.uri.lower().endswith(MANIFEST_SUFFIX):
            continue
        marker = by_uri.get(marker_uri(manifest.uri))
        verdict, record = judge(manifest, marker, now)
        verdicts[verdict] += 1
        if verdict not in ("done", "held"):
            candidates.append(Candidate(manifest, verdict,
                                        marker.etag if marker and verdict != "new" else None,
                                        record))
    return Poll(incoming_uri, candidates, verdicts)


# ---------------------------------------------------------------- leases
_held: dict[str, set[Lease]] = {}
_held_lock = threading.Lock()


class Lease(lease.Lease):
    """A claim on one manifest held by this process, in its marker record: renew it while
    working, then :meth:`finish` with the run's outcome or :meth:`release` it. The mechanism
    (compare-and-swap writes, ``lost``, the renewal thread) is :mod:`vct.batch.lease`."""

    def __init__(self, candidate: Candidate, owner: str, policy: LeasePolicy, key: str,
                 record: dict[str, Any], etag: str):
        super().__init__(marker_uri(candidate.manifest.uri), etag, record)
        self.candidate, self.owner, self.policy, self.key = candidate, owner, policy, key

    @property
    def manifest_uri(self) -> str:
        return self.candidate.manifest.uri

    @property
    def marker_uri(self) -> str:
        return self.uri

    def renew(self, now: float | None = None) -> bool:
        """Push the expiry ``lease_s`` ahead of now; False once the lease is lost or closed."""
        now = time.time() if now is None else now
        return self.swap({**self.record, "expires_at": now + self.policy.lease_s,
                          "expires": _iso(now + self.policy.lease_s), "renewed": _iso(now),
                          "renewals": int(self.record.get("renewals", 0)) + 1})

    @contextlib.contextmanager
    def renewing(self) -> Iterator[Lease]:
        """Renew every ``renew_s`` seconds in a daemon thread while the block runs; any
        exception leaving the block (an error, a termination signal) releases the claim."""
        with lease.renewing([self], lambda held: held.renew(), self.policy.renew_s,
                            f"lease {self.manifest_uri}"):
            try:
                yield self
            except BaseException as exc:
                self.release(f"{type(exc).__name__}: {exc}".strip().rstrip(":"))
                raise

    def finish(self, status: str, **fields: Any) -> bool:
        """The final record (``done``, ``partial`` or ``failed``, with the run's fields)."""
        if status not in FINISHED:
            raise ValueError(f"status must be one of {', '.join(FINISHED)}, got {status!r}")
        now = time.time()
        ok = self.swap({**self.record, **fields, "status": status, "finished": _iso(now),
                        "expires_at": None, "expires": None})
        self._close()
        return ok

    def release(self, reason: str) -> bool:
        """Give the claim up now (cancelled, crashed, failed before an outcome): the next
        poll takes the manifest over without waiting for the expiry."""
        now = time.time()
        ok = self.swap({**self.record, "status": RELEASED, "released": _iso(now),
                        "release_reason": reason[:500], "expires_at": now})
        self._close()
        if ok:
            log.warning("released the claim on %s (%s)", self.manifest_uri, reason)
        return ok

    def _close(self) -> None:
        self.close()
        with _held_lock:
            held = _held.get(self.key)
            if held is not None:
                held.discard(self)
                if not held:
                    del _held[self.key]


def claim(candidate: Candidate, owner: str, policy: LeasePolicy, key: str = "",
          now: float | None = None) -> Lease | None:
    """Claim one candidate of a poll: create its marker (new) or replace the one the poll
    judged (expired, released, changed, unreadable), only if nobody did first. None when
    another poller won or the manifest was removed since the listing; the lease is registered
    under ``key`` (the flow run id) for :func:`release_held`."""
    now = time.time() if now is None else now
    try:
        data = storage.read_input(candidate.manifest.uri)
    except storage.StorageNotFound:
        return None
    previous = candidate.previous
    record = {"status": RUNNING, "owner": owner, "manifest_uri": candidate.manifest.uri,
              "manifest_etag": candidate.manifest.etag, "manifest_sha256": _sha256(data),
              "claimed": _iso(now), "reason": candidate.reason, "lease_s": policy.lease_s,
              "expires_at": now + policy.lease_s, "expires": _iso(now + policy.lease_s),
              "renewals": 0, "attempt": int(previous.get("attempt", 0)) + 1}
    if previous.get("owner"):
        record["previous"] = {k: previous.get(k) for k in ("status", "owner", "claimed",
                                                            "release_reason")}
    etag = lease.create(marker_uri(candidate.manifest.uri), record,
                        replacing=candidate.marker_etag)
    if etag is None:
        return None
    held = Lease(candidate, owner, policy, key, record, etag)
    with _held_lock:
        _held.setdefault(key, set()).add(held)
    return held


def release_held(key: str, reason: str) -> int:
    """Release every lease this process still holds under ``key``; returns how many. What a
    cancelled or crashed flow run's state hooks call: idempotent, never raises."""
    with _held_lock:
        leases = list(_held.get(key, ()))
    released = 0
    for one in leases:
        try:
            released += one.release(reason)
        except Exception as exc:  # noqa: BLE001 - a hook must not mask the run's own failure
            log.error("could not release %s: %s", one.marker_uri, exc)
    return released


def held(key: str) -> list[Lease]:
    """The leases this process holds under ``key`` (for tests and the flow's checks)."""
    with _held_lock:
        return list(_held.get(key, ()))


def outcome_status(summary: RunSummary | None) -> str:
    """A finished marker's status from a run's summary (None: it ended before it had one):
    done, partial, or failed."""
    if not isinstance(summary, RunSummary):
        return "failed"
    return {"complete": "done", "partial": "partial"}.get(summary.status, "failed")
