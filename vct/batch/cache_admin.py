"""What a stage cache holds, and pruning it (``vct cache ls|du|prune``).

The stage cache only grows: every new reference, source, setting or model adds entries. This
module lists its entries (kind, size, age), totals them by kind, and chooses what to delete:
entries older than an age, then the oldest until the cache fits a size, optionally of some kinds
only. Choosing is pure (entries in, entries to delete out); listing and deleting are thin
adapters over :mod:`vct.storage`.

Safety: only objects laid out exactly as :class:`vct.cache.StageCache` writes them
(``<root>/<kind>/<key[:2]>/<key>.safetensors``) are entries, and a deletion's URI is rebuilt by
``StageCache.uri``, so nothing outside the cache's entries (claims, temp files, foreign files,
other prefixes) is ever deleted. An entry whose key is under a live claim
(:mod:`vct.batch.claims`) is kept: its holder is computing or storing it right now; the claim is
read again just before each deletion. Age is the time since the entry was written (its mtime or
S3 LastModified): reads are not recorded, so a hit does not make an entry younger.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from dataclasses import dataclass

from vct import storage
from vct.batch.claims import CLAIMS_DIR, Claims
from vct.cache import SUFFIX, StageCache

_ENTRY_RE = re.compile(r"^(?P<kind>[A-Za-z0-9][A-Za-z0-9_.-]{0,63})/(?P<fan>[0-9a-f]{2})/"
                       r"(?P<key>[0-9a-f]{64})" + re.escape(SUFFIX) + "$")
_CLAIM_RE = re.compile(r"^" + CLAIMS_DIR + r"/(?P<kind>[A-Za-z0-9][A-Za-z0-9_.-]{0,63})/"
                       r"(?P<key>[0-9a-f]{64})\.json$")
_UNITS = {"": 1, "k": 1024, "m": 1024 ** 2, "g": 1024 ** 3, "t": 1024 ** 4}
_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


@dataclass(frozen=True)
class Entry:
    """One stage result in the cache."""

    kind: str
    key: str
    uri: str
    size: int
    modified: float  # epoch seconds: when it was written

    def age(self, now: float) -> float:
        return max(0.0, now - self.modified)


# ---------------------------------------------------------------- pure: parsing and choosing
def _relative(root_uri: str, uri: str) -> str | None:
    """``uri`` relative to the cache root with ``/`` separators, or None when outside it."""
    root = str(root_uri).rstrip("/") + "/"
    return uri[len(root):] if uri.startswith(root) else None


def entries_of(root_uri: str, objects: Iterable[storage.ObjectInfo]) -> list[Entry]:
    """The cache entries among a listing of the cache root; anything else is not an entry."""
    out = []
    for obj in objects:
        rel = _relative(root_uri, obj.uri)
        match = _ENTRY_RE.match(rel) if rel is not None else None
        if match and match["fan"] == match["key"][:2]:
            out.append(Entry(match["kind"], match["key"], obj.uri, obj.size, obj.modified))
    return sorted(out, key=lambda e: (e.kind, e.modified, e.key))


def claimed_keys(root_uri: str, objects: Iterable[storage.ObjectInfo]) -> list[tuple[str, str]]:
    """(kind, key) of every claim object in a listing of the cache root."""
    out = []
    for obj in objects:
        rel = _relative(root_uri, obj.uri)
        match = _CLAIM_RE.match(rel) if rel is not None else None
        if match:
            out.append((match["kind"], match["key"]))
    return out


def totals(entries: Iterable[Entry]) -> dict[str, tuple[int, int]]:
    """{kind: (entries, bytes)}, kinds sorted."""
    out: dict[str, tuple[int, int]] = {}
    for e in entries:
        count, size = out.get(e.kind, (0, 0))
        out[e.kind] = (count + 1, size + e.size)
    return dict(sorted(out.items()))


def select(entries: Iterable[Entry], now: float, *, older_than_s: float | None = None,
           max_bytes: int | None = None, kinds: Iterable[str] | None = None,
           protected: Iterable[tuple[str, str]] = ()) -> list[Entry]:
    """The entries to delete, oldest first.

    In scope are the entries of ``kinds`` (all when None). Of those, every entry older than
    ``older_than_s`` goes; then, while the scope's remaining total is over ``max_bytes``, the
    oldest remaining ones go. A ``protected`` (kind, key) (under a live claim) never goes, but
    its size still counts towards the total.
    """
    if older_than_s is None and max_bytes is None:
        raise ValueError("say what to prune: an age (older_than_s), a size (max_bytes) or both")
    wanted = set(kinds) if kinds is not None else None
    keep = set(protected)
    scope = sorted((e for e in entries if wanted is None or e.kind in wanted),
                   key=lambda e: (e.modified, e.kind, e.key))
    chosen: list[Entry] = []
    rest: list[Entry] = []
    for e in scope:
        old = older_than_s is not None and e.age(now) > older_than_s
        (chosen if old and (e.kind, e.key) not in keep else rest).append(e)
    if max_bytes is not None:
        total = sum(e.size for e in rest)
        for e in rest:
            if total <= max_bytes:
                break
            if (e.kind, e.key) in keep:
                continue
            chosen.append(e)
            total -= e.size
    return sorted(chosen, key=lambda e: (e.modified, e.kind, e.key))


def parse_size(text: str) -> int:
    """Bytes from ``500M``, ``50G``, ``1.5T``, ``2GiB``, ``1024`` (K, M, G, T: powers of 1024)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", text, re.IGNORECASE)
    if not match:
        raise ValueError(f"{text!r} is not a size; use e.g. 500M, 50G, 1.5T or bytes")
    return int(float(match[1]) * _UNITS[match[2].lower()])


