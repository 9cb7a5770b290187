"""URIs: local path or ``s3://bucket/key``, joining, resolving a reference inside a document,
and splitting an S3 URI into bucket and key."""

from __future__ import annotations

import os
import posixpath
from pathlib import Path
from urllib.parse import unquote

from vct.storage.errors import StorageError

S3_SCHEME = "s3://"
FILE_SCHEME = "file://"

def is_s3(uri: str | os.PathLike[str]) -> bool:
    """True for ``s3://bucket/key`` URIs; anything else is a local path."""
    return isinstance(uri, str) and uri.startswith(S3_SCHEME)


def _local_path(uri: str | os.PathLike[str]) -> Path:
    """The filesystem path of a local URI (plain path or ``file://``), with ``~`` expanded."""
    text = os.fspath(uri)
    if text.startswith(FILE_SCHEME):
        text = unquote(text[len(FILE_SCHEME):])
    return Path(os.path.expanduser(text))


def _split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")``; a bad URI is an error, not a guess."""
    rest = uri[len(S3_SCHEME):]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise StorageError(f"invalid S3 URI (no bucket): {uri}")
    return bucket, key


def _s3_uri(bucket: str, key: str) -> str:
    return f"{S3_SCHEME}{bucket}/{key}" if key else f"{S3_SCHEME}{bucket}"


def _require_key(uri: str) -> tuple[str, str]:
    bucket, key = _split_s3(uri)
    if not key or key.endswith("/"):
        raise StorageError(f"S3 URI names a prefix, not an object: {uri}")
    return bucket, key


def join(base: str, *parts: str) -> str:
    """Append path parts to a local path or an S3 URI (``/`` separators on S3 always)."""
    base = os.fspath(base)
    if is_s3(base):
        pieces = [base.rstrip("/")] + [p.strip("/") for p in parts if p.strip("/")]
        return "/".join(pieces)
    if base.startswith(FILE_SCHEME):
        return FILE_SCHEME + os.path.join(base[len(FILE_SCHEME):], *parts)
    return os.path.join(base, *parts)


def resolve(ref: str, relative_to: str) -> str:
    """Resolve a reference written inside a document (a manifest) against that document.

    ``relative_to`` is the URI of the document itself: a relative ``ref`` is taken relative to the
    document's folder (a ``relative_to`` ending in ``/`` is that folder). This lets a manifest and
    its images move together, locally or on S3. ``s3://`` URIs, ``file://`` URIs, absolute and
    ``~`` paths pass through unchanged (``~`` expanded). A relative ref that climbs out of an S3
    bucket is an error rather than a silently wrong key.
    """
    ref, relative_to = ref.strip(), os.fspath(relative_to)
    if not ref:
        raise StorageError("empty path")
    if is_s3(ref) or ref.startswith(FILE_SCHEME):
        return ref
    if ref.startswith("~"):
        return os.path.expanduser(ref)
    if os.path.isabs(ref):
        return ref
    if is_s3(relative_to):
        bucket, key = _split_s3(relative_to)
        folder = key if key.endswith("/") or not key else posixpath.dirname(key)
        joined = posixpath.normpath(posixpath.join("/", folder, ref))
        return _s3_uri(bucket, joined.lstrip("/"))
    base = _local_path(relative_to)
    folder = base if relative_to.endswith(("/", os.sep)) else base.parent
    return os.path.normpath(os.path.join(os.path.abspath(folder), ref))
