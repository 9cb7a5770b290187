"""`vct cache ls|du|prune`: what a stage cache holds and pruning it (vct/batch/cache_admin.py).

Choosing is pure and tested on made-up entries; the command is tested on a real folder and on
the moto server, with a real live claim (vct.batch.claims), a foreign file inside the cache and
a look-alike prefix beside it, which must all survive."""

from __future__ import annotations

import os
import time

import pytest

from vct import storage
from vct.batch import cache_admin as A
from vct.batch.claims import Claims
from vct.cache import StageCache
from vct.cli import main

NOW = 1_000_000_000.0
DAY = 86400.0


def _key(n: int) -> str:
    return f"{n:02x}" * 32


def _entry(kind: str, n: int, size: int, age_days: float) -> A.Entry:
    return A.Entry(kind, _key(n), f"/c/{kind}/{_key(n)[:2]}/{_key(n)}.safetensors", size,
                   NOW - age_days * DAY)


# ---------------------------------------------------------------- pure
def test_only_objects_laid_out_as_entries_are_entries():
    key = _key(0xab)
    info = [storage.ObjectInfo(uri, "", 10, NOW) for uri in (
        f"/c/concept/{key[:2]}/{key}.safetensors",           # an entry
        f"/c/content/{key[:2]}/{key}.safetensors",           # an entry of another kind
        f"/c/_claims/concept/{key}.json",                    # a claim
        f"/c/concept/ff/{key}.safetensors",                  # wrong fan-out folder
        f"/c/concept/{key[:2]}/{key}.safetensors.bak",       # another suffix
        f"/c/concept/{key[:2]}/{key.upper()}.safetensors",   # not a key
        f"/c/notes/{key[:2]}/x.safetensors",
        f"/c-old/concept/{key[:2]}/{key}.safetensors",       # a look-alike prefix
        "/c/readme.txt")]
    entries = A.entries_of("/c", info)
    assert [(e.kind, e.key) for e in entries] == [("concept", key), ("content", key)]
    assert A.entries_of("/c/", info) == entries
    assert A.claimed_keys("/c", info) == [("concept", key)]


def test_select_by_age_then_size_oldest_first_never_a_claimed_one():
    entries = [_entry("concept", 1, 100, 40), _entry("content", 2, 300, 20),
               _entry("fusion", 3, 200, 10), _entry("fusion", 4, 50, 1),
               _entry("content", 5, 100, 50)]
    keys = lambda chosen: [e.key[:2] for e in chosen]  # noqa: E731
    assert keys(A.select(entries, NOW, older_than_s=30 * DAY)) == ["05", "01"]
    # 750 bytes in all; fit 400: the oldest go first (05, 01, 02 -> 250 left)
    assert keys(A.select(entries, NOW, max_bytes=400)) == ["05", "01", "02"]
    assert keys(A.select(entries, NOW, max_bytes=750)) == []
    # a claimed entry is never chosen but still counts: 02 is skipped over, 03 goes instead
    assert keys(A.select(entries, NOW, max_bytes=400,
                         protected={("content", _key(2))})) == ["05", "01", "03"]
    assert keys(A.select(entries, NOW, older_than_s=30 * DAY,
                         protected={("content", _key(5))})) == ["01"]
    # kinds: the scope of both the age and the size
    assert keys(A.select(entries, NOW, max_bytes=100, kinds=["fusion"])) == ["03"]
    assert keys(A.select(entries, NOW, older_than_s=5 * DAY, kinds=["fusion"])) == ["03"]
    # both: age first, then size over what is left
    assert keys(A.select(entries, NOW, older_than_s=45 * DAY, max_bytes=300)) == ["05", "01",
                                                                                  "02"]
    with pytest.raises(ValueError, match="say what to prune"):
        A.select(entries, NOW)


def test_totals_sizes_and_ages():
    entries = [_entry("concept", 1, 100, 1), _entry("fusion", 3, 200, 1),
               _entry("fusion", 4, 50, 1)]
    assert A.totals(entries) == {"concept": (1, 100), "fusion": (2, 250)}
    assert A.parse_size("500M") == 500 * 1024 ** 2 and A.parse_size("1.5T") == int(1.5 * 2 ** 40)
    assert A.parse_size("2GiB") == 2 * 2 ** 30 and A.parse_size("1024") == 1024
    assert A.parse_age("30d") == 30 * DAY and A.parse_age("90m") == 5400 and A.parse_age("7") == 7
    for bad in ("", "-1G", "12 parsecs", "1e9"):
        with pytest.raises(ValueError, match="not a size"):
            A.parse_size(bad)
    with pytest.raises(ValueError, match="not an age"):
        A.parse_age("soon")


