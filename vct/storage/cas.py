"""Compare-and-swap of small objects (claims, incoming-manifest markers): versions, versioned
reads, conditional writes and deletes, and listings with each object's version."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import botocore.exceptions

from vct.storage.errors import (
    NotARegularFile,
    StorageNotFound,
    _error_code,
    _http_status,
    _is_not_found,
)
from vct.storage.local import (
    _atomic_local_write,
    _fsync_dir,
    _open_exclusive,
    _write_all,
    _write_tmp,
)
from vct.storage.objects import list_uris
from vct.storage.reads import read_bytes
from vct.storage.retry import retrying
from vct.storage.s3 import _s3_objects, s3_client
from vct.storage.uris import _local_path, _require_key, _s3_uri, is_s3

# Claims (vct.batch.claims) and incoming-manifest markers (vct.batch.incoming) are created once,
# then renewed, taken over or released only by whoever holds their current *version*:
# compare-and-swap. A version is the S3 ETag (quotes removed: the MD5 of a single-part upload)
# or, locally, the MD5 of the file's bytes, so "same version, same object" holds on both and a
# listing's ETag (:func:`list_objects`) can be compared with it.
#
# - Create (expected version None): on S3 a conditional PUT ``If-None-Match: *`` (S3 since 2024,
#   moto >= 5.0.14); locally a fully written temp file hard-linked to the target (``link``
#   fails if it exists, and readers only ever see complete content).
# - Replace / delete (expected version given): on S3 ``If-Match``; locally under an flock on
#   the object's folder (released by the kernel when its holder dies; works on NFSv4 too),
#   comparing the current MD5 first. A create cannot conflict with a swap: one needs the object absent, the
#   other present.
#
# 412 PreconditionFailed (or 404 for an expected object that is gone) means someone else won:
# the call returns None/False and writes nothing. A retried PUT may meet its own earlier attempt
# (the first succeeded, its response was lost, the retry gets 412), so after a retry a 412 reads
# the object back and counts as ours if it holds exactly ``data``: callers put something unique
# in ``data`` (an owner token and a timestamp) for "first writer wins" to stay exact. 409
# ConditionalRequestConflict, throttling and connection errors are retried (:func:`retrying`).


def version_of(data: bytes) -> str:
    """The version an object holding ``data`` has (the MD5 hex S3 gives a single-part PUT)."""
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def _etag(value: object) -> str:
    return str(value or "").strip('"')


def _precondition_failed(exc: BaseException) -> bool:
    return _error_code(exc) == "PreconditionFailed" or _http_status(exc) == 412


def read_versioned(uri: str) -> tuple[bytes, str] | None:
    """The object's bytes and version, or None when it is absent."""
    if is_s3(uri):
        bucket, key = _require_key(uri)

        def get() -> tuple[bytes, str] | None:
            try:
                response = s3_client().get_object(Bucket=bucket, Key=key)
            except botocore.exceptions.ClientError as exc:
                if _is_not_found(exc):
                    return None
                raise
            with contextlib.closing(response["Body"]) as body:
                return body.read(), _etag(response["ETag"])
        return retrying(get, uri=uri, action="read")
    try:
        data = read_bytes(uri)
    except StorageNotFound:
        return None
    return data, version_of(data)


def conditional_put(uri: str, data: bytes, expect: str | None) -> str | None:
    """Write ``data`` only if the object is absent (``expect`` None) or still has version
    ``expect``; the new version, or None when the condition failed (nothing was written)."""
    action = "create" if expect is None else "conditional write"
    if is_s3(uri):
        bucket, key = _require_key(uri)
        condition = {"IfNoneMatch": "*"} if expect is None else {"IfMatch": f'"{expect}"'}
        tries = 0

        def put() -> str | None:
            nonlocal tries
            tries += 1
            try:
                response = s3_client().put_object(Bucket=bucket, Key=key, Body=data,
                                                  **condition)
                return _etag(response.get("ETag")) or version_of(data)
            except botocore.exceptions.ClientError as exc:
                if not (_precondition_failed(exc) or (expect is not None and _is_not_found(exc))):
                    raise
                retried = tries > 1 or exc.response.get("ResponseMetadata", {}).get(
                    "RetryAttempts")
                return _own_lost_put(uri, data) if retried else None
        return retrying(put, uri=uri, action=action)
    target = _local_path(uri)
    if expect is None:
        return retrying(lambda: version_of(data) if _local_create(target, data) else None,
                        uri=uri, action=action)

    def swap() -> str | None:
        with _local_swap_lock(target):
            current = read_versioned(uri)
            if current is None or current[1] != expect:
                return None
            _atomic_local_write(target, lambda fh: _write_all(fh, data))
            return version_of(data)
    return retrying(swap, uri=uri, action=action)


