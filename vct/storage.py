"""One small storage interface over local paths and ``s3://bucket/key`` URIs.

The pipeline reads manifests, images and model folders and writes results and cache entries;
each of those may live on local disk or on S3. Every function here dispatches on the URI so the
rest of the code never branches on the backend. A plain path or a ``file://`` URI is local.

Guarantees the callers rely on:

- Writes are atomic: a reader sees the old object, or the whole new one, never a partial file.
  Locally that is a temp file in the same folder (``.name.<random>.tmp``), fsync, ``os.replace``;
  on S3 a single PUT (or the transfer manager's multipart upload, which also only makes the
  object visible once complete). :func:`sweep_temp_files` removes what killed writers left.
- Reads only ever read a regular file or an object, and never more than a cap when one is given:
  :func:`read_bytes` (``max_bytes``: none by default, for the pipeline's own objects),
  :func:`read_input` (for bytes a user pointed us at: capped at ``VCT_MAX_INPUT_BYTES``, default
  :data:`MAX_INPUT_BYTES`) and :func:`digest_input` (the same, streamed through sha256 keeping
  only a head of :data:`HEAD_BYTES`, for planning). A FIFO, a device such as ``/dev/zero``, a
  socket or a folder is refused before a single byte is read, and the cap is enforced while reading, so neither a
  huge object nor an endless stream can exhaust memory or hang a run.
- Every failure of an operation on one object is a :class:`StorageError` whose one-line message
  names the URI and what happened: :class:`StorageNotFound`, :class:`StorageAccessDenied`
  (HTTP 403, local EACCES), :class:`NotARegularFile`, :class:`InputTooLarge`,
  :class:`StorageUnavailable` (throttling, 5xx, connection errors, timeouts: still failing after
  the retries), :class:`StorageFailed` (anything else, e.g. HTTP 400, a full disk). Programming
  errors (TypeError, ValueError from our own code) are not wrapped. The original error is the
  ``__cause__``; :func:`is_transient` says whether retrying later could help.
- Transient failures are retried at two levels: botocore's "standard" retry mode inside each S3
  call (``VCT_S3_MAX_ATTEMPTS`` requests, with connect/read timeouts ``VCT_S3_CONNECT_TIMEOUT``
  and ``VCT_S3_READ_TIMEOUT``), and :func:`retrying` around each storage operation (bounded by
  ``VCT_STORAGE_ATTEMPTS`` tries and ``VCT_STORAGE_RETRY_DEADLINE_S`` seconds, exponential
  backoff with jitter from ``VCT_STORAGE_RETRY_BASE_S`` up to ``VCT_STORAGE_RETRY_MAX_S``).
  The outer level also covers what botocore does not retry (an error while streaming a body)
  and a burst of throttling longer than one call's attempts. Permanent errors (403, 404, 400)
  are never retried.
- The S3 client honours the standard AWS configuration (``AWS_ENDPOINT_URL``,
  ``AWS_ENDPOINT_URL_S3``, profiles, credentials); it is created lazily and cached per process and
  endpoint environment, so env vars set late (tests, CLIs) take effect.

Environment variables (read at each call, so a changed value takes effect at once; a bad value is
a ValueError naming the variable). Defaults in parentheses:

- ``VCT_MAX_INPUT_BYTES`` (64 MiB): the cap of :func:`read_input` and :func:`digest_input`.
- ``VCT_S3_MAX_ATTEMPTS`` (5): HTTP requests botocore makes per S3 call (standard retry mode).
- ``VCT_S3_CONNECT_TIMEOUT`` (10 s), ``VCT_S3_READ_TIMEOUT`` (60 s): per request.
- ``VCT_STORAGE_ATTEMPTS`` (4): tries of one storage operation (each with botocore's retries).
- ``VCT_STORAGE_RETRY_BASE_S`` (0.5), ``VCT_STORAGE_RETRY_MAX_S`` (8): backoff before try n is
  ``min(max, base * 2**(n-2))`` with equal jitter (half fixed, half random).
- ``VCT_STORAGE_RETRY_DEADLINE_S`` (60): no new try starts once it would begin later than this.
- ``VCT_TEMP_MAX_AGE_S`` (86400): the default age of :func:`sweep_temp_files`.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import logging
import os
import posixpath
import random
import re
import secrets
import shutil
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TypeVar
from urllib.parse import unquote

import boto3
import boto3.exceptions
import botocore.config
import botocore.exceptions
import s3transfer.exceptions
from boto3.s3.transfer import TransferConfig

from vct.errors import UserError
from vct.faults import checkpoint

T = TypeVar("T")
log = logging.getLogger("vct.storage")

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
_READ_CHUNK = 1024 * 1024

# The default cap of read_input: far above any photo the model can use (a 64 MP PNG is the
# pixel cap of vct.images), far below what would hurt a worker's memory.
MAX_INPUT_BYTES = 64 * 1024 * 1024
ENV_MAX_INPUT_BYTES = "VCT_MAX_INPUT_BYTES"
# What digest_input keeps of an input for a header probe: a PNG, GIF or WebP header and a
# JPEG's frame header after its EXIF/ICC segments fit in far less (a TIFF whose first IFD
# follows its pixels does not: the planner then reads the whole file).
HEAD_BYTES = 256 * 1024
# botocore, per S3 call: its default (3 attempts) gives up inside one short burst of SlowDown.
DEFAULT_S3_MAX_ATTEMPTS = 5
DEFAULT_S3_CONNECT_TIMEOUT_S = 10.0
DEFAULT_S3_READ_TIMEOUT_S = 60.0
# Connections one client keeps (botocore's default is 10): the planner reads with up to
# RunSettings.plan_threads (at most 256) threads through the one shared client; connections are
# opened only as needed, so a high ceiling costs nothing when few threads read.
S3_MAX_POOL_CONNECTIONS = 256
ENV_S3_MAX_ATTEMPTS = "VCT_S3_MAX_ATTEMPTS"
ENV_S3_CONNECT_TIMEOUT = "VCT_S3_CONNECT_TIMEOUT"
ENV_S3_READ_TIMEOUT = "VCT_S3_READ_TIMEOUT"
# Job level, around each operation (see RetryPolicy).
ENV_STORAGE_ATTEMPTS = "VCT_STORAGE_ATTEMPTS"
ENV_RETRY_BASE = "VCT_STORAGE_RETRY_BASE_S"
ENV_RETRY_MAX = "VCT_STORAGE_RETRY_MAX_S"
ENV_RETRY_DEADLINE = "VCT_STORAGE_RETRY_DEADLINE_S"
# sweep_temp_files: a day is far longer than any single write takes.
DEFAULT_TEMP_MAX_AGE_S = 24 * 3600.0
ENV_TEMP_MAX_AGE = "VCT_TEMP_MAX_AGE_S"

# Env vars that change which endpoint/credentials/region/retries a new client gets: part of the
# client cache key.
_CLIENT_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_DEFAULT_PROFILE",
               "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_ACCESS_KEY_ID", "AWS_CONFIG_FILE",
               "AWS_SHARED_CREDENTIALS_FILE", "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS",
               ENV_S3_MAX_ATTEMPTS, ENV_S3_CONNECT_TIMEOUT, ENV_S3_READ_TIMEOUT)
DEFAULT_REGION = "us-east-1"

_NOT_FOUND_CODES = frozenset({"NoSuchKey", "NoSuchBucket", "NoSuchUpload", "404", "NotFound"})
_DENIED_CODES = frozenset({"AccessDenied", "AllAccessDisabled", "AccountProblem", "Forbidden",
                           "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
                           "InvalidToken", "TokenRefreshRequired", "403"})
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
_PERMANENT_ERRNOS = frozenset(getattr(errno, name) for name in (
    "ENOSPC", "EDQUOT", "EROFS", "ENAMETOOLONG", "ELOOP", "EINVAL", "EXDEV", "ENXIO", "ENODEV",
    "EBADF", "EFBIG", "EMLINK", "ENOTSUP", "EOPNOTSUPP", "ENOTDIR", "EISDIR", "EEXIST", "ENOENT",
    "EACCES", "EPERM") if hasattr(errno, name))
# The names _tmp_name (and sync_prefix's temp folders) produce: .<name>.<16 hex>.tmp. Stricter
# than _is_tmp so the sweep can never delete a user's own ".notes.tmp".
_WRITER_TMP_RE = re.compile(r"^\..+\.[0-9a-f]{16}\.tmp$")


class StorageError(UserError):
    """A storage operation failed; the message (one line) names the URI.

    ``transient`` is this class's verdict for :func:`is_transient` (None: decided by the cause).
    """

    transient: bool | None = None
    uri: str | None = None
    status: int | None = None
    code: str | None = None


class _UriError(StorageError):
    """A failure of one object: message ``<what>: <uri> (<detail>)``, with the HTTP status and
    error code as attributes when there were any. Copyable/serialisable (``__reduce__``) even
    though the constructor is not ``(message,)``: Prefect ships task exceptions between threads
    and processes."""

    what = "storage error"

    def __init__(self, uri: str, detail: str = "", *, status: int | None = None,
                 code: str | None = None):
        self.uri, self.detail, self.status, self.code = uri, detail, status, code
        super().__init__(f"{self.what}: {uri}" + (f" ({detail})" if detail else ""))

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.uri, self.detail), self.__dict__)


class StorageNotFound(_UriError):
    """The object at a URI does not exist (a missing file, key or bucket)."""

    what = "not found"
    transient = False


class StorageAccessDenied(_UriError):
    """HTTP 401/403, bad credentials, or a local EACCES/EPERM: retrying will not help."""

    what = "permission denied"
    transient = False


class NotARegularFile(_UriError):
    """The path is a folder, FIFO, device or socket; only regular files are read."""

    what = "not a regular file"
    transient = False


class InputTooLarge(_UriError):
    """More than the allowed bytes: refused from the size when known, else while streaming."""

    what = "input too large"
    transient = False
    limit: int | None = None
    size: int | None = None


class StorageUnavailable(_UriError):
    """A transient failure (throttling, 5xx, connection error, timeout) that outlasted every
    retry. Still transient: a later run, or a caller with its own retries, may succeed."""

    what = "storage unavailable"
    transient = True


class StorageFailed(_UriError):
    """Any other failure of one object: an HTTP 4xx other than 403/404, a full disk, ..."""

    what = "storage failed"
    transient = False


class OutputUnusable(_UriError):
    """An output location nothing can be written to: a file where a folder is needed, a
    read-only folder, a missing bucket. Found before a run starts (:func:`check_writable`)."""

    what = "output location unusable"
    transient = False


class StorageChanged(StorageError):
    """Objects changed while being copied; the copy was discarded. Transient: retry."""

    transient = True


def _too_large(uri: str, limit: int, size: int | None) -> InputTooLarge:
    """The error for more than ``limit`` bytes; ``size`` when the header or stat told us."""
    amount = f"{size} bytes" if size is not None else "more bytes arrived"
    exc = InputTooLarge(uri, f"{amount}, limit {limit} bytes; raise {ENV_MAX_INPUT_BYTES} "
                             "to allow larger inputs")
    exc.limit, exc.size = limit, size
    return exc


# ---------------------------------------------------------------- configuration
def _env_int(name: str, default: int, minimum: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {raw!r}")
    return value


def _env_float(name: str, default: float, minimum: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number, got {raw!r}") from None
    if not minimum <= value < float("inf"):  # also refuses nan
        raise ValueError(f"{name} must be a finite number >= {minimum}, got {raw!r}")
    return value


def max_input_bytes() -> int:
    """The cap :func:`read_input` applies: ``VCT_MAX_INPUT_BYTES`` or :data:`MAX_INPUT_BYTES`."""
    return _env_int(ENV_MAX_INPUT_BYTES, MAX_INPUT_BYTES, minimum=1)


def temp_max_age_s() -> float:
    """The default age of :func:`sweep_temp_files`: ``VCT_TEMP_MAX_AGE_S`` or a day."""
    return _env_float(ENV_TEMP_MAX_AGE, DEFAULT_TEMP_MAX_AGE_S, minimum=0.0)


@dataclass(frozen=True)
class RetryPolicy:
    """How :func:`retrying` retries a transient failure of one storage operation.

    At most ``attempts`` tries; before try n (n >= 2) it sleeps ``d/2 + uniform(0, d/2)`` with
    ``d = min(max_delay_s, base_delay_s * 2**(n-2))`` (exponential, with jitter so that many
    workers throttled together do not come back together, but never ~0 so throttling is
    actually relieved); no try starts after ``deadline_s`` from the first.
    """

    attempts: int = 4
    base_delay_s: float = 0.5
    max_delay_s: float = 8.0
    deadline_s: float = 60.0

    @classmethod
    def from_env(cls) -> RetryPolicy:
        """The policy the ``VCT_STORAGE_*`` variables describe (defaults as above)."""
        d = cls()
        return cls(attempts=_env_int(ENV_STORAGE_ATTEMPTS, d.attempts, minimum=1),
                   base_delay_s=_env_float(ENV_RETRY_BASE, d.base_delay_s, minimum=0.0),
                   max_delay_s=_env_float(ENV_RETRY_MAX, d.max_delay_s, minimum=0.0),
                   deadline_s=_env_float(ENV_RETRY_DEADLINE, d.deadline_s, minimum=0.0))

    def delay(self, failed_tries: int) -> float:
        """Seconds to wait after ``failed_tries`` failures, before the next try."""
        ceiling = min(self.max_delay_s, self.base_delay_s * 2 ** (failed_tries - 1))
        return ceiling / 2 + random.uniform(0.0, ceiling / 2)


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
    (``us-east-1``) because a client without one cannot sign requests. Retries and timeouts are
    set explicitly (not left to ``AWS_MAX_ATTEMPTS``/``AWS_RETRY_MODE`` or botocore's defaults of
    3 attempts and 60 s), from ``VCT_S3_MAX_ATTEMPTS``, ``VCT_S3_CONNECT_TIMEOUT`` and
    ``VCT_S3_READ_TIMEOUT``: botocore's "standard" mode retries throttling, 5xx and connection
    errors with backoff; :func:`retrying` adds the job-level retries on top.
    """
    key = _client_key()
    client = _clients.get(key)
    if client is not None:
        return client
    with _client_lock:
        client = _clients.get(key)
        if client is None:
            session = boto3.session.Session()
            client = session.client("s3", region_name=session.region_name or DEFAULT_REGION,
                                    config=s3_config())
            _clients[key] = client
    return client


