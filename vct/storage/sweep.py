"""Removing what killed writers left: stale local temp files and folders, S3 temp objects
and incomplete multipart uploads."""

from __future__ import annotations

import contextlib
import logging
import os
import posixpath
import re
import shutil
import stat
import time
from pathlib import Path
from typing import Any

from vct.storage.env import temp_max_age_s
from vct.storage.errors import StorageNotFound
from vct.storage.objects import delete
from vct.storage.retry import retrying
from vct.storage.s3 import _s3_objects, s3_client
from vct.storage.uris import _local_path, _s3_uri, is_s3

log = logging.getLogger("vct.storage")

# The names _tmp_name (and sync_prefix's temp folders) produce: .<name>.<16 hex>.tmp. Stricter
# than _is_tmp so the sweep can never delete a user's own ".notes.tmp".
_WRITER_TMP_RE = re.compile(r"^\..+\.[0-9a-f]{16}\.tmp$")

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
