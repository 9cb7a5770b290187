"""One small storage interface over local paths and ``s3://bucket/key`` URIs.

The pipeline reads manifests, images and model folders and writes results and cache entries;
each of those may live on local disk or on S3. Every function here dispatches on the URI so the
rest of the code never branches on the backend. A plain path or a ``file://`` URI is local.

Guarantees the callers rely on:

- Writes are atomic: a reader sees the old object, or the whole new one, never a partial file.
  Locally that is a temp file in the same folder (``.name.<random>.tmp``), fsync, ``os.replace``;
  on S3 a single PUT (or the transfer manager's multipart upload, which also only makes the
  object visible once complete).
- A missing object raises :class:`StorageNotFound` naming the URI, so "not there" is easy to tell
  apart from "the network broke" (see :func:`is_transient`, used for retry conditions).
- The S3 client honours the standard AWS configuration (``AWS_ENDPOINT_URL``,
  ``AWS_ENDPOINT_URL_S3``, profiles, credentials); it is created lazily and cached per process and
  endpoint environment, so env vars set late (tests, CLIs) take effect.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import posixpath
import secrets
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import unquote

import boto3
import boto3.exceptions
import botocore.config
import botocore.exceptions
from boto3.s3.transfer import TransferConfig

S3_SCHEME = "s3://"
FILE_SCHEME = "file://"
TMP_SUFFIX = ".tmp"
COMPLETE_MARKER = ".complete"

# Objects up to this size go up in one PUT (one request, trivially atomic); larger ones use the
# transfer manager's multipart upload, which S3 also only publishes once every part is in.
MULTIPART_THRESHOLD = 64 * 1024 * 1024
_TRANSFER_CONFIG = TransferConfig(multipart_threshold=MULTIPART_THRESHOLD,
                                  multipart_chunksize=MULTIPART_THRESHOLD)
_COPY_CHUNK = 8 * 1024 * 1024

# Env vars that change which endpoint/credentials/region a new client gets: part of the cache key.
_CLIENT_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_DEFAULT_PROFILE",
               "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_ACCESS_KEY_ID", "AWS_CONFIG_FILE",
               "AWS_SHARED_CREDENTIALS_FILE", "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS")
DEFAULT_REGION = "us-east-1"

_NOT_FOUND_CODES = frozenset({"NoSuchKey", "NoSuchBucket", "404", "NotFound"})
_TRANSIENT_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottled",
    "RequestThrottledException", "TooManyRequestsException", "RequestLimitExceeded",
    "ProvisionedThroughputExceededException", "BandwidthLimitExceeded", "InternalError",
    "InternalFailure", "ServiceUnavailable", "ServiceUnavailableException", "RequestTimeout",
    "RequestTimeoutException", "PriorRequestNotComplete", "OperationAborted",
    "ConditionalRequestConflict", "EC2ThrottledException",
})
# Local OSErrors that will not go away by retrying.
_PERMANENT_OSERRORS = (FileNotFoundError, PermissionError, IsADirectoryError,
                       NotADirectoryError, FileExistsError)


class StorageError(Exception):
    """A storage operation failed; the message names the URI."""


class StorageNotFound(StorageError):
    """The object at a URI does not exist (a missing file, key or bucket)."""

    def __init__(self, uri: str, detail: str = ""):
        self.uri = uri
        super().__init__(f"not found: {uri}" + (f" ({detail})" if detail else ""))


class StorageChanged(StorageError):
    """Objects changed while being copied; the copy was discarded. Transient: retry."""


# ---------------------------------------------------------------- URI helpers
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


# ---------------------------------------------------------------- S3 client
_client_lock = threading.Lock()
_clients: dict[tuple[Any, ...], Any] = {}


def _client_key() -> tuple[Any, ...]:
    """Process and the env that configures a client: a change gives a new client.

    Clients are thread-safe and shared by threads (creation is serialised by a lock, because
    creating sessions concurrently is not safe); per pid so a forked worker never shares its
    parent's connection pool.
    """
    env = tuple(os.environ.get(name) for name in _CLIENT_ENV)
    return (os.getpid(), env)


def s3_client() -> Any:
    """The cached boto3 S3 client for the current environment, created on first use.

    Endpoint, credentials and profile come from boto3's standard resolution
    (``AWS_ENDPOINT_URL[_S3]``, ``AWS_PROFILE``, config files); only the region gets a default
    (``us-east-1``) because a client without one cannot sign requests. Retries use botocore's
    "standard" mode (5 attempts, backoff) so throttling and 5xx are absorbed below us.
    """
    key = _client_key()
    client = _clients.get(key)
    if client is not None:
        return client
    with _client_lock:
        client = _clients.get(key)
        if client is None:
            session = boto3.session.Session()
            config = botocore.config.Config(retries={"mode": "standard", "max_attempts": 5})
            client = session.client("s3", region_name=session.region_name or DEFAULT_REGION,
                                    config=config)
            _clients[key] = client
    return client


def reset_clients() -> None:
    """Forget cached clients (tests that swap endpoints; after changing AWS config files)."""
    with _client_lock:
        _clients.clear()


def _error_code(exc: BaseException) -> str:
    if isinstance(exc, botocore.exceptions.ClientError):
        return str(exc.response.get("Error", {}).get("Code", ""))
    return ""


def _http_status(exc: BaseException) -> int:
    if isinstance(exc, botocore.exceptions.ClientError):
        return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
    return 0


def _is_not_found(exc: BaseException) -> bool:
    return _error_code(exc) in _NOT_FOUND_CODES or _http_status(exc) == 404


@contextlib.contextmanager
def _s3_errors(uri: str) -> Iterator[None]:
    """Turn "no such key/bucket" into StorageNotFound; let everything else through unchanged
    so retry logic still sees the original botocore exception."""
    try:
        yield
    except botocore.exceptions.ClientError as exc:
        if _is_not_found(exc):
            raise StorageNotFound(uri, _error_code(exc)) from exc
        raise


# ---------------------------------------------------------------- local atomic writes
def _tmp_name(target: Path) -> Path:
    return target.with_name(f".{target.name}.{secrets.token_hex(8)}{TMP_SUFFIX}")


def _is_tmp(name: str) -> bool:
    return name.startswith(".") and name.endswith(TMP_SUFFIX)


def _fsync_dir(folder: Path) -> None:
    """Persist a rename; best effort because some filesystems refuse fsync on directories."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _open_exclusive(path: Path) -> BinaryIO:
    """Create a new file, failing if it exists; mode 0o666 so the umask decides permissions
    (mkstemp would make results 0600, unreadable by other users of a shared output folder)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    return os.fdopen(fd, "wb")


def _write_tmp(target: Path, writer: Callable[[BinaryIO], None]) -> Path:
    """Write a fully fsynced temp file next to target and return its path (removed on error)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(target)
    try:
        with _open_exclusive(tmp) as fh:
            writer(fh)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return tmp