def s3_config() -> botocore.config.Config:
    """The botocore retry mode, attempts and timeouts the ``VCT_S3_*`` variables describe."""
    attempts = _env_int(ENV_S3_MAX_ATTEMPTS, DEFAULT_S3_MAX_ATTEMPTS, minimum=1)
    return botocore.config.Config(
        retries={"mode": "standard", "total_max_attempts": attempts},
        connect_timeout=_env_float(ENV_S3_CONNECT_TIMEOUT, DEFAULT_S3_CONNECT_TIMEOUT_S, 0.001),
        read_timeout=_env_float(ENV_S3_READ_TIMEOUT, DEFAULT_S3_READ_TIMEOUT_S, 0.001),
        max_pool_connections=S3_MAX_POOL_CONNECTIONS)


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


def _one_line(exc: BaseException) -> str:
    """``Type: message`` on one line, bounded: error messages end up in one-line reports."""
    text = " ".join(str(exc).split())
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


# What retrying translates into StorageError; anything else (a TypeError from a bug, a
# RuntimeError from a caller's writer) propagates unchanged.
_STORAGE_FAILURES: tuple[type[BaseException], ...] = (
    StorageError, OSError, botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError,
    boto3.exceptions.Boto3Error, s3transfer.exceptions.RetriesExceededError)