# ---------------------------------------------------------------- the command, local and S3
def _fill(root: str) -> dict[str, str]:
    """Four entries (concept 1 KiB, content 4 KiB, fusion 2 KiB x 2), a foreign file in the
    cache, a look-alike prefix beside it; returns name -> key."""
    cache = StageCache(root)
    keys = {"concept": _key(1), "content": _key(2), "fusion_a": _key(3), "fusion_b": _key(4)}
    sizes = {"concept": 1024, "content": 4096, "fusion_a": 2048, "fusion_b": 2048}
    for name, key in keys.items():
        cache.put(name.split("_")[0], key, b"x" * sizes[name])
    storage.write_bytes(storage.join(root, "notes.txt"), b"keep me")
    storage.write_bytes(storage.join(root.rstrip("/") + "-old", "concept", "01",
                                     _key(1) + ".safetensors"), b"not ours")
    return keys


def _survivors(root: str) -> set[str]:
    prefix = root.rstrip("/")
    return {u.removeprefix(prefix) for u in storage.list_uris(prefix + "-old")} | {
        u.removeprefix(prefix) for u in storage.list_uris(prefix)}


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "cache")
    return request.getfixturevalue("s3_bucket") + "/out/_cache"


def test_ls_and_du(root, capsys):
    keys = _fill(root)
    StageCache(root).record_model("fusion", keys["fusion_a"], "ab12" * 16 + "+fp16")
    assert main(["cache", "ls", root]) == 0
    header, *lines = capsys.readouterr().out.splitlines()
    assert header.split() == ["kind", "size", "age", "unused", "model", "key"]
    assert len(lines) == 4 and {line.split()[-1] for line in lines} == set(keys.values())
    fields = lines[0].split()
    assert fields[:3] == ["concept", "1.0", "KiB"] and fields[3].endswith("s")
    assert fields[4].endswith("s") and fields[5] == "?"
    assert [line.split()[5] for line in lines if keys["fusion_a"] in line] == ["ab12" * 4]
    assert main(["cache", "du", root, "--kind", "fusion"]) == 0
    assert capsys.readouterr().out.split() == [
        "kind", "fusion", "2", "entries", "4.0", "KiB",
        "model", "?", "1", "entries", "2.0", "KiB",
        "model", ("ab12" * 16 + "+fp16")[:24], "1", "entries", "2.0", "KiB",
        "total", "2", "entries", "4.0", "KiB"]


def test_prune_prints_by_default_deletes_with_yes_and_keeps_claimed_and_foreign(root, capsys):
    keys = _fill(root)
    assert Claims(root).acquire("content", keys["content"]) is not None  # a live claim
    before = _survivors(root)
    # 9 KiB of entries, fit 3 KiB: all but the claimed content (4 KiB alone) would go
    assert main(["cache", "prune", root, "--max-size", "3K"]) == 0
    out = capsys.readouterr().out
    assert out.count("would delete") == 3 and "Nothing was deleted" in out
    assert keys["content"] not in out and _survivors(root) == before
    assert main(["cache", "prune", root, "--max-size", "1K", "--kind", "fusion", "--yes"]) == 0
    out = capsys.readouterr().out
    assert "deleted 2 entries" in out
    gone = {f"/fusion/{k[:2]}/{k}.safetensors" for k in (keys["fusion_a"], keys["fusion_b"])}
    assert _survivors(root) == before - gone
    assert main(["cache", "prune", root, "--max-size", "0", "--yes"]) == 0
    assert "1 under a live claim kept" in capsys.readouterr().out
    left = _survivors(root)
    assert f"/content/{keys['content'][:2]}/{keys['content']}.safetensors" in left
    assert "/notes.txt" in left and any(u.startswith("-old/") for u in left)
    assert not any(u.startswith("/concept/") for u in left)