def _atomic_local_write(target: Path, writer: Callable[[BinaryIO], None]) -> None:
    """Temp file in the same folder, fsync, os.replace: readers never see a partial file."""
    tmp = _write_tmp(target, writer)
    try:
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(target.parent)


def _copy_from(src: Path) -> Callable[[BinaryIO], None]:
    def writer(fh: BinaryIO) -> None:
        with open(src, "rb") as source:
            shutil.copyfileobj(source, fh, _COPY_CHUNK)
    return writer


# ---------------------------------------------------------------- read / write
def read_bytes(uri: str) -> bytes:
    """The whole object; StorageNotFound if it does not exist."""
    if is_s3(uri):
        bucket, key = _require_key(uri)
        with _s3_errors(uri):
            return s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
    path = _local_path(uri)
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise StorageNotFound(uri) from exc
    except IsADirectoryError as exc:
        raise StorageError(f"is a directory, not a file: {uri}") from exc


def write_bytes(uri: str, data: bytes, content_type: str | None = None) -> None:
    """Write an object atomically (see module docstring); creates parent folders locally."""
    if is_s3(uri):
        bucket, key = _require_key(uri)
        extra = {"ContentType": content_type} if content_type else {}
        client = s3_client()
        with _s3_errors(uri):
            if len(data) > MULTIPART_THRESHOLD:
                client.upload_fileobj(io.BytesIO(data), bucket, key, ExtraArgs=extra or None,
                                      Config=_TRANSFER_CONFIG)
            else:
                client.put_object(Bucket=bucket, Key=key, Body=data, **extra)
        return
    _atomic_local_write(_local_path(uri), lambda fh: _write_all(fh, data))


def _write_all(fh: BinaryIO, data: bytes) -> None:
    """Write in chunks: very large buffers then never need a second in-kernel copy at once."""
    view = memoryview(data)
    for start in range(0, len(view), _COPY_CHUNK):
        fh.write(view[start:start + _COPY_CHUNK])