def _storage_error(exc: BaseException, uri: str, action: str, tries: int,
                   elapsed: float) -> StorageError:
    """The one-line StorageError for a failure of ``action`` (read, write, ...) on ``uri``."""
    if isinstance(exc, StorageError):
        return exc
    inner = _underlying(exc)
    if not isinstance(exc, (botocore.exceptions.ClientError, OSError,
                            botocore.exceptions.BotoCoreError)) and \
            isinstance(inner, _STORAGE_FAILURES):
        return _storage_error(inner, uri, action, tries, elapsed)  # boto3/s3transfer wrappers
    gave_up = f"; gave up after {tries} tries in {elapsed:.1f} s" if tries > 1 else ""
    transient = is_transient(exc)
    if isinstance(exc, botocore.exceptions.ClientError):
        code, status = _error_code(exc), _http_status(exc)
        http = " ".join(p for p in (f"HTTP {status}" if status else "",
                                    "" if code == str(status) else code) if p)
        info = {"status": status or None, "code": code or None}
        if _is_not_found(exc):
            return StorageNotFound(uri, http, **info)
        if status in (401, 403) or code in _DENIED_CODES:
            return StorageAccessDenied(uri, f"{action}: {http}", **info)
        if transient:
            return StorageUnavailable(uri, f"{action}: {http}{gave_up}", **info)
        message = exc.response.get("Error", {}).get("Message") or ""
        return StorageFailed(uri, f"{action}: {http}" + (f": {message}" if message else ""),
                             **info)
    if isinstance(exc, FileNotFoundError):
        return StorageNotFound(uri)
    if isinstance(exc, IsADirectoryError):
        return NotARegularFile(uri, "directory")
    if isinstance(exc, PermissionError | botocore.exceptions.NoCredentialsError):
        return StorageAccessDenied(uri, f"{action}: {_one_line(exc)}")
    if transient:
        return StorageUnavailable(uri, f"{action}: {_one_line(exc)}{gave_up}")
    return StorageFailed(uri, f"{action}: {_one_line(exc)}")


