"""Local atomic writes: temp names beside the target, exclusive creates, chunked writes,
fsync of files and folders, ``os.replace``."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from vct.faults import checkpoint

TMP_SUFFIX = ".tmp"
_COPY_CHUNK = 8 * 1024 * 1024

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


def _write_all(fh: BinaryIO, data: bytes) -> None:
    """Write in chunks: very large buffers then never need a second in-kernel copy at once."""
    view = memoryview(data)
    for start in range(0, len(view), _COPY_CHUNK):
        fh.write(view[start:start + _COPY_CHUNK])
