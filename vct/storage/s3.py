"""The S3 client: cached per process and client environment, its botocore configuration
(retries, timeouts, connection pool), the transfer manager's settings, and the listing of a
prefix."""

from __future__ import annotations

import os
import threading
from typing import Any

import boto3
import botocore.config
from boto3.s3.transfer import TransferConfig

from vct.storage.env import (
    DEFAULT_S3_CONNECT_TIMEOUT_S,
    DEFAULT_S3_MAX_ATTEMPTS,
    DEFAULT_S3_READ_TIMEOUT_S,
    ENV_S3_CONNECT_TIMEOUT,
    ENV_S3_MAX_ATTEMPTS,
    ENV_S3_READ_TIMEOUT,
    _env_float,
    _env_int,
)
from vct.storage.retry import retrying
from vct.storage.uris import _split_s3

# Objects up to this size go up in one PUT (one request, trivially atomic); larger ones use the
# transfer manager's multipart upload, which S3 also only publishes once every part is in.
MULTIPART_THRESHOLD = 64 * 1024 * 1024
_TRANSFER_CONFIG = TransferConfig(multipart_threshold=MULTIPART_THRESHOLD,
                                  multipart_chunksize=MULTIPART_THRESHOLD)
# Connections one client keeps (botocore's default is 10): the planner reads with up to
# RunSettings.plan_threads (at most 256) threads through the one shared client; connections are
# opened only as needed, so a high ceiling costs nothing when few threads read.
S3_MAX_POOL_CONNECTIONS = 256

# Env vars that change which endpoint/credentials/region/retries a new client gets: part of the
# client cache key.
_CLIENT_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_DEFAULT_PROFILE",
               "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_ACCESS_KEY_ID", "AWS_CONFIG_FILE",
               "AWS_SHARED_CREDENTIALS_FILE", "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS",
               ENV_S3_MAX_ATTEMPTS, ENV_S3_CONNECT_TIMEOUT, ENV_S3_READ_TIMEOUT)
DEFAULT_REGION = "us-east-1"

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
    """The botocore retry mode, attempts and timeouts the ``VCT_S3_*`` variables describe, and
    SigV4 signing."""
    attempts = _env_int(ENV_S3_MAX_ATTEMPTS, DEFAULT_S3_MAX_ATTEMPTS, minimum=1)
    # SigV4 explicitly: requests use it anyway, but presigned URLs (vct.storage.links) would
    # otherwise get the legacy query signature in us-east-1.
    return botocore.config.Config(
        signature_version="s3v4",
        retries={"mode": "standard", "total_max_attempts": attempts},
        connect_timeout=_env_float(ENV_S3_CONNECT_TIMEOUT, DEFAULT_S3_CONNECT_TIMEOUT_S, 0.001),
        read_timeout=_env_float(ENV_S3_READ_TIMEOUT, DEFAULT_S3_READ_TIMEOUT_S, 0.001),
        max_pool_connections=S3_MAX_POOL_CONNECTIONS)


def reset_clients() -> None:
    """Forget cached clients (tests that swap endpoints; after changing AWS config files)."""
    with _client_lock:
        _clients.clear()


# ---------------------------------------------------------------- listing a prefix
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
