"""What a stage cache holds, and pruning it (``vct cache ls|du|prune``).

The stage cache only grows: every new reference, source, setting or model adds entries. This
module lists its entries (kind, size, age), totals them by kind, and chooses what to delete:
entries older than an age, then the oldest until the cache fits a size, optionally of some kinds
only. Choosing is pure (entries in, entries to delete out); listing and deleting are thin
adapters over :mod:`vct.storage`.

Age is the time since an entry was last used: a read records it (``_used/<kind>/<key>``, an
empty object whose time is the last use; S3 has no access time), and an entry never read since
it was written is as old as its write. Each entry's model is recorded beside it when written
(``_models/<identity>/<kind>/<key>``), so one listing gives kind, size, age and model; entries
written before these records existed show no model.

Safety: only objects laid out exactly as :class:`vct.cache.StageCache` writes them
(``<root>/<kind>/<key[:2]>/<key>.safetensors``) are entries, and a deletion's URI is rebuilt by
``StageCache.uri``, so nothing outside the cache's entries (claims, temp files, foreign files,
other prefixes) is ever deleted. An entry whose key is under a live claim
(:mod:`vct.batch.claims`) is kept: its holder is computing or storing it right now; the claim is
read again just before each deletion. A run that finds an entry gone computes it again.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from vct import storage
from vct.batch.claims import CLAIMS_DIR, Claims
from vct.cache import MODELS_DIR, SUFFIX, USED_DIR, StageCache

_ENTRY_RE = re.compile(r"^(?P<kind>[A-Za-z0-9][A-Za-z0-9_.-]{0,63})/(?P<fan>[0-9a-f]{2})/"
                       r"(?P<key>[0-9a-f]{64})" + re.escape(SUFFIX) + "$")
_CLAIM_RE = re.compile(r"^" + CLAIMS_DIR + r"/(?P<kind>[A-Za-z0-9][A-Za-z0-9_.-]{0,63})/"
                       r"(?P<key>[0-9a-f]{64})\.json$")
_KIND = r"(?P<kind>[A-Za-z0-9][A-Za-z0-9_.-]{0,63})"
_USED_RE = re.compile(rf"^{USED_DIR}/{_KIND}/(?P<key>[0-9a-f]{{64}})$")
_MODEL_RE = re.compile(rf"^{MODELS_DIR}/(?P<model>[0-9A-Za-z][0-9A-Za-z_.+-]{{0,199}})/{_KIND}/"
                       r"(?P<key>[0-9a-f]{64})$")
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
    used: float | None = None  # epoch seconds: when it was last read, if ever recorded
    model: str | None = None  # the model identity it was computed with, if recorded

    @property
    def last_use(self) -> float:
        return max(self.modified, self.used or 0.0)

    def age(self, now: float) -> float:
        """Seconds since the entry was last used (read, or written)."""
        return max(0.0, now - self.last_use)


# ---------------------------------------------------------------- pure: parsing and choosing
def _relative(root_uri: str, uri: str) -> str | None:
    """``uri`` relative to the cache root with ``/`` separators, or None when outside it."""
    root = str(root_uri).rstrip("/") + "/"
    return uri[len(root):] if uri.startswith(root) else None


def entries_of(root_uri: str, objects: Iterable[storage.ObjectInfo]) -> list[Entry]:
    """The cache entries among a listing of the cache root, with their last use and model
    from the bookkeeping records in the same listing; anything else is not an entry."""
    found, used, models = [], {}, {}
    for obj in objects:
        rel = _relative(root_uri, obj.uri)
        if rel is None:
            continue
        if (match := _ENTRY_RE.match(rel)) and match["fan"] == match["key"][:2]:
            found.append((match["kind"], match["key"], obj))
        elif match := _USED_RE.match(rel):
            used[(match["kind"], match["key"])] = obj.modified
        elif match := _MODEL_RE.match(rel):
            models[(match["kind"], match["key"])] = match["model"]
    out = [Entry(kind, key, obj.uri, obj.size, obj.modified, used.get((kind, key)),
                 models.get((kind, key))) for kind, key, obj in found]
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


def totals(entries: Iterable[Entry], by: str = "kind") -> dict[str, tuple[int, int]]:
    """{kind (or model, with by="model"): (entries, bytes)}, sorted."""
    out: dict[str, tuple[int, int]] = {}
    for e in entries:
        name = (e.model or "?") if by == "model" else e.kind
        count, size = out.get(name, (0, 0))
        out[name] = (count + 1, size + e.size)
    return dict(sorted(out.items()))


def in_scope(entries: Iterable[Entry], kinds: Iterable[str] | None = None,
             models: Iterable[str] | None = None) -> list[Entry]:
    """The entries of `kinds` (all when None) computed with a model whose identity starts
    with one of `models` (all when None)."""
    wanted = set(kinds) if kinds is not None else None
    prefixes = tuple(models) if models is not None else None
    return [e for e in entries if (wanted is None or e.kind in wanted)
            and (prefixes is None or (e.model or "").startswith(prefixes))]


def select(entries: Iterable[Entry], now: float, *, older_than_s: float | None = None,
           max_bytes: int | None = None, kinds: Iterable[str] | None = None,
           models: Iterable[str] | None = None,
           protected: Iterable[tuple[str, str]] = ()) -> list[Entry]:
    """The entries to delete, least recently used first.

    In scope are the entries of ``kinds`` (all when None) computed with one of ``models`` (all
    when None; a model matches by identity prefix). Of those, every entry unused for longer than
    ``older_than_s`` goes; then, while the scope's remaining total is over ``max_bytes``, the
    oldest remaining ones go. A ``protected`` (kind, key) (under a live claim) never goes, but
    its size still counts towards the total.
    """
    if older_than_s is None and max_bytes is None:
        raise ValueError("say what to prune: an age (older_than_s), a size (max_bytes) or both")
    keep = set(protected)
    scope = sorted(in_scope(entries, kinds, models), key=lambda e: (e.last_use, e.kind, e.key))
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
    return sorted(chosen, key=lambda e: (e.last_use, e.kind, e.key))


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
        for record in [cache.used_uri(e.kind, e.key)] + (
                [cache.model_uri(e.kind, e.key, e.model)] if e.model else []):
            storage.delete(record)  # its bookkeeping goes with it (a missing one is fine)
        done.deleted.append(e)
    return done


# ---------------------------------------------------------------- the model cache
MODEL_IN_USE_S = 600.0
"""A model folder used this recently is never pruned: a process may be loading it."""
_MODEL_FOLDERS = (  # (kind, pattern of the path below the root, the file that completes it)
    ("single-file", re.compile(r"^single-[0-9a-f]{24}(-[0-9a-f]{12})?$"), "vct_single_file.json"),
    ("s3-model", re.compile(r"^[0-9a-f]{64}$"), ".complete"),
    ("s3-file", re.compile(r"^files/[0-9a-f]{64}$"), ".complete"),
)


def _folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def model_entries(root: Path) -> list[Entry]:
    """The model cache's folders (VCT_MODEL_CACHE): s3:// models synced, single files
    downloaded and converted. Only complete folders laid out as vct makes them are entries."""
    from vct.models import LAST_USED
    from vct.single_file import single_file_identity

    root = Path(root)
    candidates = [p for p in root.iterdir() if p.is_dir()] if root.is_dir() else []
    if (root / "files").is_dir():
        candidates += [p for p in (root / "files").iterdir() if p.is_dir()]
    out = []
    for folder in candidates:
        rel = folder.relative_to(root).as_posix()
        for kind, pattern, marker in _MODEL_FOLDERS:
            if pattern.match(rel) and (folder / marker).is_file():
                used = folder / LAST_USED
                out.append(Entry(kind, rel, str(folder), _folder_size(folder),
                                 (folder / marker).stat().st_mtime,
                                 used.stat().st_mtime if used.is_file() else None,
                                 single_file_identity(folder)))
    return sorted(out, key=lambda e: (e.kind, e.modified, e.key))


def delete_models(root: Path, chosen: Iterable[Entry], now: float | None = None) -> Pruned:
    """Delete model folders: each renamed aside first (a loader sees it whole or not at all),
    then removed; a folder used in the last :data:`MODEL_IN_USE_S` is kept."""
    from vct.models import LAST_USED

    root = Path(root).resolve()
    done = Pruned([], [])
    for e in chosen:
        folder = Path(e.uri).resolve()
        if folder.parent not in (root, root / "files") or not any(
                p.match(e.key) for _, p, _ in _MODEL_FOLDERS):
            raise ValueError(f"{folder} is not a model cache folder of {root}")
        used = folder / LAST_USED
        last = used.stat().st_mtime if used.is_file() else 0.0
        if (now if now is not None else time.time()) - last < MODEL_IN_USE_S:
            done.kept_claimed.append(e)
            continue
        aside = folder.with_name(f".{folder.name}.{secrets.token_hex(4)}.deleting")
        os.rename(folder, aside)
        shutil.rmtree(aside, ignore_errors=True)
        done.deleted.append(e)
    return done


# ---------------------------------------------------------------- one listing, one prune
@dataclass
class Listing:
    """A stage cache or the model cache, listed once: its entries and those never to delete
    (under a live claim; for models, in use)."""

    root: str
    entries: list[Entry]
    protected: set[tuple[str, str]]
    models: bool


def list_cache(cache: str | None, model_cache: bool = False,
               now: float | None = None) -> Listing:
    """`cache` (a stage cache: folder or s3:// prefix), or with `model_cache` the model cache."""
    from vct.config import ConfigError
    from vct.models import model_cache_root

    if bool(cache) == bool(model_cache):
        raise ConfigError("cache", "give a stage cache (a folder or s3:// prefix) or the model "
                          "cache, not both")
    now = time.time() if now is None else now
    if model_cache:
        root = str(model_cache_root())
        entries = model_entries(Path(root))
        busy = {(e.kind, e.key) for e in entries if now - e.last_use < MODEL_IN_USE_S}
        return Listing(root, entries, busy, True)
    found = scan(cache, now)
    return Listing(cache, found.entries, found.live_claims, False)


def prune(listing: Listing, chosen: list[Entry]) -> Pruned:
    """Delete what :func:`select` chose from this listing (each entry checked again first)."""
    if listing.models:
        return delete_models(Path(listing.root), chosen)
    return delete(listing.root, chosen)