def test_prune_by_age_on_local_disk(tmp_path, capsys):
    root = str(tmp_path / "cache")
    keys = _fill(root)
    old = StageCache(root).uri("concept", keys["concept"])
    os.utime(old, (time.time() - 40 * DAY,) * 2)
    assert main(["cache", "prune", root, "--older-than", "30d", "--yes"]) == 0
    assert "deleted 1 entries" in capsys.readouterr().out
    assert not os.path.exists(old) and len(StageCache(root).uri("content", keys["content"])) > 0
    assert {e.key for e in A.scan(root).entries} == {keys["content"], keys["fusion_a"],
                                                     keys["fusion_b"]}


def test_a_claim_taken_after_the_listing_still_keeps_its_entry(tmp_path):
    root = str(tmp_path / "cache")
    keys = _fill(root)
    found = A.scan(root)
    chosen = A.select(found.entries, time.time(), max_bytes=0)
    assert len(chosen) == 4
    assert Claims(root).acquire("concept", keys["concept"]) is not None
    pruned = A.delete(root, chosen)
    assert [e.key for e in pruned.kept_claimed] == [keys["concept"]] and len(pruned.deleted) == 3
    assert StageCache(root).contains("concept", keys["concept"])


def test_bad_flags_and_a_missing_cache_are_one_line_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["cache", "prune", str(tmp_path), "--older-than", "soon"])
    assert exc.value.code == 2 and "not an age" in capsys.readouterr().err
    assert main(["cache", "prune", str(tmp_path)]) == 2
    assert "--older-than, --max-size or both" in capsys.readouterr().err
    assert main(["cache", "ls", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no such folder" in err


def test_age_is_the_last_use_and_a_prune_takes_its_records_along(tmp_path, capsys):
    root = str(tmp_path / "cache")
    keys = _fill(root)
    cache = StageCache(root)
    for name in ("concept", "content"):  # both written 40 days ago ...
        os.utime(cache.uri(name, keys[name]), (time.time() - 40 * DAY,) * 2)
    cache.record_use("content", keys["content"])  # ... and the content read just now
    cache.record_model("concept", keys["concept"], "feed" * 16)
    assert main(["cache", "ls", root, "--kind", "content"]) == 0
    ages = capsys.readouterr().out.splitlines()[1].split()[3:5]
    assert ages[0].endswith("d") and ages[1].endswith("s")  # written 40 days ago, used now
    assert main(["cache", "prune", root, "--older-than", "30d", "--yes"]) == 0
    assert "deleted 1 entries" in capsys.readouterr().out
    assert not cache.contains("concept", keys["concept"])
    assert cache.contains("content", keys["content"])
    left = _survivors(root)
    assert f"/_used/content/{keys['content']}" in left
    # no record outlives its entry (the look-alike prefix beside the cache is not ours)
    assert not any(keys["concept"] in u for u in left if not u.startswith("-old/"))


def test_prune_one_models_entries(root, capsys):
    keys = _fill(root)
    cache = StageCache(root)
    cache.record_model("concept", keys["concept"], "aaaa" * 16)
    cache.record_model("content", keys["content"], "aaaa" * 16 + "+fp16")
    cache.record_model("fusion", keys["fusion_a"], "bbbb" * 16)
    assert main(["cache", "prune", root, "--max-size", "0", "--model", "aaaa", "--yes"]) == 0
    assert "deleted 2 entries" in capsys.readouterr().out
    assert {e.key for e in A.scan(root).entries} == {keys["fusion_a"], keys["fusion_b"]}


def test_a_run_records_each_entrys_model(tiny_model_dir, images, tmp_path):
    from vct.models import model_identity

    out = tmp_path / "out"
    assert main(["translate", "--model", str(tiny_model_dir), "--reference", str(images["ref"]),
                 "--source", str(images["src_a"]), "--out", str(out), "--max-train-steps", "2",
                 "--num-inference-steps", "4", "--num-inner-steps", "1", "--quiet",
                 "--threads", "1", "--cache", str(tmp_path / "cache")]) == 0
    entries = A.scan(str(tmp_path / "cache")).entries
    assert {e.kind for e in entries} == {"concept", "content", "fusion"}
    assert {e.model for e in entries} == {model_identity(tiny_model_dir)}


def _model_folder(root, rel: str, marker: str, size: int, age_s: float, used_s: float | None):
    folder = root / rel
    folder.mkdir(parents=True)
    (folder / "weights.bin").write_bytes(b"w" * size)
    (folder / marker).write_text("{}")
    os.utime(folder / marker, (time.time() - age_s,) * 2)
    if used_s is not None:
        (folder / ".vct-last-used").touch()
        os.utime(folder / ".vct-last-used", (time.time() - used_s,) * 2)
    return folder


def test_the_model_cache_lists_and_prunes_but_never_a_folder_in_use(tmp_path, monkeypatch,
                                                                    capsys):
    root = tmp_path / "models"
    monkeypatch.setenv("VCT_MODEL_CACHE", str(root))
    old = _model_folder(root, "single-" + "1" * 24, "vct_single_file.json", 4000, 50 * DAY, None)
    busy = _model_folder(root, "2" * 64, ".complete", 3000, 50 * DAY, 60)  # loaded a minute ago
    fresh = _model_folder(root, "files/" + "3" * 64, ".complete", 2000, DAY, DAY)
    partial = root / ("4" * 64)  # a sync that never completed: not an entry
    partial.mkdir()
    (root / "notes").mkdir()
    assert main(["cache", "ls", "--model-cache"]) == 0
    out = capsys.readouterr().out
    assert "single-file" in out and "s3-model" in out and "s3-file" in out
    assert "4" * 64 not in out and "notes" not in out
    assert main(["cache", "prune", "--model-cache", "--max-size", "0", "--yes"]) == 0
    assert "1 in use kept" in capsys.readouterr().out
    assert not old.exists() and not fresh.exists() and busy.is_dir()
    assert partial.is_dir() and (root / "notes").is_dir()
    assert main(["cache", "ls"]) == 2  # neither a stage cache nor --model-cache


def test_the_cache_prune_flow_is_a_dry_run_until_told(prefect_harness, tmp_path):
    from flows.maintenance import cache_prune

    root = str(tmp_path / "cache")
    keys = _fill(root)
    assert Claims(root).acquire("content", keys["content"]) is not None
    before = _survivors(root)
    dry = cache_prune(cache_uri=root, older_than=None, max_size="0")
    assert dry["dry_run"] and dry["deleted"] == 3 and _survivors(root) == before
    done = cache_prune(cache_uri=root, older_than=None, max_size="0", dry_run=False)
    assert done["deleted"] == 3 and done["kept_protected"] >= 1
    assert {e.key for e in A.scan(root).entries} == {keys["content"]}
    with pytest.raises(ValueError, match="not both"):
        cache_prune(cache_uri=root, model_cache=True)


def test_a_prune_racing_a_run_loses_nothing_of_the_run(tiny_model_dir, images, tmp_path):
    """A pruner deleting every unclaimed entry in a loop while a run goes: the run completes
    with the same PNGs as an undisturbed one (what it stored it keeps in memory, what it
    claimed is never deleted), and the next run computes again what was pruned."""
    import threading

    def run(out: str, cache: str) -> int:
        return main(["translate", "--model", str(tiny_model_dir), "--reference",
                     str(images["ref"]), "--source", str(images["src_a"]), "--source",
                     str(images["src_b"]), "--out", str(tmp_path / out), "--max-train-steps",
                     "3", "--num-inference-steps", "4", "--num-inner-steps", "1", "--quiet",
                     "--threads", "1", "--cache", str(tmp_path / cache)])

    raced = str(tmp_path / "raced")
    os.makedirs(raced)
    stop, deleted = threading.Event(), []

    def pruner() -> None:
        while not stop.is_set():
            listing = A.list_cache(raced)
            chosen = A.select(listing.entries, time.time(), max_bytes=0,
                              protected=listing.protected)
            deleted.extend(A.prune(listing, chosen).deleted)
            time.sleep(0.01)

    thread = threading.Thread(target=pruner)
    thread.start()
    try:
        assert run("a", "raced") == 0
    finally:
        stop.set()
        thread.join()
    assert {e.kind for e in deleted} >= {"concept", "content"}  # it did race the run
    assert run("b", "quiet") == 0
    for stem in ("src_a", "src_b"):
        assert (tmp_path / "a" / f"{stem}.png").read_bytes() == \
            (tmp_path / "b" / f"{stem}.png").read_bytes()
    A.prune(A.list_cache(raced), A.list_cache(raced).entries)
    assert run("c", "raced") == 0 and {e.kind for e in A.scan(raced).entries} == {
        "concept", "content", "fusion"}
