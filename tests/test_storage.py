"""vct.storage on local disk and on S3 (moto server over loopback HTTP)."""

from __future__ import annotations

import copy
import errno
import io
import os
import socket
import stat
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import boto3
import botocore.exceptions
import pytest

from vct import storage

if TYPE_CHECKING:
    from tests.fault_proxy import FaultProxy

pytest_plugins = ("tests.fault_proxy",)  # the fault_proxy fixture (imported by pytest itself)


def _tmp_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


def _client_error(code: str, status: int) -> botocore.exceptions.ClientError:
    return botocore.exceptions.ClientError(
        {"Error": {"Code": code, "Message": code},
         "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")


def _count_calls(operation: str) -> list[str]:
    """Record every call of one S3 operation made through the cached client."""
    calls: list[str] = []
    storage.s3_client().meta.events.register(
        f"before-call.s3.{operation}", lambda **kw: calls.append(operation))
    return calls


@pytest.fixture(autouse=True)
def _fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Job-level retries keep their default count but wait about a millisecond."""
    monkeypatch.setenv(storage.ENV_RETRY_BASE, "0.001")
    monkeypatch.setenv(storage.ENV_RETRY_MAX, "0.002")


# ---------------------------------------------------------------- local
def test_local_round_trip_creates_parents_and_leaves_no_temp(tmp_path: Path) -> None:
    uri = str(tmp_path / "a" / "b" / "x.bin")
    storage.write_bytes(uri, b"hello")
    assert storage.read_bytes(uri) == b"hello"
    storage.write_bytes(uri, b"second")
    assert storage.read_bytes("file://" + uri) == b"second"
    assert _tmp_files(tmp_path) == []


def test_local_failed_write_leaves_no_target_and_no_temp(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "out" / "result.bin"
    seen_during_write: list[bool] = []

    def failing_fsync(fd: int) -> None:
        # The data is in the temp file now; a reader must still not see the target.
        seen_during_write.append(target.exists())
        assert len(_tmp_files(tmp_path)) == 1
        raise OSError(errno.EIO, "disk on fire")

    monkeypatch.setattr(storage.local.os, "fsync", failing_fsync)
    with pytest.raises(storage.StorageUnavailable, match="disk on fire.*gave up after 4 tries"):
        storage.write_bytes(str(target), b"x" * 1000)
    assert seen_during_write == [False] * 4  # EIO is transient: retried, each from a new temp
    assert not target.exists()
    assert _tmp_files(tmp_path) == []


def test_local_full_disk_is_permanent_and_not_retried(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []

    def full(fd: int) -> None:
        calls.append(fd)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(storage.local.os, "fsync", full)
    target = tmp_path / "result.bin"
    with pytest.raises(storage.StorageFailed, match=r"storage failed: .*result\.bin \(write: .*"
                                                    r"No space left"):
        storage.write_bytes(str(target), b"x")
    assert len(calls) == 1 and _tmp_files(tmp_path) == []


def test_local_failed_overwrite_keeps_old_content(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "result.bin"
    storage.write_bytes(str(target), b"old")

    def failing_write_all(fh, data: bytes) -> None:
        fh.write(data[:2])  # part of the new content reached the disk, then the writer died
        assert target.read_bytes() == b"old"
        raise RuntimeError("interrupted")

    monkeypatch.setattr(storage.objects, "_write_all", failing_write_all)
    with pytest.raises(RuntimeError, match="interrupted"):
        storage.write_bytes(str(target), b"new content")
    assert target.read_bytes() == b"old"
    assert _tmp_files(tmp_path) == []


def test_local_not_found_names_uri(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.png")
    with pytest.raises(storage.StorageNotFound, match="nope.png"):
        storage.read_bytes(missing)
    assert isinstance(storage.StorageNotFound("x"), storage.StorageError)


def test_local_list_exists_delete(tmp_path: Path) -> None:
    root = str(tmp_path / "root")
    for rel in ("b.txt", "a/1.txt", "a/2/3.txt"):
        storage.write_bytes(storage.join(root, rel), rel.encode())
    (tmp_path / "root" / ".b.txt.deadbeef.tmp").write_bytes(b"partial")  # an in-flight write
    assert storage.list_uris(root) == sorted(
        os.path.join(root, rel) for rel in ("a/1.txt", "a/2/3.txt", "b.txt"))
    assert storage.list_uris(str(tmp_path / "missing")) == []
    assert storage.exists(storage.join(root, "b.txt"))
    assert not storage.exists(root)  # a folder is not an object
    storage.delete(storage.join(root, "b.txt"))
    storage.delete(storage.join(root, "b.txt"))  # idempotent
    assert not storage.exists(storage.join(root, "b.txt"))


def test_local_create_if_absent_is_exclusive(tmp_path: Path) -> None:
    uri = str(tmp_path / "locks" / "claim")
    assert storage.create_if_absent(uri, b"first") is True
    assert storage.create_if_absent(uri, b"second") is False
    assert storage.read_bytes(uri) == b"first"
    assert _tmp_files(tmp_path) == []


def test_sync_prefix_local_returns_path_unchanged(tmp_path: Path) -> None:
    assert storage.sync_prefix(str(tmp_path), tmp_path / "cache") == tmp_path


# ---------------------------------------------------------------- URIs
def test_join_and_is_s3() -> None:
    assert storage.join("s3://b", "x", "y.png") == "s3://b/x/y.png"
    assert storage.join("s3://b/pre/", "/x/", "y.png") == "s3://b/pre/x/y.png"
    assert storage.join("/data", "x", "y.png") == "/data/x/y.png"
    assert storage.join("file:///data", "y.png") == "file:///data/y.png"
    assert storage.is_s3("s3://b/k") and not storage.is_s3("/s3/b") and not storage.is_s3("b")


def test_resolve_relative_to_manifest(tmp_path: Path) -> None:
    manifest = str(tmp_path / "runs" / "m.csv")
    assert storage.resolve("img/a.png", manifest) == str(tmp_path / "runs" / "img" / "a.png")
    assert storage.resolve("../b.png", manifest) == str(tmp_path / "b.png")
    assert storage.resolve("/abs/c.png", manifest) == "/abs/c.png"
    assert storage.resolve("s3://o/k.png", manifest) == "s3://o/k.png"
    assert storage.resolve("img/a.png", "s3://bkt/runs/m.csv") == "s3://bkt/runs/img/a.png"
    assert storage.resolve("../x/a.png", "s3://bkt/runs/m.csv") == "s3://bkt/x/a.png"
    assert storage.resolve("a.png", "s3://bkt/m.csv") == "s3://bkt/a.png"
    assert storage.resolve("/abs/c.png", "s3://bkt/m.csv") == "/abs/c.png"
    assert storage.resolve("s3://o/k.png", "s3://bkt/m.csv") == "s3://o/k.png"
    assert storage.resolve("a.png", "s3://bkt/folder/") == "s3://bkt/folder/a.png"


def test_is_transient() -> None:
    assert storage.is_transient(_client_error("SlowDown", 503))
    assert storage.is_transient(_client_error("InternalError", 500))
    assert storage.is_transient(_client_error("Whatever", 502))
    assert storage.is_transient(_client_error("RequestTimeout", 400))
    assert not storage.is_transient(_client_error("AccessDenied", 403))
    assert not storage.is_transient(_client_error("NoSuchKey", 404))
    assert storage.is_transient(botocore.exceptions.EndpointConnectionError(endpoint_url="x"))
    assert storage.is_transient(botocore.exceptions.ConnectionClosedError(endpoint_url="x"))
    assert storage.is_transient(botocore.exceptions.ReadTimeoutError(endpoint_url="x"))
    assert storage.is_transient(OSError("EIO"))
    assert storage.is_transient(TimeoutError())
    assert not storage.is_transient(FileNotFoundError())
    assert not storage.is_transient(PermissionError())
    assert not storage.is_transient(storage.StorageNotFound("s3://b/k"))
    assert not storage.is_transient(ValueError("bug"))
    assert not storage.is_transient(_client_error("AccessDenied", 403))
    assert not storage.is_transient(_client_error("NotImplemented", 501))
    assert storage.is_transient(_client_error("TooManyRequests", 429))
    assert not storage.is_transient(OSError(errno.ENOSPC, "full"))
    assert storage.is_transient(OSError(errno.EIO, "io"))
    assert storage.is_transient(storage.StorageUnavailable("s3://b/k", "HTTP 503 SlowDown"))
    for permanent in (storage.StorageAccessDenied, storage.InputTooLarge,
                      storage.NotARegularFile, storage.StorageFailed):
        assert not storage.is_transient(permanent("s3://b/k"))
    wrapped = storage.StorageError("wrapped")
    wrapped.__cause__ = _client_error("SlowDown", 503)
    assert storage.is_transient(wrapped)


# ---------------------------------------------------------------- S3
def test_s3_round_trip_and_not_found(s3_bucket: str) -> None:
    uri = storage.join(s3_bucket, "dir", "x.bin")
    storage.write_bytes(uri, b"hello", content_type="application/octet-stream")
    assert storage.read_bytes(uri) == b"hello"
    assert storage.exists(uri)
    assert not storage.exists(storage.join(s3_bucket, "dir"))
    with pytest.raises(storage.StorageNotFound, match="missing.bin"):
        storage.read_bytes(storage.join(s3_bucket, "missing.bin"))
    with pytest.raises(storage.StorageNotFound):
        storage.read_bytes("s3://no-such-bucket-xyz/k")
    storage.delete(uri)
    storage.delete(uri)
    assert not storage.exists(uri)


def test_s3_small_write_is_one_put(s3_bucket: str) -> None:
    puts = _count_calls("PutObject")
    multipart = _count_calls("CreateMultipartUpload")
    storage.write_bytes(storage.join(s3_bucket, "one.bin"), b"x" * 1024)
    assert puts == ["PutObject"] and multipart == []


def test_s3_list_is_folder_scoped_and_sorted(s3_bucket: str) -> None:
    for rel in ("m/b.txt", "m/a/1.txt", "m-old/z.txt", "top.txt"):
        storage.write_bytes(storage.join(s3_bucket, rel), b"1")
    assert storage.list_uris(storage.join(s3_bucket, "m")) == [
        f"{s3_bucket}/m/a/1.txt", f"{s3_bucket}/m/b.txt"]
    assert len(storage.list_uris(s3_bucket)) == 4


def test_s3_create_if_absent(s3_bucket: str) -> None:
    uri = storage.join(s3_bucket, "locks", "claim")
    assert storage.create_if_absent(uri, b"first") is True
    assert storage.create_if_absent(uri, b"second") is False
    assert storage.read_bytes(uri) == b"first"


def test_s3_sync_prefix_downloads_once_and_follows_etags(s3_bucket: str, tmp_path: Path) -> None:
    prefix = storage.join(s3_bucket, "models", "tiny")
    storage.write_bytes(storage.join(prefix, "model_index.json"), b"{}")
    storage.write_bytes(storage.join(prefix, "unet", "w.safetensors"), b"weights")
    storage.write_bytes(storage.join(s3_bucket, "models", "tiny-old", "x"), b"not ours")
    cache = tmp_path / "cache"

    first = storage.sync_prefix(prefix, cache)
    assert (first / "unet" / "w.safetensors").read_bytes() == b"weights"
    assert (first / "model_index.json").read_bytes() == b"{}"
    assert (first / storage.COMPLETE_MARKER).is_file()
    assert not (first / "x").exists()

    gets = _count_calls("GetObject")
    heads = _count_calls("HeadObject")
    assert storage.sync_prefix(prefix, cache) == first
    assert gets == [] and heads == []

    storage.write_bytes(storage.join(prefix, "unet", "w.safetensors"), b"new weights")
    second = storage.sync_prefix(prefix, cache)
    assert second != first
    assert (second / "unet" / "w.safetensors").read_bytes() == b"new weights"
    assert (first / "unet" / "w.safetensors").read_bytes() == b"weights"
    assert sorted(p.name for p in cache.iterdir()) == sorted([first.name, second.name])

    with pytest.raises(storage.StorageNotFound):
        storage.sync_prefix(storage.join(s3_bucket, "models", "absent"), cache)


def test_s3_sync_prefix_replaces_incomplete_folder(s3_bucket: str, tmp_path: Path) -> None:
    prefix = storage.join(s3_bucket, "m")
    storage.write_bytes(storage.join(prefix, "a.bin"), b"a")
    first = storage.sync_prefix(prefix, tmp_path)
    (first / storage.COMPLETE_MARKER).unlink()  # as if a crash left it half done
    (first / "a.bin").write_bytes(b"garbage")
    again = storage.sync_prefix(prefix, tmp_path)
    assert again == first
    assert (again / "a.bin").read_bytes() == b"a"
    assert (again / storage.COMPLETE_MARKER).is_file()


def test_client_follows_endpoint_env_set_late(s3_bucket: str,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    uri = storage.join(s3_bucket, "k")
    storage.write_bytes(uri, b"1")
    client = storage.s3_client()
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    assert storage.s3_client() is not client
    assert "127.0.0.1:9" in storage.s3_client().meta.endpoint_url
    monkeypatch.undo()
    assert storage.s3_client() is client
    assert storage.read_bytes(uri) == b"1"


def test_s3_large_write_uses_transfer_manager(s3_bucket: str,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from boto3.s3.transfer import TransferConfig

    mib = 1024 * 1024
    monkeypatch.setattr(storage.objects, "MULTIPART_THRESHOLD", mib)  # where write_bytes reads them
    monkeypatch.setattr(storage.objects, "_TRANSFER_CONFIG",
                        TransferConfig(multipart_threshold=5 * mib, multipart_chunksize=5 * mib))
    puts, multipart = _count_calls("PutObject"), _count_calls("CreateMultipartUpload")
    data = os.urandom(11 * mib)
    uri = storage.join(s3_bucket, "big.bin")
    storage.write_bytes(uri, data)
    assert puts == [] and multipart == ["CreateMultipartUpload"]
    assert storage.read_bytes(uri) == data


def test_is_transient_sees_through_upload_failure() -> None:
    import boto3.exceptions

    try:
        try:
            raise _client_error("SlowDown", 503)
        except botocore.exceptions.ClientError:
            raise boto3.exceptions.S3UploadFailedError("Failed to upload") from None
    except boto3.exceptions.S3UploadFailedError as exc:
        assert not storage.is_transient(exc)  # context suppressed: nothing to see through
    try:
        try:
            raise _client_error("SlowDown", 503)
        except botocore.exceptions.ClientError:
            raise boto3.exceptions.S3UploadFailedError("Failed to upload")  # noqa: B904
    except boto3.exceptions.S3UploadFailedError as exc:
        assert storage.is_transient(exc)


# ---------------------------------------------------------------- errors and retrying
def test_errors_are_one_line_name_the_uri_and_survive_copying() -> None:
    exc = storage.StorageAccessDenied("s3://b/k.png", "read: HTTP 403 AccessDenied", status=403,
                                      code="AccessDenied")
    assert str(exc) == "permission denied: s3://b/k.png (read: HTTP 403 AccessDenied)"
    assert isinstance(exc, storage.StorageError)
    again = copy.deepcopy(exc)  # what pickling (Prefect moving a task's error) goes through
    assert type(again) is type(exc) and str(again) == str(exc)
    assert (again.uri, again.status, again.code) == ("s3://b/k.png", 403, "AccessDenied")
    assert str(copy.copy(storage.StorageNotFound("/x"))) == "not found: /x"


def test_retrying_retries_transient_then_succeeds_and_leaves_bugs_alone() -> None:
    calls: list[int] = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise OSError(errno.EIO, "flaky")
        return "ok"

    policy = storage.RetryPolicy(attempts=3, base_delay_s=0.001, max_delay_s=0.001)
    assert storage.retrying(flaky, uri="/x", action="read", policy=policy) == "ok"
    assert len(calls) == 3

    def bug() -> None:
        calls.append(1)
        raise TypeError("a bug, not storage")

    calls.clear()
    with pytest.raises(TypeError):
        storage.retrying(bug, uri="/x", action="read", policy=policy)
    assert len(calls) == 1


def test_retry_policy_backoff_is_exponential_jittered_and_capped() -> None:
    policy = storage.RetryPolicy(attempts=9, base_delay_s=1.0, max_delay_s=4.0)
    for failed, ceiling in ((1, 1.0), (2, 2.0), (3, 4.0), (6, 4.0)):
        delays = {policy.delay(failed) for _ in range(50)}
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert len(delays) > 1  # jitter


def test_config_env_vars_are_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(storage.ENV_STORAGE_ATTEMPTS, "0")
    with pytest.raises(ValueError, match="VCT_STORAGE_ATTEMPTS must be at least 1"):
        storage.RetryPolicy.from_env()
    monkeypatch.setenv(storage.ENV_STORAGE_ATTEMPTS, "7")
    monkeypatch.setenv(storage.ENV_RETRY_DEADLINE, "2.5")
    assert storage.RetryPolicy.from_env().attempts == 7
    assert storage.RetryPolicy.from_env().deadline_s == 2.5
    monkeypatch.setenv(storage.ENV_S3_READ_TIMEOUT, "nan")
    with pytest.raises(ValueError, match="VCT_S3_READ_TIMEOUT"):
        storage.s3_config()
    monkeypatch.setenv(storage.ENV_S3_READ_TIMEOUT, "7")
    monkeypatch.setenv(storage.ENV_S3_MAX_ATTEMPTS, "9")
    config = storage.s3_config()
    assert config.read_timeout == 7.0
    assert config.retries == {"mode": "standard", "total_max_attempts": 9}


# ---------------------------------------------------------------- S3 faults through the proxy
def _put_direct(s3_server: str, uri: str, data: bytes) -> None:
    """Write straight to moto, bypassing the proxy (and its faults)."""
    bucket, key = uri[len("s3://"):].split("/", 1)
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").put_object(
        Bucket=bucket, Key=key, Body=data)


def _get_direct(s3_server: str, uri: str) -> bytes:
    bucket, key = uri[len("s3://"):].split("/", 1)
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    return client.get_object(Bucket=bucket, Key=key)["Body"].read()


def test_s3_burst_of_seven_slowdowns_on_a_get_is_survived(fault_proxy: FaultProxy,
                                                          s3_server: str, s3_bucket: str) -> None:
    uri = storage.join(s3_bucket, "img.png")
    _put_direct(s3_server, uri, b"pixels")
    fault_proxy.fail("img.png", 503, "SlowDown", times=7, method="GET")
    assert storage.read_bytes(uri) == b"pixels"
    # botocore's 5 attempts were not enough; the job-level retry made the other 3.
    assert fault_proxy.count("img.png", "GET") == 8


def test_s3_max_attempts_reach_botocore(fault_proxy: FaultProxy, s3_server: str, s3_bucket: str,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    uri = storage.join(s3_bucket, "img.png")
    _put_direct(s3_server, uri, b"pixels")
    fault_proxy.fail("img.png", 503, "SlowDown", method="GET")
    monkeypatch.setenv(storage.ENV_STORAGE_ATTEMPTS, "1")
    with pytest.raises(storage.StorageUnavailable, match="HTTP 503 SlowDown"):
        storage.read_bytes(uri)
    assert fault_proxy.count("img.png") == storage.DEFAULT_S3_MAX_ATTEMPTS
    monkeypatch.setenv(storage.ENV_S3_MAX_ATTEMPTS, "2")  # a new client: part of its cache key
    with pytest.raises(storage.StorageUnavailable):
        storage.read_bytes(uri)
    assert fault_proxy.count("img.png") == storage.DEFAULT_S3_MAX_ATTEMPTS + 2


def test_s3_dropped_and_reset_connections_are_recovered(fault_proxy: FaultProxy,
                                                        s3_server: str, s3_bucket: str) -> None:
    uri = storage.join(s3_bucket, "img.png")
    _put_direct(s3_server, uri, b"pixels")
    fault_proxy.drop("img.png", times=3, method="GET")  # closed without a response
    fault_proxy.reset("img.png", times=3, method="GET")  # then "connection reset by peer"
    assert storage.read_bytes(uri) == b"pixels"
    assert fault_proxy.count("img.png", "GET") == 7  # more than botocore's 5 alone


def test_s3_body_cut_mid_stream_is_retried_by_the_job_level(fault_proxy: FaultProxy,
                                                              s3_server: str,
                                                              s3_bucket: str) -> None:
    uri = storage.join(s3_bucket, "img.png")
    data = os.urandom(50_000)
    _put_direct(s3_server, uri, data)
    fault_proxy.truncate("img.png", times=1, method="GET")  # botocore never retries a body
    assert storage.read_bytes(uri) == data
    assert fault_proxy.count("img.png", "GET") == 2
    fault_proxy.truncate("img.png", times=1, method="GET")
    assert storage.read_bytes(uri, max_bytes=50_000) == data  # the capped, chunked read too
    assert fault_proxy.count("img.png", "GET") == 4


def test_s3_slow_responses_within_and_beyond_the_read_timeout(
        fault_proxy: FaultProxy, s3_server: str, s3_bucket: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(storage.ENV_S3_READ_TIMEOUT, "0.5")
    uri = storage.join(s3_bucket, "img.png")
    _put_direct(s3_server, uri, b"pixels")
    fault_proxy.delay("img.png", 0.2, times=2, method="GET")
    assert storage.read_bytes(uri) == b"pixels"  # slow but within the timeout: one request
    assert storage.read_bytes(uri) == b"pixels"
    assert fault_proxy.count("img.png", "GET") == 2
    fault_proxy.clear()
    fault_proxy.delay("img.png", 1.5, times=1, method="GET")
    start = time.monotonic()
    assert storage.read_bytes(uri) == b"pixels"  # timed out once, retried
    assert time.monotonic() - start < 1.4
    assert fault_proxy.count("img.png", "GET") == 4


def test_s3_permanent_403_fails_fast_and_is_not_retried(fault_proxy: FaultProxy,
                                                        s3_server: str, s3_bucket: str) -> None:
    uri = storage.join(s3_bucket, "secret.png")
    _put_direct(s3_server, uri, b"pixels")
    fault_proxy.fail("secret.png", 403, "AccessDenied")
    with pytest.raises(storage.StorageAccessDenied) as caught:
        storage.read_bytes(uri)
    assert str(caught.value) == f"permission denied: {uri} (read: HTTP 403 AccessDenied)"
    assert caught.value.status == 403 and not storage.is_transient(caught.value)
    assert fault_proxy.count("secret.png") == 1
    with pytest.raises(storage.StorageAccessDenied, match="HTTP 403"):
        storage.exists(uri)  # a HEAD: no error body, still a clear 403
    assert fault_proxy.count("secret.png") == 2  # one request each: failed fast, no retry


def test_s3_permanent_500_fails_after_bounded_retries(fault_proxy: FaultProxy, s3_server: str,
                                                      s3_bucket: str) -> None:
    uri = storage.join(s3_bucket, "broken.png")
    _put_direct(s3_server, uri, b"pixels")
    fault_proxy.fail("broken.png", 500, "InternalError")
    with pytest.raises(storage.StorageUnavailable) as caught:
        storage.read_bytes(uri)
    message = str(caught.value)
    assert message.startswith(f"storage unavailable: {uri} (read: HTTP 500 InternalError; "
                              "gave up after 4 tries in ")
    assert "\n" not in message and caught.value.status == 500
    assert fault_proxy.count("broken.png") == 4 * storage.DEFAULT_S3_MAX_ATTEMPTS


def test_s3_retry_deadline_bounds_the_time(fault_proxy: FaultProxy, s3_server: str,
                                           s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(storage.ENV_RETRY_BASE, "4")
    monkeypatch.setenv(storage.ENV_RETRY_MAX, "4")
    monkeypatch.setenv(storage.ENV_RETRY_DEADLINE, "0.5")  # the first backoff (>= 2 s) exceeds it
    uri = storage.join(s3_bucket, "broken.png")
    _put_direct(s3_server, uri, b"pixels")
    fault_proxy.fail("broken.png", 500, "InternalError")
    start = time.monotonic()
    with pytest.raises(storage.StorageUnavailable):
        storage.read_bytes(uri)
    assert time.monotonic() - start < 1.9  # no backoff slept (it would be >= 2 s)
    assert fault_proxy.count("broken.png") == storage.DEFAULT_S3_MAX_ATTEMPTS


def test_s3_missing_and_bad_requests_are_not_retried(fault_proxy: FaultProxy,
                                                     s3_bucket: str) -> None:
    with pytest.raises(storage.StorageNotFound, match="nope.png"):
        storage.read_bytes(storage.join(s3_bucket, "nope.png"))
    assert fault_proxy.count("nope.png") == 1
    fault_proxy.fail("odd.png", 400, "InvalidRequest")
    with pytest.raises(storage.StorageFailed, match=r"odd\.png \(read: HTTP 400 InvalidRequest"):
        storage.read_bytes(storage.join(s3_bucket, "odd.png"))
    assert fault_proxy.count("odd.png") == 1


def test_s3_put_under_a_burst_of_slowdowns_succeeds(fault_proxy: FaultProxy, s3_server: str,
                                                    s3_bucket: str) -> None:
    uri = storage.join(s3_bucket, "out", "result.png")
    fault_proxy.fail("result.png", 503, "SlowDown", times=7, method="PUT")
    storage.write_bytes(uri, b"restyled", "image/png")
    assert _get_direct(s3_server, uri) == b"restyled"
    assert fault_proxy.count("result.png", "PUT") == 8


def test_s3_exists_list_create_delete_survive_throttling(fault_proxy: FaultProxy,
                                                         s3_server: str, s3_bucket: str) -> None:
    uri = storage.join(s3_bucket, "run", "a.png")
    _put_direct(s3_server, uri, b"a")
    fault_proxy.fail("a.png", 503, "SlowDown", times=7, method="HEAD")
    assert storage.exists(uri)
    fault_proxy.fail("list-type=2", 503, "SlowDown", times=7)
    assert storage.list_uris(storage.join(s3_bucket, "run")) == [uri]
    claim = storage.join(s3_bucket, "run", "claim")
    fault_proxy.fail("claim", 503, "SlowDown", times=7, method="PUT")
    assert storage.create_if_absent(claim, b"mine") is True
    assert storage.create_if_absent(claim, b"theirs") is False
    fault_proxy.fail("a.png", 503, "SlowDown", times=7, method="DELETE")
    storage.delete(uri)
    assert not storage.exists(uri)
    assert fault_proxy.count("list-type=2") == 8 and fault_proxy.count("claim", "PUT") == 9


def test_s3_create_if_absent_whose_response_was_lost(fault_proxy: FaultProxy, s3_server: str,
                                                     s3_bucket: str) -> None:
    ours = storage.join(s3_bucket, "claims", "ours")
    fault_proxy.drop_after("claims/ours", times=1, method="PUT")  # created, answer lost
    assert storage.create_if_absent(ours, b"claim by run 1") is True
    assert fault_proxy.count("claims/ours", "PUT") == 2  # the retry met its own object
    theirs = storage.join(s3_bucket, "claims", "theirs")
    _put_direct(s3_server, theirs, b"claim by run 2")
    fault_proxy.drop_after("claims/theirs", times=1, method="PUT")
    assert storage.create_if_absent(theirs, b"claim by run 1") is False
    assert _get_direct(s3_server, theirs) == b"claim by run 2"


# ---------------------------------------------------------------- bounded reads (local and S3)
def _read_in_thread(uri: str, fifo: Path | None = None) -> dict[str, Any]:
    """read_bytes in a thread that must finish within 5 s; a FIFO is unblocked if it hangs."""
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["value"] = storage.read_bytes(uri)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            result["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(5)
    if thread.is_alive() and fifo is not None:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # a writer that closes: EOF
        thread.join(5)
        result["hung"] = True
    return result


def test_local_read_refuses_what_is_not_a_regular_file(tmp_path: Path) -> None:
    with pytest.raises(storage.NotARegularFile,
                       match=r"not a regular file: /dev/zero \(character device\)"):
        storage.read_bytes("/dev/zero")
    with pytest.raises(storage.NotARegularFile, match="directory"):
        storage.read_bytes(str(tmp_path))
    sock_path = tmp_path / "s.sock"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(sock_path))
        with pytest.raises(storage.NotARegularFile, match="socket"):
            storage.read_bytes(str(sock_path))
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    result = _read_in_thread(str(fifo), fifo)
    assert "hung" not in result
    assert isinstance(result.get("error"), storage.NotARegularFile)
    assert "FIFO" in str(result["error"])


def test_fifo_swapped_in_after_the_stat_cannot_block_the_open(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    # As if the path was a regular file when stat'ed and a FIFO by the time it is opened.
    monkeypatch.setattr(storage.reads, "_path_mode", lambda path: stat.S_IFREG | 0o644)
    result = _read_in_thread(str(fifo), fifo)
    assert "hung" not in result  # O_NONBLOCK: the open returned at once
    assert isinstance(result.get("error"), storage.NotARegularFile)
    assert "FIFO" in str(result["error"])


def test_local_read_cap_refuses_from_the_size(tmp_path: Path) -> None:
    path = tmp_path / "big.png"
    path.write_bytes(b"x" * 2000)
    with pytest.raises(storage.InputTooLarge, match=r"big\.png \(2000 bytes, limit 1000 bytes"):
        storage.read_bytes(str(path), max_bytes=1000)
    assert storage.read_bytes(str(path), max_bytes=2000) == b"x" * 2000
    assert storage.read_bytes(str(path)) == b"x" * 2000  # no cap by default


def test_local_read_cap_is_enforced_while_reading() -> None:
    proc = "/proc/self/status"  # a regular file that reports size 0 but holds ~1 KB
    assert stat.S_ISREG(os.stat(proc).st_mode) and os.stat(proc).st_size == 0
    with pytest.raises(storage.InputTooLarge, match="more bytes arrived, limit 100 bytes"):
        storage.read_bytes(proc, max_bytes=100)
    assert len(storage.read_bytes(proc, max_bytes=1_000_000)) > 100


class _Endless(io.RawIOBase):
    """An endless stream of zeros that fails the test once it served far more than asked."""

    def __init__(self, limit: int):
        self.served, self.limit = 0, limit

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        assert self.served <= self.limit, f"read {self.served} bytes, far past the cap"
        n = len(buffer)
        buffer[:n] = bytes(n)
        self.served += n
        return n


def test_local_read_stops_at_the_cap_on_an_endless_regular_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "growing.log"
    path.write_bytes(b"")  # a regular file whose size says 0 (like /proc), but never ends
    endless = _Endless(limit=4 * 1024 * 1024)
    real_fdopen = os.fdopen

    def fdopen(fd: int, *args: Any, **kwargs: Any) -> Any:
        if args[:1] == ("rb",):
            os.close(fd)
            return io.BufferedReader(endless)
        return real_fdopen(fd, *args, **kwargs)

    monkeypatch.setattr(storage.reads.os, "fdopen", fdopen)
    with pytest.raises(storage.InputTooLarge, match="more bytes arrived, limit 1000 bytes"):
        storage.read_bytes(str(path), max_bytes=1000)
    assert endless.served <= 64 * 1024  # one buffer's worth, not the stream


def test_read_input_cap_defaults_to_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "row.png"
    path.write_bytes(b"y" * 11)
    monkeypatch.delenv(storage.ENV_MAX_INPUT_BYTES, raising=False)
    assert storage.max_input_bytes() == storage.MAX_INPUT_BYTES == 64 * 1024 * 1024
    assert storage.read_input(str(path)) == b"y" * 11
    monkeypatch.setenv(storage.ENV_MAX_INPUT_BYTES, "10")
    with pytest.raises(storage.InputTooLarge, match="raise VCT_MAX_INPUT_BYTES"):
        storage.read_input(str(path))
    assert storage.read_input(str(path), max_bytes=11) == b"y" * 11
    assert storage.read_bytes(str(path)) == b"y" * 11
    monkeypatch.setenv(storage.ENV_MAX_INPUT_BYTES, "ten")
    with pytest.raises(ValueError, match="VCT_MAX_INPUT_BYTES must be an integer"):
        storage.read_input(str(path))


def test_local_permission_denied_is_permanent(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "secret.png"
    path.write_bytes(b"z")
    calls: list[str] = []
    real_open = os.open

    def denied(file: Any, flags: int, *args: Any) -> int:
        if str(file) == str(path):
            calls.append(str(file))
            raise PermissionError(errno.EACCES, "Permission denied", str(file))
        return real_open(file, flags, *args)

    monkeypatch.setattr(storage.reads.os, "open", denied)  # tests run as root: chmod cannot deny
    with pytest.raises(storage.StorageAccessDenied, match=r"permission denied: .*secret\.png"):
        storage.read_bytes(str(path))
    assert len(calls) == 1


def test_s3_read_cap_refuses_from_content_length(s3_bucket: str) -> None:
    uri = storage.join(s3_bucket, "big.png")
    storage.write_bytes(uri, b"x" * 2000)
    with pytest.raises(storage.InputTooLarge, match=r"big\.png \(2000 bytes, limit 1000"):
        storage.read_bytes(uri, max_bytes=1000)
    assert storage.read_bytes(uri, max_bytes=2000) == b"x" * 2000


def test_s3_read_cap_is_enforced_while_streaming(fault_proxy: FaultProxy, s3_server: str,
                                                 s3_bucket: str) -> None:
    uri = storage.join(s3_bucket, "chunked.png")
    data = os.urandom(300_000)
    _put_direct(s3_server, uri, data)
    fault_proxy.chunked("chunked.png")  # no Content-Length: only the stream can tell
    with pytest.raises(storage.InputTooLarge, match="more bytes arrived, limit 100000"):
        storage.read_bytes(uri, max_bytes=100_000)
    assert storage.read_bytes(uri, max_bytes=300_000) == data
    assert fault_proxy.count("chunked.png", "GET") == 2  # too large is permanent: no retry


# ---------------------------------------------------------------- stale temp files
def _age(path: Path, seconds: float) -> None:
    old = time.time() - seconds
    os.utime(path, (old, old), follow_symlinks=False)


def test_sweep_local_removes_only_old_writer_temp_files(tmp_path: Path) -> None:
    root = tmp_path / "run"
    (root / "sub").mkdir(parents=True)
    old_tmp = storage._tmp_name(root / "result.png")  # exactly what a writer names its temp
    new_tmp = storage._tmp_name(root / "other.png")
    nested_old = storage._tmp_name(root / "sub" / "x.safetensors")
    for path in (old_tmp, new_tmp, nested_old):
        path.write_bytes(b"partial")
    keep = [root / "result.png", root / ".notes.tmp", root / "data.tmp", root / "sub" / "a.png"]
    for path in keep:
        path.write_bytes(b"user's")
    old_dir = root / f".{'ab' * 32}.{'0123456789abcdef'}.tmp"  # sync_prefix's temp folder
    (old_dir / "unet").mkdir(parents=True)
    (old_dir / "unet" / "w.bin").write_bytes(b"w")
    busy_dir = root / f".{'cd' * 32}.{'fedcba9876543210'}.tmp"
    busy_dir.mkdir()
    (busy_dir / "w.bin").write_bytes(b"still downloading")
    link = root / f".link.{'1' * 16}.tmp"
    link.symlink_to(root / "result.png")
    for path in [old_tmp, nested_old, *keep, old_dir / "unet" / "w.bin", old_dir / "unet",
                 old_dir, busy_dir, link]:
        _age(path, 7200)
    assert storage.sweep_temp_files(str(root), older_than_s=3600) == 3
    assert not old_tmp.exists() and not nested_old.exists() and not old_dir.exists()
    assert new_tmp.exists() and busy_dir.exists() and link.is_symlink()
    assert all(path.read_bytes() == b"user's" for path in keep)
    assert storage.sweep_temp_files(str(root), older_than_s=3600) == 0
    assert storage.sweep_temp_files(str(tmp_path / "missing"), older_than_s=0) == 0


def test_sweep_age_defaults_to_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tmp = storage._tmp_name(tmp_path / "x.png")
    tmp.write_bytes(b"partial")
    _age(tmp, 120)
    assert storage.sweep_temp_files(str(tmp_path)) == 0  # a day by default
    monkeypatch.setenv(storage.ENV_TEMP_MAX_AGE, "60")
    assert storage.sweep_temp_files(str(tmp_path)) == 1


def test_sweep_s3_removes_old_temp_objects_and_abandoned_uploads(s3_server: str,
                                                                 s3_bucket: str) -> None:
    prefix = storage.join(s3_bucket, "cache")
    tmp_key = storage._tmp_name(Path("content/ab/key.safetensors")).as_posix()
    storage.write_bytes(storage.join(prefix, tmp_key), b"partial")
    storage.write_bytes(storage.join(prefix, "content/ab/key.safetensors"), b"entry")
    storage.write_bytes(storage.join(prefix, ".notes.tmp"), b"user's")
    storage.write_bytes(storage.join(s3_bucket, "elsewhere", tmp_key), b"not under prefix")
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    bucket = s3_bucket[len("s3://"):]
    client.create_multipart_upload(Bucket=bucket, Key="cache/big.safetensors")
    client.create_multipart_upload(Bucket=bucket, Key="elsewhere/big.safetensors")
    # moto reports every upload as initiated at one fixed instant; a clock a minute after it
    # makes the upload fresh (and the objects, written later, fresher still).
    initiated = client.list_multipart_uploads(Bucket=bucket)["Uploads"][0]["Initiated"]
    assert storage.sweep_temp_files(prefix, older_than_s=3600,
                                    now=initiated.timestamp() + 60) == 0
    assert storage.sweep_temp_files(prefix, older_than_s=3600, now=time.time() + 7200) == 2
    assert storage.list_uris(prefix) == [storage.join(prefix, ".notes.tmp"),
                                         storage.join(prefix, "content/ab/key.safetensors")]
    left = [u["Key"] for u in client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])]
    assert left == ["elsewhere/big.safetensors"]
    assert storage.exists(storage.join(s3_bucket, "elsewhere", tmp_key))


# ---------------------------------------------------------------- output locations
def test_check_writable_local_accepts_folders_to_be_and_refuses_files(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    storage.check_writable(str(tmp_path))
    storage.check_writable(str(tmp_path / "not" / "yet" / "there"))
    assert list(tmp_path.iterdir()) == []  # nothing was created
    (tmp_path / "f").write_text("x")
    with pytest.raises(storage.OutputUnusable, match=r"f \(is a file, not a folder\)"):
        storage.check_writable(str(tmp_path / "f"))
    with pytest.raises(storage.OutputUnusable, match=r"f is not a folder"):
        storage.check_writable(str(tmp_path / "f" / "out"))
    # tests run as root, where chmod cannot deny: ask os.access what a read-only mount says
    monkeypatch.setattr(storage.objects.os, "access", lambda path, mode: False)
    with pytest.raises(storage.OutputUnusable, match="is not writable by this user"):
        storage.check_writable(str(tmp_path / "new"))


def test_check_writable_s3_needs_the_bucket_and_leaves_nothing(s3_bucket: str) -> None:
    storage.check_writable(f"{s3_bucket}/runs/out")
    assert storage.list_uris(s3_bucket) == []  # the probe object is gone again
    with pytest.raises(storage.OutputUnusable, match="bucket 'no-such-bucket-x' does not exist"):
        storage.check_writable("s3://no-such-bucket-x/out")


def test_check_writable_s3_refuses_a_bucket_that_denies_writes(s3_bucket: str) -> None:
    calls = _count_calls("PutObject")

    def deny(**kwargs: Any) -> None:
        raise _client_error("AccessDenied", 403)

    storage.s3_client().meta.events.register("before-call.s3.PutObject", deny)
    try:
        with pytest.raises(storage.OutputUnusable, match="writing is denied"):
            storage.check_writable(f"{s3_bucket}/out")
    finally:
        storage.s3_client().meta.events.unregister("before-call.s3.PutObject", deny)
    assert calls == ["PutObject"]  # a 403 is not retried
