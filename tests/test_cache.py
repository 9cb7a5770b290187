"""vct.cache: keys, and the store's hit/miss/reject behaviour on local disk and S3."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from vct import storage
from vct.cache import StageCache, cache_key


def _validate(data: bytes) -> dict:
    """A stand-in for the safetensors validation the stages do: raise on a bad entry."""
    value = json.loads(data)
    if value.get("format") != 1:
        raise ValueError("wrong format version")
    return value


def _key(n: int = 0) -> str:
    return cache_key("content", {"source_sha256": "ab" * 32, "model": "m", "config": {"t": 50},
                                 "seed": n, "format": 1})


def test_cache_key_is_canonical_and_sensitive() -> None:
    a = cache_key("content", {"x": 1, "y": {"b": 2, "a": 1}})
    b = cache_key("content", {"y": {"a": 1, "b": 2}, "x": 1})
    assert a == b and len(a) == 64 and int(a, 16) >= 0
    assert cache_key("concept", {"x": 1, "y": {"b": 2, "a": 1}}) != a
    assert cache_key("content", {"x": 2, "y": {"b": 2, "a": 1}}) != a
    assert _key(0) != _key(1)
    with pytest.raises(ValueError):
        cache_key("content", {"kind": "other"})
    with pytest.raises(ValueError):
        cache_key("content", {"lr": float("nan")})


def test_uri_layout_and_guards(tmp_path: Path) -> None:
    cache = StageCache(str(tmp_path))
    key = _key()
    assert cache.uri("content", key) == str(tmp_path / "content" / key[:2] / f"{key}.safetensors")
    assert StageCache("s3://b/c").uri("content", key) == f"s3://b/c/content/{key[:2]}/{key}.safetensors"
    with pytest.raises(ValueError):
        cache.uri("../x", key)
    with pytest.raises(ValueError):
        cache.uri("content", "../../etc")


def _exercise(cache: StageCache, caplog: pytest.LogCaptureFixture) -> None:
    key = _key()
    assert cache.get("content", key, _validate) is None
    assert not cache.contains("content", key)

    cache.put("content", key, json.dumps({"format": 1, "v": 3}).encode())
    assert cache.contains("content", key)
    assert cache.get("content", key, _validate) == {"format": 1, "v": 3}

    cache.put("content", key, b"\x00truncated")
    with caplog.at_level(logging.WARNING, logger="vct.cache"):
        assert cache.get("content", key, _validate) is None
    assert any("rejecting bad cache entry" in r.message and key in r.message
               for r in caplog.records)

    cache.put("content", key, json.dumps({"format": 1, "v": 4}).encode())  # recomputed
    assert cache.get("content", key, _validate) == {"format": 1, "v": 4}


def test_local_cache_get_put_miss_reject(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _exercise(StageCache(str(tmp_path / "cache")), caplog)
    assert [p for p in tmp_path.rglob("*.tmp")] == []


def test_s3_cache_get_put_miss_reject(s3_bucket: str, caplog: pytest.LogCaptureFixture) -> None:
    cache = StageCache(storage.join(s3_bucket, "cache"))
    _exercise(cache, caplog)
    # the entry, and the record of its last use (written by the first hit)
    assert storage.list_uris(storage.join(s3_bucket, "cache")) == [
        cache.used_uri("content", _key()), cache.uri("content", _key())]


def test_a_hit_records_its_use_once_an_hour_and_a_miss_never(tmp_path: Path, monkeypatch) -> None:
    from vct import cache as cache_module

    monkeypatch.setattr(cache_module, "_recorded", {})
    cache = StageCache(str(tmp_path / "cache"))
    key, used = _key(), Path(cache.used_uri("content", _key()))
    assert cache.get("content", key, _validate) is None and not used.exists()
    cache.put("content", key, json.dumps({"format": 1, "v": 3}).encode())
    assert not used.exists()  # a write is not a use: the entry's own time says when it was written
    assert cache.get("content", key, _validate) is not None and used.is_file()
    os.utime(used, (1.0, 1.0))
    assert cache.get("content", key, _validate) is not None
    assert used.stat().st_mtime == 1.0  # within the hour: not written again
    monkeypatch.setattr(cache_module, "USE_INTERVAL_S", 0.0)
    assert cache.get("content", key, _validate) is not None
    assert used.stat().st_mtime > 1.0


def test_storage_errors_other_than_missing_propagate(tmp_path: Path) -> None:
    cache = StageCache(str(tmp_path))
    key = _key()
    Path(cache.uri("content", key)).mkdir(parents=True)  # a folder where the file should be
    with pytest.raises(storage.StorageError):
        cache.get("content", key, _validate)


def test_a_rejected_entry_is_left_for_its_writer_not_deleted(tmp_path: Path) -> None:
    """Two runs share a cache: run B reads an entry that fails verification while run A is
    about to replace it with a good one. B treats it as a miss and deletes nothing, so A's
    entry survives and B's recomputation only ever overwrites atomically."""
    cache = StageCache(str(tmp_path / "cache"))
    key = _key()
    cache.put("content", key, b"\x00half-written by a crashed run")
    assert cache.get("content", key, _validate) is None  # B: a miss
    assert cache.contains("content", key)  # and still there
    cache.put("content", key, json.dumps({"format": 1, "v": 5}).encode())  # A's good entry
    assert cache.get("content", key, _validate) == {"format": 1, "v": 5}  # B reads A's


def test_the_grid_and_the_entry_format_are_in_every_stage_key() -> None:
    """Entries made on the old default grid (offset 0), or in the format before fusion replayed
    the fit (no reconstruction in content entries), are never reused: their keys differ."""
    from vct import artifacts
    from vct.batch import keys
    from vct.config import ContentConfig, FusionConfig

    sha, model = "ab" * 32, "model-id"
    offset1, offset0 = ContentConfig(), ContentConfig(steps_offset=0)
    assert offset1.steps_offset == 1
    assert keys.content_key(sha, model, offset1) != keys.content_key(sha, model, offset0)
    k1, k0 = keys.content_key(sha, model, offset1), keys.content_key(sha, model, offset0)
    concept = "cd" * 32
    assert keys.output_key(k1, concept, FusionConfig()) != keys.output_key(k0, concept,
                                                                            FusionConfig())
    assert keys.fusion_key(k1, [concept], FusionConfig()) != keys.fusion_key(k0, [concept],
                                                                             FusionConfig())
    old_format = artifacts.FORMAT_VERSION
    try:
        artifacts.FORMAT_VERSION = 2
        keys.FORMAT_VERSION = 2
        assert keys.content_key(sha, model, offset1) != k1, "the format is in the key"
    finally:
        artifacts.FORMAT_VERSION = old_format
        keys.FORMAT_VERSION = old_format
