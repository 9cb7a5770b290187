"""A real S3 endpoint for tests: moto's threaded server on loopback, spoken to over HTTP.

Not ``mock_aws``: going through a socket exercises the same client configuration (endpoint from
``AWS_ENDPOINT_URL``, retries, transfer manager) as production. Imported by tests/conftest.py.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import boto3
import pytest
from moto.server import ThreadedMotoServer

from vct import storage

# Values the fixture sets; None removes a variable that would point the client elsewhere.
_ENV: dict[str, str | None] = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": None,
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_ENDPOINT_URL_S3": None,
    "AWS_PROFILE": None,
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}


@contextmanager
def moto_s3() -> Iterator[str]:
    """Start moto on 127.0.0.1 (random port), point AWS env vars at it; yield the endpoint
    (restoring the environment after). The tests' fixture and the planning benchmark."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {name: os.environ.get(name) for name in [*_ENV, "AWS_ENDPOINT_URL"]}
    for name, value in {**_ENV, "AWS_ENDPOINT_URL": endpoint}.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    storage.reset_clients()
    try:
        yield endpoint
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        storage.reset_clients()
        server.stop()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    with moto_s3() as endpoint:
        yield endpoint


@pytest.fixture
def s3_bucket(s3_server: str) -> str:
    """A fresh, uniquely named bucket; returns ``s3://name``."""
    name = f"test-{uuid.uuid4().hex[:20]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=name)
    return f"s3://{name}"
