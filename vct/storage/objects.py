"""Whole objects besides reading them: write (atomic), exists, delete, list, and whether an
output location can be written at all."""

from __future__ import annotations

import contextlib
import io
import os
import posixpath
import secrets

import botocore.exceptions

from vct.faults import checkpoint
from vct.storage.errors import OutputUnusable, StorageAccessDenied, StorageNotFound, _is_not_found
from vct.storage.local import TMP_SUFFIX, _atomic_local_write, _is_tmp, _write_all
from vct.storage.retry import retrying
from vct.storage.s3 import _TRANSFER_CONFIG, MULTIPART_THRESHOLD, _s3_objects, s3_client
from vct.storage.uris import _local_path, _require_key, _s3_uri, _split_s3, is_s3, join


def write_bytes(uri: str, data: bytes, content_type: str | None = None) -> None:
    """Write an object atomically (see module docstring); creates parent folders locally.
    Transient failures are retried (:func:`retrying`); a retried local write starts from a new
    temp file, a retried S3 write repeats the whole PUT or multipart upload."""
    if is_s3(uri):
        bucket, key = _require_key(uri)
        extra = {"ContentType": content_type} if content_type else {}

        def put() -> None:
            checkpoint("storage.put")
            client = s3_client()
            if len(data) > MULTIPART_THRESHOLD:
                client.upload_fileobj(io.BytesIO(data), bucket, key, ExtraArgs=extra or None,
                                      Config=_TRANSFER_CONFIG)
            else:
                client.put_object(Bucket=bucket, Key=key, Body=data, **extra)
        retrying(put, uri=uri, action="write")
        return
    target = _local_path(uri)
    retrying(lambda: _atomic_local_write(target, lambda fh: _write_all(fh, data)), uri=uri,
             action="write")


def exists(uri: str) -> bool:
    """True if an object (a file, not a folder or bare prefix) exists at uri. "Not there" is
    False; any other failure (403, still throttled after the retries) is a StorageError."""
    if is_s3(uri):
        bucket, key = _split_s3(uri)
        if not key or key.endswith("/"):
            return False

        def head() -> bool:
            try:
                s3_client().head_object(Bucket=bucket, Key=key)
            except botocore.exceptions.ClientError as exc:
                if _is_not_found(exc):
                    return False
                raise
            return True
        return retrying(head, uri=uri, action="check")
    return _local_path(uri).is_file()


def check_writable(prefix_uri: str) -> None:
    """Refuse, with one :class:`OutputUnusable` line, a folder or S3 prefix that a run could
    not write under, before the run does any work (else a missing bucket is found only after
    every inversion was computed). Creates nothing locally; on S3 it writes one probe object
    under the prefix (named like a writer's temp file, so a sweep would take a leftover) and
    deletes it again, because only a write proves write permission.

    Locally: the path, or the nearest part of it that exists, must be a folder this process
    may create entries in (``os.access``; a read-only mount counts as not writable).
    """
    if is_s3(prefix_uri):
        _check_writable_s3(prefix_uri)
        return
    path = _local_path(prefix_uri).expanduser().absolute()
    probe = path
    while not os.path.lexists(probe):
        if probe.parent == probe:
            raise OutputUnusable(prefix_uri, "no existing parent folder")
        probe = probe.parent
    if not probe.is_dir():
        where = "is a file, not a folder" if probe == path else f"{probe} is not a folder"
        raise OutputUnusable(prefix_uri, where)
    if not os.access(probe, os.W_OK | os.X_OK):
        raise OutputUnusable(prefix_uri, f"{probe} is not writable by this user")


def _check_writable_s3(prefix_uri: str) -> None:
    bucket, prefix = _split_s3(prefix_uri)
    if not bucket:
        raise OutputUnusable(prefix_uri, "no bucket in the URI")
    try:
        retrying(lambda: s3_client().head_bucket(Bucket=bucket), uri=prefix_uri,
                 action="check bucket")
    except StorageNotFound:
        raise OutputUnusable(prefix_uri, f"bucket {bucket!r} does not exist") from None
    key = posixpath.join(prefix.rstrip("/"), f".vct-write-probe.{secrets.token_hex(8)}"
                         f"{TMP_SUFFIX}").lstrip("/")
    try:
        retrying(lambda: s3_client().put_object(Bucket=bucket, Key=key, Body=b""),
                 uri=_s3_uri(bucket, key), action="write probe")
    except StorageAccessDenied as exc:
        raise OutputUnusable(prefix_uri, f"writing is denied ({exc.detail})") from None
    delete(_s3_uri(bucket, key))


def delete(uri: str) -> None:
    """Remove an object; deleting a missing one is not an error (S3 semantics, idempotent)."""
    if is_s3(uri):
        bucket, key = _require_key(uri)
        retrying(lambda: s3_client().delete_object(Bucket=bucket, Key=key), uri=uri,
                 action="delete")
        return
    path = _local_path(uri)

    def unlink() -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    retrying(unlink, uri=uri, action="delete")


def list_uris(prefix_uri: str) -> list[str]:
    """Every object under a folder/prefix, recursively, as full sorted URIs.

    Locally our own in-flight temp files (``.name.<random>.tmp``) are skipped so a concurrent
    writer never shows up as a half-written result. A missing folder lists as empty.
    """
    if is_s3(prefix_uri):
        bucket, _, objects = _s3_objects(prefix_uri)
        return sorted(_s3_uri(bucket, o["Key"]) for o in objects)
    root = _local_path(prefix_uri)
    if not root.is_dir():
        return []
    found = []
    for folder, _dirs, files in os.walk(root):
        rel_folder = os.path.relpath(folder, root)
        for name in files:
            if _is_tmp(name):
                continue
            rel = name if rel_folder == "." else os.path.join(rel_folder, name)
            found.append(join(prefix_uri, rel))
    return sorted(found)