def write_file(uri: str, local_path: str | os.PathLike[str],
               content_type: str | None = None) -> None:
    """Upload/copy a local file to uri atomically (S3: boto3's transfer manager)."""
    src = Path(local_path)
    if not src.is_file():
        raise StorageNotFound(str(local_path), "local source file")
    if is_s3(uri):
        bucket, key = _require_key(uri)
        extra = {"ContentType": content_type} if content_type else None
        with _s3_errors(uri):
            s3_client().upload_file(str(src), bucket, key, ExtraArgs=extra,
                                    Config=_TRANSFER_CONFIG)
        return
    _atomic_local_write(_local_path(uri), _copy_from(src))


# ---------------------------------------------------------------- metadata
def exists(uri: str) -> bool:
    """True if an object (a file, not a folder or bare prefix) exists at uri."""
    if is_s3(uri):
        bucket, key = _split_s3(uri)
        if not key or key.endswith("/"):
            return False
        try:
            s3_client().head_object(Bucket=bucket, Key=key)
        except botocore.exceptions.ClientError as exc:
            if _is_not_found(exc):
                return False
            raise
        return True
    return _local_path(uri).is_file()


def delete(uri: str) -> None:
    """Remove an object; deleting a missing one is not an error (S3 semantics, idempotent)."""
    if is_s3(uri):
        bucket, key = _require_key(uri)
        with _s3_errors(uri):
            s3_client().delete_object(Bucket=bucket, Key=key)
        return
    with contextlib.suppress(FileNotFoundError):
        os.unlink(_local_path(uri))


def _s3_objects(prefix_uri: str) -> tuple[str, str, list[dict[str, Any]]]:
    """(bucket, folder prefix, objects) under an S3 "folder"; the prefix gets a trailing '/'
    so ``s3://b/model`` never picks up ``s3://b/model-old/...`` (same as a local folder)."""
    bucket, prefix = _split_s3(prefix_uri)
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    objects: list[dict[str, Any]] = []
    with _s3_errors(prefix_uri):
        pages = s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket,
                                                                     Prefix=prefix)
        for page in pages:
            objects.extend(o for o in page.get("Contents", []) if not o["Key"].endswith("/"))
    objects.sort(key=lambda o: o["Key"])
    return bucket, prefix, objects


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


def etag_or_mtime(uri: str) -> str:
    """A cheap version stamp: the S3 ETag, or ``<size>-<mtime_ns>`` locally. Used to cache
    downloads (a model folder) without hashing gigabytes."""
    if is_s3(uri):
        bucket, key = _require_key(uri)
        with _s3_errors(uri):
            return s3_client().head_object(Bucket=bucket, Key=key)["ETag"].strip('"')
    try:
        st = _local_path(uri).stat()
    except FileNotFoundError as exc:
        raise StorageNotFound(uri) from exc
    return f"{st.st_size}-{st.st_mtime_ns}"


# ---------------------------------------------------------------- exclusive create
def create_if_absent(uri: str, data: bytes) -> bool:
    """Write data only if nothing exists at uri; True if this call created it.

    Used as a lock/claim ("first writer wins"), so it must be exclusive, not check-then-write.
    Locally the content goes into a fully written temp file which is then hard-linked to the
    target: ``link`` fails if the target exists, and readers only ever see complete content.
    On S3 it is a conditional PUT (``If-None-Match: *``, supported by S3 since 2024 and by
    moto >= 5.0.14); 412 PreconditionFailed means someone else created it. A 409
    ConditionalRequestConflict (a concurrent conditional write in flight) is retried briefly.
    """
    if is_s3(uri):
        return _s3_create_if_absent(uri, data)
    target = _local_path(uri)
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


def _s3_create_if_absent(uri: str, data: bytes, attempts: int = 5) -> bool:
    bucket, key = _require_key(uri)
    for attempt in range(attempts):
        try:
            s3_client().put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
            return True
        except botocore.exceptions.ClientError as exc:
            code, status = _error_code(exc), _http_status(exc)
            if code == "PreconditionFailed" or status == 412:
                return False
            if (code == "ConditionalRequestConflict" or status == 409) and \
                    attempt < attempts - 1:
                time.sleep(0.1 * 2 ** attempt)
                continue
            if _is_not_found(exc):
                raise StorageNotFound(uri, code) from exc
            raise
    raise AssertionError("unreachable")  # pragma: no cover