def retrying(fn: Callable[[], T], *, uri: str, action: str,
             policy: RetryPolicy | None = None) -> T:
    """Call ``fn`` (one whole storage operation on ``uri``), retrying transient failures.

    Why a second level above botocore's own retries: botocore retries one HTTP request a fixed
    number of times within a few seconds, so a longer burst of throttling fails the job, and it
    does not retry at all a failure while a response body streams in, or local I/O errors. Here
    the whole operation is repeated (a GET and the read of its body; a listing from the first
    page), bounded by the policy's attempts and deadline (``RetryPolicy.from_env()`` unless
    given). Permanent failures (:func:`is_transient` false: 403, 404, a full disk, too large)
    are raised at once. Every storage failure leaves as a one-line :class:`StorageError` (the
    original as ``__cause__``); other exceptions (bugs) propagate unchanged and untried.
    """
    policy = policy or RetryPolicy.from_env()
    start = time.monotonic()
    tries = 0
    while True:
        tries += 1
        try:
            return fn()
        except _STORAGE_FAILURES as exc:
            elapsed = time.monotonic() - start
            if is_transient(exc) and tries < policy.attempts:
                pause = policy.delay(tries)
                if elapsed + pause <= policy.deadline_s:
                    log.info("%s %s failed (%s); try %d of %d in %.2f s", action, uri,
                             _one_line(exc), tries + 1, policy.attempts, pause)
                    time.sleep(pause)
                    continue
            error = _storage_error(exc, uri, action, tries, elapsed)
            if error is exc:
                raise
            raise error from exc


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
    checkpoint("storage.rename")
    try:
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(target.parent)


