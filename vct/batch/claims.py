"""Each cache key computed once across the fleet: claims with leases in the stage cache.

Why: the cache is keyed by content, so two shards of one run, or two runs whose manifests share
a reference, would happily compute the same key at the same time on two machines; nothing but
the cache itself is shared between them (no scheduler of our own). So before a job is computed
its key is *claimed* in the cache, next to where its result will land:

    <cache>/_claims/<kind>/<key>.json
    {"kind", "key", "owner": {"token", "host", "pid", "worker", "flow_run_id"},
     "claimed_at", "renewed_at", "expires_at" (unix seconds), "lease_s", "took_over"}

- The claim is created atomically if absent (S3 conditional PUT ``If-None-Match: *``, local
  exclusive hard link): exactly one contender wins.
- Its holder renews the lease (``expires_at = now + lease_s``) from a background thread every
  ``lease_s / 3`` seconds while it computes, with a compare-and-swap on the version it last
  wrote (S3 ``If-Match`` on the ETag; local flock + content hash): a holder that was too late
  and lost the claim notices instead of overwriting the new owner.
- A job claimed by someone else is skipped for now and its result awaited: the cache is polled
  until the entry lands (the job is ``awaited``), or the claim disappears without one (its owner
  failed: whoever comes next claims it and tries itself), or the lease expires (its owner died:
  the claim is taken over with the same compare-and-swap, so among several waiters one wins).
- The claim is deleted (again only by the version its holder wrote) once the result is stored,
  or when the job failed.

The lease itself (create if absent, compare-and-swap renewals and takeover, release, the renewal
thread) is :mod:`vct.batch.lease`, shared with the incoming manifests' markers; this module
says what a claim's record holds and how jobs wait on each other's claims.

A claim is only ever an optimisation of *who* computes: results are content-addressed and
written atomically, so even a holder that lost its lease and finished anyway writes the same
bytes. Leases compare wall clocks across machines: keep them NTP-synchronised, and keep the
lease (``VCT_CLAIM_LEASE_S``, default 60 s) far above any clock skew and storage stall.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime

from vct import storage
from vct.batch import lease
from vct.cache import StageCache

log = logging.getLogger("vct.batch")

CLAIMS_DIR = "_claims"
ENV_LEASE = "VCT_CLAIM_LEASE_S"
ENV_POLL = "VCT_CLAIM_POLL_S"
DEFAULT_LEASE_S = 60.0
DEFAULT_POLL_S = 2.0


def env_seconds(name: str, default: float) -> float:
    """A positive number of seconds from the environment (``default`` when unset or empty);
    anything else is refused with the variable's name."""
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number of seconds, got {raw!r}") from None
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {raw!r}")
    return value


@dataclass(frozen=True)
class Owner:
    """Who holds a claim: a unique token (what makes the claim ours) and, for people reading
    the claim, the machine, process, Prefect worker and flow run."""

    token: str = field(default_factory=lambda: uuid.uuid4().hex)
    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)
    # Read, not imported: a process worker names itself in its flow runs' environment.
    worker: str = field(default_factory=lambda: os.environ.get("PREFECT__WORKER_NAME", ""))
    flow_run_id: str = field(default_factory=lambda: os.environ.get("PREFECT__FLOW_RUN_ID",
                                                                    ""))

    def to_dict(self) -> dict:
        return {"token": self.token, "host": self.host, "pid": self.pid, "worker": self.worker,
                "flow_run_id": self.flow_run_id}


class Claim(lease.Lease):
    """A claim this process holds: a lease on one (kind, key)."""

    def __init__(self, kind: str, key: str, uri: str, version: str, record: dict):
        super().__init__(uri, version, record)
        self.kind, self.key = kind, key


@dataclass
class ClaimStats:
    """What claiming did over a stage: keys whose expired claims were taken over."""

    took_over: list[str] = field(default_factory=list)


