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

The package, one job per module (imports point down this list only, so there are no cycles):

- ``env``: every ``VCT_*`` variable above, its default, and parsing (:func:`max_input_bytes`,
  :func:`temp_max_age_s`).
- ``errors``: the :class:`StorageError` hierarchy; which one a boto3/botocore/s3transfer/OS
  failure becomes, and :func:`is_transient`.
- ``retry``: :class:`RetryPolicy` and :func:`retrying` (the job-level retries).
- ``uris``: :func:`is_s3`, :func:`join`, :func:`resolve`; local paths, bucket/key splitting.
- ``s3``: the cached client (:func:`s3_client`, :func:`s3_config`, :func:`reset_clients`), the
  transfer manager's settings (:data:`MULTIPART_THRESHOLD`), the listing of a prefix.
- ``local``: local atomic writes (temp names, exclusive creates, fsync, ``os.replace``).
- ``reads``: bounded reads: :func:`read_bytes`, :func:`read_input`, :func:`digest_input`.
- ``objects``: :func:`write_bytes`, :func:`exists`, :func:`delete`, :func:`list_uris`,
  :func:`check_writable`.
- ``cas``: compare-and-swap: :func:`version_of`, :func:`read_versioned`,
  :func:`conditional_put`, :func:`create_if_absent`, :func:`delete_if_match`,
  :func:`list_objects` (:class:`ObjectInfo`).
- ``sweep``: :func:`sweep_temp_files` (what killed writers left).
- ``sync``: :func:`sync_prefix` (an S3 folder mirrored into a local cache), :func:`sync_object`
  (one object, e.g. a single-file checkpoint).
- ``links``: :func:`share_link` (a presigned URL on S3, a ``file://`` URI locally).

Callers use the package (``from vct import storage; storage.read_bytes(...)``); the names below
are re-exported from the modules. A module uses the names of another as imported into its own
namespace, so a test that patches an internal patches the module that looks it up (e.g.
``storage.objects.MULTIPART_THRESHOLD``, ``storage.reads._path_mode``), not the package.
"""

from vct.storage.cas import (
    ObjectInfo,
    conditional_put,
    create_if_absent,
    delete_if_match,
    list_objects,
    read_versioned,
    version_of,
)
from vct.storage.env import (
    DEFAULT_S3_CONNECT_TIMEOUT_S,
    DEFAULT_S3_MAX_ATTEMPTS,
    DEFAULT_S3_READ_TIMEOUT_S,
    DEFAULT_TEMP_MAX_AGE_S,
    ENV_MAX_INPUT_BYTES,
    ENV_RETRY_BASE,
    ENV_RETRY_DEADLINE,
    ENV_RETRY_MAX,
    ENV_S3_CONNECT_TIMEOUT,
    ENV_S3_MAX_ATTEMPTS,
    ENV_S3_READ_TIMEOUT,
    ENV_STORAGE_ATTEMPTS,
    ENV_TEMP_MAX_AGE,
    MAX_INPUT_BYTES,
    max_input_bytes,
    temp_max_age_s,
)
from vct.storage.errors import (
    InputTooLarge,
    NotARegularFile,
    OutputUnusable,
    StorageAccessDenied,
    StorageChanged,
    StorageError,
    StorageFailed,
    StorageNotFound,
    StorageUnavailable,
    is_transient,
)
from vct.storage.links import MAX_LINK_EXPIRY_S, share_link
from vct.storage.local import TMP_SUFFIX, _tmp_name
from vct.storage.objects import check_writable, delete, exists, list_uris, write_bytes
from vct.storage.reads import HEAD_BYTES, digest_input, read_bytes, read_input
from vct.storage.retry import RetryPolicy, retrying
from vct.storage.s3 import (
    DEFAULT_REGION,
    MULTIPART_THRESHOLD,
    S3_MAX_POOL_CONNECTIONS,
    reset_clients,
    s3_client,
    s3_config,
)
from vct.storage.sweep import sweep_temp_files
from vct.storage.sync import COMPLETE_MARKER, sync_object, sync_prefix
from vct.storage.uris import FILE_SCHEME, S3_SCHEME, is_s3, join, resolve

__all__ = [
    # errors
    "StorageError", "StorageNotFound", "StorageAccessDenied", "NotARegularFile",
    "InputTooLarge", "StorageUnavailable", "StorageFailed", "OutputUnusable", "StorageChanged",
    "is_transient",
    # environment
    "MAX_INPUT_BYTES", "ENV_MAX_INPUT_BYTES", "DEFAULT_S3_MAX_ATTEMPTS",
    "DEFAULT_S3_CONNECT_TIMEOUT_S", "DEFAULT_S3_READ_TIMEOUT_S", "ENV_S3_MAX_ATTEMPTS",
    "ENV_S3_CONNECT_TIMEOUT", "ENV_S3_READ_TIMEOUT", "ENV_STORAGE_ATTEMPTS", "ENV_RETRY_BASE",
    "ENV_RETRY_MAX", "ENV_RETRY_DEADLINE", "DEFAULT_TEMP_MAX_AGE_S", "ENV_TEMP_MAX_AGE",
    "max_input_bytes", "temp_max_age_s",
    # retries
    "RetryPolicy", "retrying",
    # URIs
    "S3_SCHEME", "FILE_SCHEME", "is_s3", "join", "resolve",
    # the S3 client
    "MULTIPART_THRESHOLD", "S3_MAX_POOL_CONNECTIONS", "DEFAULT_REGION", "s3_client",
    "s3_config", "reset_clients",
    # local writes (_tmp_name: the temp name a writer uses, for the sweep's tests)
    "TMP_SUFFIX", "_tmp_name",
    # reads
    "HEAD_BYTES", "read_bytes", "read_input", "digest_input",
    # objects
    "write_bytes", "exists", "delete", "list_uris", "check_writable",
    # compare-and-swap
    "version_of", "read_versioned", "conditional_put", "create_if_absent", "delete_if_match",
    "ObjectInfo", "list_objects",
    # stale temp files, prefix sync
    "sweep_temp_files", "COMPLETE_MARKER", "sync_object", "sync_prefix",
    # links a person can open
    "MAX_LINK_EXPIRY_S", "share_link",
]