# ---------------------------------------------------------------- read / write
def read_bytes(uri: str, max_bytes: int | None = None) -> bytes:
    """The whole object, read only from a regular file or an S3 object.

    ``max_bytes`` caps what may arrive (None: no cap, for the pipeline's own objects: cache
    entries, sidecars, its own manifests; use :func:`read_input` for what a user named). The
    cap is checked against the size known up front (``st_size``, ``ContentLength``) and again
    while reading, which stops at ``max_bytes + 1`` bytes: a file that grows, a /proc file that
    reports size 0 or a response without a length can never deliver more.

    Locally a folder, FIFO, device (``/dev/zero``) or socket is refused with
    :class:`NotARegularFile` before anything is read: the path is stat'ed first so a device is
    never even opened, then opened with ``O_NONBLOCK`` (a FIFO swapped in meanwhile cannot block
    the open) and checked again with ``fstat`` on what was actually opened.

    Raises (all :class:`StorageError`, one line naming the URI): StorageNotFound,
    StorageAccessDenied, NotARegularFile, InputTooLarge, StorageUnavailable (transient errors
    that outlasted :func:`retrying`), StorageFailed.
    """
    if max_bytes is not None and max_bytes < 0:
        raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
    opener = _opened_stream(uri, max_bytes)
    return retrying(lambda: _read_all(uri, opener, max_bytes), uri=uri, action="read")


def read_input(uri: str, max_bytes: int | None = None) -> bytes:
    """:func:`read_bytes` for bytes a user pointed us at (manifest rows, manifests): capped at
    ``max_bytes`` or, by default, :func:`max_input_bytes` (``VCT_MAX_INPUT_BYTES``, 64 MiB), so
    one hostile or mistaken row fails alone instead of exhausting a worker's memory."""
    return read_bytes(uri, max_input_bytes() if max_bytes is None else max_bytes)