def parse_age(text: str) -> float:
    """Seconds from ``30d``, ``12h``, ``90m``, ``45s``, ``2w`` or a plain number of seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text, re.IGNORECASE)
    if not match:
        raise ValueError(f"{text!r} is not an age; use e.g. 30d, 12h, 90m, 45s or seconds")
    return float(match[1]) * _SECONDS[match[2].lower()]


def human_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def human_age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


# ---------------------------------------------------------------- adapters: list and delete
@dataclass
class Scan:
    """What one listing of a cache found: its entries, and the keys under a live claim."""

    entries: list[Entry]
    live_claims: set[tuple[str, str]]


def scan(root_uri: str, now: float | None = None) -> Scan:
    """List the cache once (no entry is read) and read its claims to find the live ones."""
    now = time.time() if now is None else now
    objects = storage.list_objects(root_uri, etags=False)
    claims = Claims(root_uri)
    live = set()
    for kind, key in claimed_keys(root_uri, objects):
        if _live(claims, kind, key, now):
            live.add((kind, key))
    return Scan(entries_of(root_uri, objects), live)


def _live(claims: Claims, kind: str, key: str, now: float) -> bool:
    current = claims.read(kind, key)
    return current is not None and float(current[0]["expires_at"]) > now


@dataclass
class Pruned:
    deleted: list[Entry]
    kept_claimed: list[Entry]


def delete(root_uri: str, chosen: Iterable[Entry]) -> Pruned:
    """Delete the chosen entries, each only if its key is still not under a live claim."""
    cache, claims = StageCache(root_uri), Claims(root_uri)
    done = Pruned([], [])
    for e in chosen:
        uri = cache.uri(e.kind, e.key)  # rebuilt from the root: never outside the cache
        if uri != e.uri:
            raise ValueError(f"{e.uri} is not the cache entry {uri}")
        if _live(claims, e.kind, e.key, time.time()):
            done.kept_claimed.append(e)
            continue
        storage.delete(uri)
        done.deleted.append(e)
    return done
