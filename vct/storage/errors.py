"""The StorageError hierarchy and the classification of what boto3, botocore, s3transfer and
the OS raise: which StorageError a failure becomes (:func:`_storage_error`) and whether
retrying could help (:func:`is_transient`)."""

from __future__ import annotations

import errno
from typing import Any

import boto3.exceptions
import botocore.exceptions
import s3transfer.exceptions

from vct.errors import UserError
from vct.storage.env import ENV_MAX_INPUT_BYTES

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


# ---------------------------------------------------------------- failures as StorageErrors
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