def _path_mode(path: Path) -> int:
    """``st_mode`` of what path points to (a seam for tests that swap a file after the stat)."""
    return os.stat(path).st_mode


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "FIFO"),
                       (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
                       (stat.S_ISSOCK, "socket")):
        if test(mode):
            return name
    return f"file type {stat.S_IFMT(mode):o}"


def _require_regular(uri: str, mode: int) -> None:
    if not stat.S_ISREG(mode):
        raise NotARegularFile(uri, _file_kind(mode))


_OPEN_FLAGS = (os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
               | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0))


@contextlib.contextmanager
def _open_local(uri: str, path: Path, max_bytes: int | None) -> Iterator[BinaryIO]:
    """The opened regular file (refused before opening if it is not one, checked again on what
    was opened), after its ``st_size`` passed the cap."""
    _require_regular(uri, _path_mode(path))
    fd = os.open(path, _OPEN_FLAGS)
    try:
        st = os.fstat(fd)
        _require_regular(uri, st.st_mode)
        if max_bytes is not None and st.st_size > max_bytes:
            raise _too_large(uri, max_bytes, st.st_size)
        os.set_blocking(fd, True)
        fh = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with fh:
        yield fh


@contextlib.contextmanager
def _open_s3(uri: str, bucket: str, key: str, max_bytes: int | None) -> Iterator[Any]:
    """The object's body stream, after its ``ContentLength`` passed the cap (before reading
    any of the body); closed on the way out."""
    response = s3_client().get_object(Bucket=bucket, Key=key)
    body = response["Body"]
    try:
        size = response.get("ContentLength")
        if max_bytes is not None and size is not None and size > max_bytes:
            raise _too_large(uri, max_bytes, size)
        yield body
    finally:
        body.close()


def _pump(uri: str, read: Callable[[int], bytes], max_bytes: int | None,
          sink: Callable[[bytes], None]) -> int:
    """Feed ``read``'s chunks to ``sink`` until EOF; returns the byte count. With a cap, never
    asks for more than ``max_bytes + 1`` bytes in all (one byte over tells "over" from
    "exactly") and raises InputTooLarge as soon as the cap is passed, whatever the size the
    file or response claimed."""
    received = 0
    while True:
        want = _READ_CHUNK if max_bytes is None else min(_READ_CHUNK, max_bytes + 1 - received)
        chunk = read(want)
        if not chunk:
            return received
        received += len(chunk)
        if max_bytes is not None and received > max_bytes:
            raise _too_large(uri, max_bytes, None)
        sink(chunk)


def _opened_stream(uri: str, max_bytes: int | None) -> Callable[[], Any]:
    """What opens ``uri`` for one try of a read (a context manager giving a ``read(n)``)."""
    if is_s3(uri):
        bucket, key = _require_key(uri)
        return lambda: _open_s3(uri, bucket, key, max_bytes)
    path = _local_path(uri)
    return lambda: _open_local(uri, path, max_bytes)


def _read_all(uri: str, opener: Callable[[], Any], max_bytes: int | None) -> bytes:
    chunks: list[bytes] = []
    with opener() as stream:
        _pump(uri, stream.read, max_bytes, chunks.append)
    return b"".join(chunks)


def digest_input(uri: str, max_bytes: int | None = None,
                 head_bytes: int = HEAD_BYTES) -> tuple[str, bytes, int]:
    """``(sha256 hex, head, size)`` of an input, streamed: the bytes pass through hashlib in
    chunks and only the first ``head_bytes`` (the whole object if smaller) are kept, for a
    header probe. Same rules as :func:`read_input`: capped at ``max_bytes`` or
    :func:`max_input_bytes`, regular files and objects only, the same errors, and the whole
    read retried (from the first byte, with a fresh hash) on transient failures.

    ``len(head) == size`` says the head is the whole object.
    """
    cap = max_input_bytes() if max_bytes is None else max_bytes
    if cap < 0:
        raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
    if head_bytes < 0:
        raise ValueError(f"head_bytes must be >= 0, got {head_bytes}")
    opener = _opened_stream(uri, cap)

    def once() -> tuple[str, bytes, int]:
        h = hashlib.sha256()
        head = bytearray()

        def sink(chunk: bytes) -> None:
            h.update(chunk)
            if len(head) < head_bytes:
                head.extend(chunk[:head_bytes - len(head)])
        with opener() as stream:
            size = _pump(uri, stream.read, cap, sink)
        return h.hexdigest(), bytes(head), size
    return retrying(once, uri=uri, action="read")


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