# ---------------------------------------------------------------- prefix sync (model cache)
def _listing_digest(bucket: str, prefix: str, objects: list[dict[str, Any]]) -> str:
    listing = {"bucket": bucket, "prefix": prefix,
               "objects": [[o["Key"], o["ETag"].strip('"')] for o in objects]}
    blob = json.dumps(listing, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


def _safe_relative(key: str, prefix: str, uri: str) -> str:
    """The object's path below the prefix, refusing keys that would escape the cache folder."""
    rel = key[len(prefix):]
    norm = posixpath.normpath(rel)
    if not rel or norm.startswith("../") or norm == ".." or posixpath.isabs(norm):
        raise StorageError(f"refusing to sync key that escapes its folder: {uri}")
    return norm


def sync_prefix(prefix_uri: str, cache_root: Path) -> Path:
    """Mirror an S3 folder (e.g. a model) into ``cache_root/<digest>`` once and reuse it.

    The digest hashes (bucket, prefix, every key with its ETag), so a changed or added object
    yields a new folder and an unchanged prefix costs one LIST and no GETs. The folder is
    downloaded into a temp folder, marked complete with a ``.complete`` file written last, then
    renamed into place, so an interrupted sync is never mistaken for a finished one. After the
    downloads the prefix is listed again; if it changed meanwhile the (mixed) copy is discarded
    and a StorageError is raised (transient: retry). A local path is returned unchanged.
    """
    if not is_s3(prefix_uri):
        return _local_path(prefix_uri)
    bucket, prefix, objects = _s3_objects(prefix_uri)
    if not objects:
        raise StorageNotFound(prefix_uri, "no objects under this prefix")
    digest = _listing_digest(bucket, prefix, objects)
    cache_root = Path(cache_root)
    final = cache_root / digest
    if (final / COMPLETE_MARKER).is_file():
        return final
    cache_root.mkdir(parents=True, exist_ok=True)
    tmp = cache_root / f".{digest}.{secrets.token_hex(8)}{TMP_SUFFIX}"
    try:
        _download_objects(bucket, prefix, objects, tmp)
        _, _, again = _s3_objects(prefix_uri)
        if _listing_digest(bucket, prefix, again) != digest:
            raise StorageChanged(f"{prefix_uri} changed during download; retry the sync")
        (tmp / COMPLETE_MARKER).write_text(json.dumps({"uri": prefix_uri, "digest": digest}))
        _publish_folder(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _download_objects(bucket: str, prefix: str, objects: list[dict[str, Any]],
                      dest: Path) -> None:
    dest.mkdir(parents=True)
    client = s3_client()
    for obj in objects:
        uri = _s3_uri(bucket, obj["Key"])
        target = dest / _safe_relative(obj["Key"], prefix, uri)
        target.parent.mkdir(parents=True, exist_ok=True)
        with _s3_errors(uri):
            client.download_file(bucket, obj["Key"], str(target), Config=_TRANSFER_CONFIG)


def _publish_folder(tmp: Path, final: Path) -> None:
    """Rename the finished temp folder into place; if another process won the race with a
    complete copy keep theirs, and replace a leftover folder that lacks the marker."""
    try:
        os.rename(tmp, final)
        return
    except OSError as exc:
        if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
            raise
    if (final / COMPLETE_MARKER).is_file():
        return
    shutil.rmtree(final, ignore_errors=True)
    os.rename(tmp, final)


# ---------------------------------------------------------------- retry classification
def is_transient(exc: BaseException) -> bool:
    """Whether retrying the same operation could succeed: network errors, timeouts, throttling
    and 5xx. Missing objects, bad requests, access denied and local permission problems are
    permanent. Follows ``__cause__`` so errors wrapped by this module classify like the original.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        verdict = _classify(current)
        if verdict is not None:
            return verdict
        current = _underlying(current)
    return False


def _underlying(exc: BaseException) -> BaseException | None:
    """The error exc wraps: its cause, s3transfer's last_exception, or, for boto3's
    S3UploadFailedError (raised inside ``except ClientError`` without ``from``), its context."""
    if exc.__cause__ is not None:
        return exc.__cause__
    if getattr(exc, "last_exception", None) is not None:
        return exc.last_exception  # type: ignore[attr-defined]
    if isinstance(exc, boto3.exceptions.S3UploadFailedError) and not exc.__suppress_context__:
        return exc.__context__
    return None


def _classify(exc: BaseException) -> bool | None:
    """True/False when exc itself decides; None to look at its cause."""
    if isinstance(exc, StorageNotFound):
        return False
    if isinstance(exc, StorageChanged):
        return True
    if isinstance(exc, botocore.exceptions.ClientError):
        code, status = _error_code(exc), _http_status(exc)
        return code in _TRANSIENT_CODES or status >= 500 or status == 429
    if isinstance(exc, (botocore.exceptions.ConnectionError,
                        botocore.exceptions.HTTPClientError,
                        botocore.exceptions.IncompleteReadError)):
        return True
    if isinstance(exc, (TimeoutError, ConnectionError)):
        return True
    if isinstance(exc, _PERMANENT_OSERRORS):
        return False
    if isinstance(exc, OSError):
        return True
    return None
