"""Bounded reads of a regular file or an S3 object: :func:`read_bytes`, :func:`read_input`
(capped by default) and :func:`digest_input` (streamed through sha256, keeping a head)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from vct.storage.env import max_input_bytes
from vct.storage.errors import NotARegularFile, _too_large
from vct.storage.retry import retrying
from vct.storage.s3 import s3_client
from vct.storage.uris import _local_path, _require_key, is_s3

_READ_CHUNK = 1024 * 1024
# What digest_input keeps of an input for a header probe: a PNG, GIF or WebP header and a
# JPEG's frame header after its EXIF/ICC segments fit in far less (a TIFF whose first IFD
# follows its pixels does not: the planner then reads the whole file).
HEAD_BYTES = 256 * 1024

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