def _write_all(fh: BinaryIO, data: bytes) -> None:
    """Write in chunks: very large buffers then never need a second in-kernel copy at once."""
    view = memoryview(data)
    for start in range(0, len(view), _COPY_CHUNK):
        fh.write(view[start:start + _COPY_CHUNK])




# ---------------------------------------------------------------- metadata
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


def _s3_objects(prefix_uri: str) -> tuple[str, str, list[dict[str, Any]]]:
    """(bucket, folder prefix, objects) under an S3 "folder"; the prefix gets a trailing '/'
    so ``s3://b/model`` never picks up ``s3://b/model-old/...`` (same as a local folder).
    A failure on any page restarts the listing (retrying): a listing is never half a listing."""
    bucket, prefix = _split_s3(prefix_uri)
    if prefix and not prefix.endswith("/"):
        prefix += "/"

    def listing() -> list[dict[str, Any]]:
        objects: list[dict[str, Any]] = []
        pages = s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket,
                                                                     Prefix=prefix)
        for page in pages:
            objects.extend(o for o in page.get("Contents", []) if not o["Key"].endswith("/"))
        return objects
    objects = retrying(listing, uri=prefix_uri, action="list")
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




# ---------------------------------------------------------------- compare-and-swap
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
                return _own_lost_put(bucket, key, data) if retried else None
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


def _own_lost_put(bucket: str, key: str, data: bytes) -> str | None:
    """After a retried conditional PUT got 412: the version if the object is exactly ours."""
    try:
        response = s3_client().get_object(Bucket=bucket, Key=key)
    except botocore.exceptions.ClientError as exc:
        if _is_not_found(exc):
            return None
        raise
    with contextlib.closing(response["Body"]) as body:
        return _etag(response["ETag"]) if body.read(len(data) + 1) == data else None


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


def list_objects(prefix_uri: str, suffixes: tuple[str, ...] = ()) -> list[ObjectInfo]:
    """Every object under a folder/prefix (recursively, sorted by URI) with its ETag, in one
    listing; only names ending with one of ``suffixes`` (ignoring case) when given. Locally the
    ETag is computed by reading each file, so keep this to small prefixes (an incoming folder of
    manifests and markers) and pass ``suffixes``."""
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
            data = read_bytes(uri)
            modified = path.stat().st_mtime
        except (StorageNotFound, FileNotFoundError, NotARegularFile):
            continue  # removed (or swapped for something else) since the listing
        out.append(ObjectInfo(uri, version_of(data), len(data), modified))
    return out


# ---------------------------------------------------------------- stale temp files
def _is_writer_tmp(name: str) -> bool:
    """A name our writers give temp files and folders (``_tmp_name``, sync_prefix)."""
    return bool(_WRITER_TMP_RE.match(name))


def sweep_temp_files(prefix_uri: str, older_than_s: float | None = None, *,
                     now: float | None = None) -> int:
    """Remove what killed writers left under a folder or S3 prefix; returns how many.

    Locally: files named like :func:`_tmp_name`'s ``.name.<16 hex>.tmp`` (atomic writes, claims)
    and folders named like sync_prefix's ``.<digest>.<16 hex>.tmp``, not modified for more than
    ``older_than_s`` seconds (a folder counts as modified when anything inside it was). A writer
    still running keeps touching its temp file, so an age far longer than any write
    (``VCT_TEMP_MAX_AGE_S``, default a day) only takes the dead ones. Other files, symlinks and
    anything inside a non-temp name are never touched.

    On S3 our writers leave no temp objects (a PUT is atomic); what a killed multipart upload
    leaves is an incomplete upload (invisible, but billed): those initiated before the cutoff
    are aborted, and objects with a temp name (a local folder copied up) are deleted. ``now``
    (seconds since the epoch) replaces the clock, for tests.
    """
    age = temp_max_age_s() if older_than_s is None else float(older_than_s)
    if not age >= 0:
        raise ValueError(f"older_than_s must be >= 0, got {older_than_s}")
    cutoff = (time.time() if now is None else now) - age
    if is_s3(prefix_uri):
        return _sweep_s3(prefix_uri, cutoff)
    return _sweep_local(_local_path(prefix_uri), cutoff)