def create_if_absent(uri: str, data: bytes) -> bool:
    """Write data only if nothing exists at uri; True if this call created it (first writer
    wins: exclusive, never check-then-write)."""
    return conditional_put(uri, data, None) is not None


def delete_if_match(uri: str, version: str) -> bool:
    """Delete the object only if its current version is ``version``; True if this call did."""
    if is_s3(uri):
        bucket, key = _require_key(uri)

        def drop() -> bool:
            try:
                s3_client().delete_object(Bucket=bucket, Key=key, IfMatch=f'"{version}"')
            except botocore.exceptions.ClientError as exc:
                if _is_not_found(exc) or _precondition_failed(exc):
                    return False
                raise
            return True
        return retrying(drop, uri=uri, action="delete")
    target = _local_path(uri)

    def unlink() -> bool:
        with _local_swap_lock(target):
            current = read_versioned(uri)
            if current is None or current[1] != version:
                return False
            os.unlink(target)
            return True
    return retrying(unlink, uri=uri, action="delete")


def _local_create(target: Path, data: bytes) -> bool:
    tmp = _write_tmp(target, lambda fh: _write_all(fh, data))
    try:
        os.link(tmp, target)
    except FileExistsError:
        return False
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
            raise
        return _create_exclusive_nolink(target, data)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    _fsync_dir(target.parent)
    return True


def _create_exclusive_nolink(target: Path, data: bytes) -> bool:
    """Fallback for filesystems without hard links: still exclusive (O_EXCL), but a reader
    racing the write could see a short file, so the link path above is preferred."""
    try:
        with _open_exclusive(target) as fh:
            _write_all(fh, data)
            fh.flush()
            os.fsync(fh.fileno())
    except FileExistsError:
        return False
    return True


def _own_lost_put(uri: str, data: bytes) -> str | None:
    """After a retried conditional PUT got 412: the version if the object is exactly ours."""
    got = read_versioned(uri)
    return got[1] if got is not None and got[0] == data else None


@contextlib.contextmanager
def _local_swap_lock(target: Path):
    import fcntl

    target.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(target.parent, os.O_RDONLY)  # the folder: no lock files beside the objects
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the flock


# ---------------------------------------------------------------- listings
@dataclass(frozen=True)
class ObjectInfo:
    """One object of a listing: its URI, version (:func:`version_of`: the ETag), size and
    modification time (epoch seconds)."""

    uri: str
    etag: str
    size: int
    modified: float


def list_objects(prefix_uri: str, suffixes: tuple[str, ...] = (), *,
                 etags: bool = True) -> list[ObjectInfo]:
    """Every object under a folder/prefix (recursively, sorted by URI) with its ETag, in one
    listing; only names ending with one of ``suffixes`` (ignoring case) when given. Locally the
    ETag is computed by reading each file, so keep this to small prefixes (an incoming folder of
    manifests and markers) and pass ``suffixes``; ``etags=False`` skips that (``etag`` is then
    empty locally): sizes and times from one stat per file, for large folders (a stage cache)."""
    ends = tuple(s.lower() for s in suffixes)
    if is_s3(prefix_uri):
        bucket, _, objects = _s3_objects(prefix_uri)
        return [ObjectInfo(_s3_uri(bucket, o["Key"]), _etag(o.get("ETag")),
                           int(o.get("Size", 0)), o["LastModified"].timestamp())
                for o in objects if not ends or o["Key"].lower().endswith(ends)]
    out = []
    for uri in list_uris(prefix_uri):
        if ends and not uri.lower().endswith(ends):
            continue
        path = _local_path(uri)
        try:
            if not etags:
                stat = path.stat()
                out.append(ObjectInfo(uri, "", stat.st_size, stat.st_mtime))
                continue
            data = read_bytes(uri)
            modified = path.stat().st_mtime
        except (StorageNotFound, FileNotFoundError, NotARegularFile):
            continue  # removed (or swapped for something else) since the listing
        out.append(ObjectInfo(uri, version_of(data), len(data), modified))
    return out
