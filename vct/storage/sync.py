"""Mirroring an S3 prefix (a model folder), or one object (a single-file checkpoint), into a
local cache folder, once per listing or ETag."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import posixpath
import secrets
import shutil
from pathlib import Path
from typing import Any

from vct.storage.errors import StorageChanged, StorageError, StorageNotFound
from vct.storage.local import TMP_SUFFIX
from vct.storage.retry import retrying
from vct.storage.s3 import _TRANSFER_CONFIG, _s3_objects, s3_client
from vct.storage.uris import _local_path, _s3_uri, _split_s3, is_s3

COMPLETE_MARKER = ".complete"

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
        publish_folder(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def sync_object(uri: str, cache_root: Path) -> Path:
    """One S3 object (a single-file checkpoint) as a local file, downloaded once.

    Kept as ``cache_root/<digest>/<name>``, the digest hashing (bucket, key, ETag), with the
    same temp folder, ``.complete`` marker and rename as :func:`sync_prefix`: a replaced object
    is a new folder, an interrupted download is never used. A local path is returned unchanged.
    """
    if not is_s3(uri):
        return _local_path(uri)
    bucket, key = _split_s3(uri)
    head = retrying(lambda: s3_client().head_object(Bucket=bucket, Key=key), uri=uri,
                    action="read")
    objects = [{"Key": key, "ETag": head["ETag"]}]
    digest = _listing_digest(bucket, key, objects)
    name = posixpath.basename(key)
    final = Path(cache_root) / digest
    if (final / COMPLETE_MARKER).is_file():
        return final / name
    Path(cache_root).mkdir(parents=True, exist_ok=True)
    tmp = Path(cache_root) / f".{digest}.{secrets.token_hex(8)}{TMP_SUFFIX}"
    try:
        tmp.mkdir()
        retrying(lambda: s3_client().download_file(bucket, key, str(tmp / name),
                                                   Config=_TRANSFER_CONFIG),
                 uri=uri, action="download")
        again = retrying(lambda: s3_client().head_object(Bucket=bucket, Key=key), uri=uri,
                         action="read")
        if again["ETag"] != head["ETag"]:
            raise StorageChanged(f"{uri} changed during download; retry")
        (tmp / COMPLETE_MARKER).write_text(json.dumps({"uri": uri, "digest": digest}))
        publish_folder(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final / name


def _download_objects(bucket: str, prefix: str, objects: list[dict[str, Any]],
                      dest: Path) -> None:
    dest.mkdir(parents=True)
    for obj in objects:
        uri = _s3_uri(bucket, obj["Key"])
        target = dest / _safe_relative(obj["Key"], prefix, uri)
        target.parent.mkdir(parents=True, exist_ok=True)
        retrying(lambda key=obj["Key"], target=target: s3_client().download_file(
            bucket, key, str(target), Config=_TRANSFER_CONFIG), uri=uri, action="download")


def publish_folder(tmp: Path, final: Path, marker: str = COMPLETE_MARKER) -> None:
    """Rename the finished temp folder into place; if another process won the race with a
    complete copy (one holding `marker`) keep theirs, and replace a leftover folder without."""
    try:
        os.rename(tmp, final)
        return
    except OSError as exc:
        if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
            raise
    if (final / marker).is_file():
        return
    shutil.rmtree(final, ignore_errors=True)
    os.rename(tmp, final)