def _newest_mtime(folder: Path) -> float:
    newest = os.lstat(folder).st_mtime
    for sub, _dirs, files in os.walk(folder):
        for name in [*_dirs, *files]:
            with contextlib.suppress(FileNotFoundError):
                newest = max(newest, os.lstat(os.path.join(sub, name)).st_mtime)
    return newest


def _sweep_local(root: Path, cutoff: float) -> int:
    if not root.is_dir():
        return 0
    removed = 0
    for folder, dirs, files in os.walk(root):
        for name in [d for d in dirs if _is_writer_tmp(d)]:
            dirs.remove(name)  # swept as a whole or left alone, never entered
            path = Path(folder, name)
            try:
                if path.is_symlink() or _newest_mtime(path) >= cutoff:
                    continue
            except FileNotFoundError:
                continue
            shutil.rmtree(path, ignore_errors=True)
            removed += not path.exists()
        for name in files:
            if not _is_writer_tmp(name):
                continue
            path = Path(folder, name)
            try:
                st = os.lstat(path)
                if stat.S_ISREG(st.st_mode) and st.st_mtime < cutoff:
                    os.unlink(path)
                    removed += 1
            except FileNotFoundError:
                continue  # its writer finished (renamed it) or another sweep got it
    if removed:
        log.info("removed %d stale temp file(s) under %s", removed, root)
    return removed


def _sweep_s3(prefix_uri: str, cutoff: float) -> int:
    bucket, prefix, objects = _s3_objects(prefix_uri)
    removed = 0
    for obj in objects:
        if _is_writer_tmp(posixpath.basename(obj["Key"])) and \
                obj["LastModified"].timestamp() < cutoff:
            delete(_s3_uri(bucket, obj["Key"]))
            removed += 1

    def uploads() -> list[dict[str, Any]]:
        pages = s3_client().get_paginator("list_multipart_uploads").paginate(Bucket=bucket,
                                                                            Prefix=prefix)
        return [u for page in pages for u in page.get("Uploads", [])]
    for upload in retrying(uploads, uri=prefix_uri, action="list uploads"):
        if upload["Initiated"].timestamp() >= cutoff:
            continue
        uri = _s3_uri(bucket, upload["Key"])
        try:
            retrying(lambda u=upload: s3_client().abort_multipart_upload(
                Bucket=bucket, Key=u["Key"], UploadId=u["UploadId"]), uri=uri, action="abort")
        except StorageNotFound:
            continue  # completed or aborted meanwhile
        removed += 1
    if removed:
        log.info("removed %d stale temp object(s)/upload(s) under %s", removed, prefix_uri)
    return removed


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
    for obj in objects:
        uri = _s3_uri(bucket, obj["Key"])
        target = dest / _safe_relative(obj["Key"], prefix, uri)
        target.parent.mkdir(parents=True, exist_ok=True)
        retrying(lambda key=obj["Key"], target=target: s3_client().download_file(
            bucket, key, str(target), Config=_TRANSFER_CONFIG), uri=uri, action="download")


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
    if isinstance(exc, StorageError):
        return exc.transient
    if isinstance(exc, botocore.exceptions.ClientError):
        code, status = _error_code(exc), _http_status(exc)
        if code in _DENIED_CODES or _is_not_found(exc):
            return False
        return code in _TRANSIENT_CODES or (status >= 500 and status != 501) or status == 429
    if isinstance(exc, (botocore.exceptions.ConnectionError,
                        botocore.exceptions.HTTPClientError,
                        botocore.exceptions.IncompleteReadError)):
        return True
    if isinstance(exc, (TimeoutError, ConnectionError)):
        return True
    if isinstance(exc, _PERMANENT_OSERRORS):
        return False
    if isinstance(exc, OSError):
        return exc.errno not in _PERMANENT_ERRNOS  # EIO, EAGAIN, ESTALE, ...: worth a retry
    return None