class Claims:
    """Claims of one process (one owner) on one stage cache.

    ``lease_s``/``poll_s`` default to ``VCT_CLAIM_LEASE_S`` (60 s) and ``VCT_CLAIM_POLL_S``
    (2 s); ``clock`` is wall time (leases are compared across machines)."""

    def __init__(self, cache_uri: str, owner: Owner | None = None, lease_s: float | None = None,
                 poll_s: float | None = None, clock: Callable[[], float] = time.time):
        self.cache = StageCache(cache_uri)
        self.root = storage.join(str(cache_uri), CLAIMS_DIR)
        self.owner = owner or Owner()
        self.lease_s = lease_s if lease_s is not None else env_seconds(ENV_LEASE,
                                                                        DEFAULT_LEASE_S)
        self.poll_s = poll_s if poll_s is not None else env_seconds(ENV_POLL, DEFAULT_POLL_S)
        self.clock = clock

    def landed(self, kind: str, key: str) -> bool:
        """Whether a *verified* result is in the cache: a bad entry (the very reason a job may
        be asked for again) must be recomputed, not awaited. A cheap existence check first, so
        polling for a result that is not there costs one HEAD."""
        from vct.batch.jobs import load

        return self.cache.contains(kind, key) and load(self.cache, kind, key) is not None

    def uri(self, kind: str, key: str) -> str:
        self.cache.uri(kind, key)  # checks kind and key: neither can escape the cache
        return storage.join(self.root, kind, f"{key}.json")

    def _record(self, kind: str, key: str, took_over: dict | None = None) -> dict:
        now = self.clock()
        return {"kind": kind, "key": key, "owner": self.owner.to_dict(),
                "claimed_at": datetime.fromtimestamp(now, UTC).isoformat(),
                "renewed_at": datetime.fromtimestamp(now, UTC).isoformat(),
                "expires_at": now + self.lease_s, "lease_s": self.lease_s,
                "took_over": took_over}

    def read(self, kind: str, key: str) -> tuple[dict, str] | None:
        """The current claim on (kind, key) and its version, or None. An unreadable claim
        (a foreign or truncated object) counts as expired: it must not block the key forever."""
        got = lease.read(self.uri(kind, key))
        if got is None:
            return None
        record, version = got
        if not isinstance(record.get("expires_at"), int | float):
            record = {"expires_at": 0.0, "owner": {}, "unreadable": True}
        return record, version

    def acquire(self, kind: str, key: str, stats: ClaimStats | None = None) -> Claim | None:
        """Claim (kind, key): created if absent, or taken over when its lease has expired.
        None when someone else holds a live claim (or won the race for an expired one)."""
        uri = self.uri(kind, key)
        record = self._record(kind, key)
        version = lease.create(uri, record)
        if version is not None:
            return Claim(kind, key, uri, version, record)
        current = self.read(kind, key)
        if current is None:  # released between our create and our read: try once more
            version = lease.create(uri, record)
            return Claim(kind, key, uri, version, record) if version is not None else None
        theirs, their_version = current
        if lease.is_live(theirs, self.clock()):
            return None
        record = self._record(kind, key, took_over=theirs.get("owner"))
        version = lease.create(uri, record, replacing=their_version)
        if version is None:
            return None  # renewed meanwhile, or another waiter took it first
        log.warning("%s %s: took over the claim of %s, whose lease expired", kind, key[:12],
                    theirs.get("owner"))
        if stats is not None:
            stats.took_over.append(key)
        return Claim(kind, key, uri, version, record)

    def renew(self, claim: Claim) -> bool:
        """Push the lease forward; False (and ``claim.lost``) when someone took it over (the
        result it stores is the same bytes either way)."""
        now = self.clock()
        return claim.swap({**claim.record, "expires_at": now + self.lease_s,
                           "renewed_at": datetime.fromtimestamp(now, UTC).isoformat()})

    def release(self, claim: Claim) -> None:
        """Delete the claim if it is still ours (after the result is stored, or on failure)."""
        claim.drop()

    @contextmanager
    def renewing(self, claims: list[Claim]) -> Iterator[None]:
        """Renew these claims every ``lease_s / 3`` seconds while the block runs: the lease is
        three ticks long, so one failed renewal does not lose it."""
        with lease.renewing(claims, self.renew, self.lease_s / 3, "vct-claim-renewer"):
            yield
