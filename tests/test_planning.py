"""Planning is concurrent and cheap: inputs are read by a bounded pool, hashed while streaming
and checked from their header (format, size, the pixel cap) without decoding; a content cache
entry holds what fusion needs unless the trajectories are asked for."""

from __future__ import annotations

import argparse
import hashlib
import os
import struct
import threading
import time
import zlib
from pathlib import Path

import pytest
from PIL import Image, ImageFile
from PIL.PngImagePlugin import PngInfo
from safetensors.torch import load

from tests.conftest import make_image
from vct import images, storage
from vct.artifacts import load_result
from vct.batch import engine, keys
from vct.batch.jobs import Job, run_job
from vct.batch.plan import check_input, hash_inputs, plan_run
from vct.batch.settings import RunSettings
from vct.cache import StageCache
from vct.cli import build_parser, settings_from
from vct.config import ConfigError, ContentConfig, to_dict
from vct.manifest import parse_manifest


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(
        ">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def bomb_png(width: int, height: int, tail: int = 0) -> bytes:
    """A tiny PNG whose IHDR claims width x height RGB pixels (its IDAT holds almost nothing),
    optionally followed by ``tail`` junk bytes so the file outgrows the probe's head."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
            + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _png_chunk(b"IEND", b"")
            + os.urandom(tail))


def big_png(path: Path, side: int = 700) -> bytes:
    """A real PNG of random pixels, far larger than the head digest_input keeps."""
    Image.frombytes("RGB", (side, side), os.urandom(side * side * 3)).save(path)
    data = path.read_bytes()
    assert len(data) > storage.HEAD_BYTES
    return data


def png_with_big_metadata(path: Path) -> bytes:
    """A valid PNG whose text chunk before the pixels is bigger than the head: the header
    alone cannot be parsed from the head, so the planner must read the whole file."""
    info = PngInfo()
    info.add_text("comment", "x" * (storage.HEAD_BYTES + 50_000))
    make_image(0, (16, 16)).save(path, pnginfo=info)
    data = path.read_bytes()
    assert len(data) > storage.HEAD_BYTES
    return data


def forbid_decoding(monkeypatch) -> None:
    """From here on, any pixel decode of a file fails the test (call it once the inputs are
    written)."""
    def refuse(*_a, **_k):
        raise AssertionError("planning decoded pixels")
    Image.init()  # Pillow's lazy plugin imports build images of their own
    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)
    monkeypatch.setattr(images, "decode_image", refuse)


# ---------------------------------------------------------------- streaming digest
@pytest.mark.parametrize("size", [0, 1, 1000, storage.HEAD_BYTES, storage.HEAD_BYTES + 1,
                                  3 * 1024 * 1024 + 17])
def test_digest_is_the_sha256_of_every_byte_and_keeps_only_the_head(tmp_path, size):
    data = os.urandom(size)
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    sha, head, got_size = storage.digest_input(str(path))
    assert sha == _sha(data) and got_size == size
    assert head == data[:storage.HEAD_BYTES]
    sha2, head2, _ = storage.digest_input(str(path), head_bytes=10)
    assert sha2 == sha and head2 == data[:10]


def test_digest_applies_the_input_rules_of_read_input(tmp_path, monkeypatch):
    path = tmp_path / "big.bin"
    path.write_bytes(b"y" * 5000)
    monkeypatch.setenv(storage.ENV_MAX_INPUT_BYTES, "4096")
    with pytest.raises(storage.InputTooLarge, match="big.bin"):
        storage.digest_input(str(path))
    assert storage.digest_input(str(path), max_bytes=5000)[2] == 5000
    with pytest.raises(storage.NotARegularFile, match="character device"):
        storage.digest_input("/dev/zero")
    with pytest.raises(storage.NotARegularFile, match="directory"):
        storage.digest_input(str(tmp_path))
    with pytest.raises(storage.StorageNotFound, match="missing.png"):
        storage.digest_input(str(tmp_path / "missing.png"))


def test_digest_and_planning_on_s3(s3_bucket, tmp_path, monkeypatch):
    """On a real S3 server: the streamed hash of a large object, its head, and the same row
    errors (bomb, non-image, missing) as locally, with several reads at once."""
    big = big_png(tmp_path / "big.png")
    small = (tmp_path / "small.png")
    make_image(1, (16, 16)).save(small)
    objects = {"big.png": big, "small.png": small.read_bytes(),
               "bomb.png": bomb_png(100_000, 100_000, tail=storage.HEAD_BYTES),
               "text.png": b"not an image"}
    for name, data in objects.items():
        storage.write_bytes(f"{s3_bucket}/in/{name}", data)
    forbid_decoding(monkeypatch)
    # one client serves every planning thread without discarding connections
    assert storage.s3_config().max_pool_connections >= RunSettings.model_fields[
        "plan_threads"].metadata[1].le
    sha, head, size = storage.digest_input(f"{s3_bucket}/in/big.png")
    assert (sha, head, size) == (_sha(big), big[:storage.HEAD_BYTES], len(big))
    with pytest.raises(storage.InputTooLarge):
        storage.digest_input(f"{s3_bucket}/in/big.png", max_bytes=len(big) - 1)
    uris = [f"{s3_bucket}/in/{n}" for n in (*objects, "missing.png")]
    out = hash_inputs(uris + uris[:2], threads=4)
    assert list(out) == uris  # distinct, first-seen order
    assert out[uris[0]] == _sha(big) and out[uris[1]] == _sha(objects["small.png"])
    assert isinstance(out[uris[2]], images.ImageTooLarge) and "bomb.png" in str(out[uris[2]])
    assert "not a readable image" in str(out[uris[3]]) and "text.png" in str(out[uris[3]])
    assert isinstance(out[uris[4]], storage.StorageNotFound)


# ---------------------------------------------------------------- bounded concurrency
def test_inputs_are_read_by_at_most_plan_threads_at_once(tmp_path):
    """Each read waits (up to a second) for `threads` reads to be in flight: a serial planner
    peaks at 1, an unbounded one above `threads`."""
    paths = []
    for i in range(12):
        paths.append(tmp_path / f"{i}.png")
        make_image(i, (16, 16)).save(paths[-1])
    state = {"active": 0, "peak": 0}
    cond = threading.Condition()

    def digest(uri: str):
        with cond:
            state["active"] += 1
            state["peak"] = max(state["peak"], state["active"])
            cond.notify_all()
            cond.wait_for(lambda: state["active"] >= threads, timeout=0.5)
        time.sleep(0.01)
        try:
            return storage.digest_input(uri)
        finally:
            with cond:
                state["active"] -= 1
    for threads in (1, 3, 5):
        state["peak"] = 0
        uris = [str(p) for p in paths]
        out = hash_inputs(uris, digest, threads=threads)
        assert state["peak"] == threads, (threads, state)
        assert out == {u: _sha(Path(u).read_bytes()) for u in uris}  # same order, same values


def test_plan_threads_reaches_the_planner(tmp_path, tiny_model_dir, monkeypatch):
    """engine.plan reads with settings.plan_threads threads (storage.digest_input instrumented)."""
    state = {"active": 0, "peak": 0}
    lock = threading.Lock()
    real = storage.digest_input

    def counting(uri, *a, **k):
        with lock:
            state["active"] += 1
            state["peak"] = max(state["peak"], state["active"])
        time.sleep(0.2)
        try:
            return real(uri, *a, **k)
        finally:
            with lock:
                state["active"] -= 1
    monkeypatch.setattr(storage, "digest_input", counting)
    rows = []
    for i in range(6):
        make_image(i, (16, 16)).save(tmp_path / f"s{i}.png")
        make_image(i + 10, (16, 16)).save(tmp_path / f"r{i}.png")
        rows.append(f"{tmp_path / f's{i}.png'},{tmp_path / f'r{i}.png'},p{i}")
    m = tmp_path / "m.csv"
    m.write_text("source,reference,pair_id\n" + "\n".join(rows) + "\n")
    plan = engine.plan(engine.prepare(str(m), str(tmp_path / "out"), str(tiny_model_dir),
                                      {"plan_threads": 2}))
    assert len(plan.pairs) == 6 and not plan.errors
    assert state["peak"] == 2
    assert plan.pairs[3].source_sha256 == _sha((tmp_path / "s3.png").read_bytes())


def test_plan_threads_is_a_checked_flag():
    parser = build_parser()
    args = parser.parse_args(["run", "m.csv", "--output", "o", "--model", "tiny",
                              "--plan-threads", "3", "--keep-trajectories"])
    settings = settings_from(args)
    assert settings.plan_threads == 3 and settings.keep_trajectories is True
    assert RunSettings().plan_threads == 8 and RunSettings().keep_trajectories is False
    for bad in ("0", "257"):
        args = parser.parse_args(["run", "m.csv", "--output", "o", "--model", "tiny",
                                  "--plan-threads", bad])
        with pytest.raises(ConfigError, match="plan_threads"):
            settings_from(args)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert "--plan-threads" in sub.choices["run"].format_help()


# ---------------------------------------------------------------- header checks
def test_a_decompression_bomb_is_refused_from_its_header(tmp_path, tiny_model_dir,
                                                        monkeypatch):
    """A few hundred bytes claiming 10^10 pixels (past Pillow's own limit) and one claiming
    81 MP (under Pillow's, over ours): both rows fail at plan time naming the file, nothing is
    decoded, and the bomb with a long tail is never read past its head."""
    (tmp_path / "bomb.png").write_bytes(bomb_png(100_000, 100_000))
    (tmp_path / "quiet.png").write_bytes(bomb_png(9000, 9000, tail=2 * storage.HEAD_BYTES))
    make_image(1, (16, 16)).save(tmp_path / "ref.png")
    make_image(0, (16, 16)).save(tmp_path / "good.png")
    forbid_decoding(monkeypatch)
    refused = []

    def no_full_read(uri):
        refused.append(uri)
        raise AssertionError(f"read {uri} whole")
    with pytest.raises(images.ImageTooLarge, match=r"quiet.png: 9000x9000 is larger than the "
                                                   r"64000000 pixel cap"):
        check_input(str(tmp_path / "quiet.png"), read=no_full_read)
    assert not refused
    m = tmp_path / "m.csv"
    m.write_text("source,reference,pair_id\n"
                 f"{tmp_path / 'bomb.png'},{tmp_path / 'ref.png'},bomb\n"
                 f"{tmp_path / 'good.png'},{tmp_path / 'quiet.png'},quiet\n"
                 f"{tmp_path / 'good.png'},{tmp_path / 'ref.png'},good\n")
    plan = engine.plan(engine.prepare(str(m), str(tmp_path / "out"), str(tiny_model_dir)))
    assert [p.row.pair_id for p in plan.pairs] == ["good"]
    reasons = {e.pair_id: e.reason for e in plan.errors}
    assert f"source {tmp_path / 'bomb.png'}" in reasons["bomb"]
    assert "pixel cap" in reasons["bomb"]
    assert f"reference {tmp_path / 'quiet.png'}: 9000x9000" in reasons["quiet"]


def test_the_pixel_cap_is_vct_max_pixels(tmp_path, monkeypatch):
    make_image(0, (40, 40)).save(tmp_path / "a.png")
    uri = str(tmp_path / "a.png")
    assert isinstance(check_input(uri), str)
    monkeypatch.setenv(images.ENV_MAX_PIXELS, "1000")
    with pytest.raises(images.ImageTooLarge, match="40x40 is larger than the 1000 pixel cap"):
        check_input(uri)
    assert isinstance(hash_inputs([uri])[uri], images.ImageTooLarge)
    monkeypatch.setenv(images.ENV_MAX_PIXELS, "1600")
    assert check_input(uri) == _sha((tmp_path / "a.png").read_bytes())
    # Above Pillow's warning limit the cap is ours: a 9000x10000 header passes the probe.
    monkeypatch.setenv(images.ENV_MAX_PIXELS, "100000000")
    assert images.probe_image(bomb_png(9000, 10000), "ok.png")[1:3] == (9000, 10000)
    for bad in ("0", "lots", str(10 ** 12)):
        monkeypatch.setenv(images.ENV_MAX_PIXELS, bad)
        with pytest.raises(ValueError, match="VCT_MAX_PIXELS"):
            images.max_pixels()


def test_non_images_and_missing_files_fail_their_rows(tmp_path, tiny_model_dir, monkeypatch):
    (tmp_path / "notes.png").write_text("not an image")
    (tmp_path / "empty.png").write_bytes(b"")
    junk = b"\xff" * (storage.HEAD_BYTES + 1000)
    (tmp_path / "junk.png").write_bytes(b"\x89PNG\r\n\x1a\n" + junk)  # big, broken header
    make_image(1, (16, 16)).save(tmp_path / "ref.png")
    make_image(0, (16, 16)).save(tmp_path / "good.png")
    forbid_decoding(monkeypatch)
    m = tmp_path / "m.csv"
    names = ("notes", "empty", "junk", "missing")
    m.write_text("source,reference,pair_id\n" + "".join(
        f"{tmp_path / f'{n}.png'},{tmp_path / 'ref.png'},{n}\n" for n in names)
        + f"{tmp_path / 'good.png'},{tmp_path / 'ref.png'},good\n")
    plan = engine.plan(engine.prepare(str(m), str(tmp_path / "out"), str(tiny_model_dir)))
    assert [p.row.pair_id for p in plan.pairs] == ["good"]
    reasons = {e.pair_id: e.reason for e in plan.errors}
    assert set(reasons) == set(names)
    for name in names:
        reason = reasons[name]
        assert reason.startswith("source ") and str(tmp_path / f"{name}.png") in reason, reason
    assert "not a readable image" in reasons["notes"] and "empty file" in reasons["empty"]
    assert "not a readable image" in reasons["junk"] and "not found" in reasons["missing"]


def test_a_header_larger_than_the_head_is_read_whole(tmp_path):
    """A valid PNG whose metadata outgrows the head: probed again from the whole file, and
    its hash is that of the whole file."""
    data = png_with_big_metadata(tmp_path / "meta.png")
    reads = []

    def read(uri):
        reads.append(uri)
        return storage.read_input(uri)
    assert check_input(str(tmp_path / "meta.png"), read=read) == _sha(data)
    assert reads == [str(tmp_path / "meta.png")]
    big = big_png(tmp_path / "big.png")  # an ordinary large image needs only its head
    reads.clear()
    assert check_input(str(tmp_path / "big.png"), read=read) == _sha(big)
    assert reads == []


# ---------------------------------------------------------------- lean content entries
CONTENT = ContentConfig(num_inference_steps=3, num_inner_steps=1, resolution=64)


def test_content_entries_hold_the_trajectories_only_when_asked(models, images, tmp_path):
    """Default: x_T and the embeddings only (what fusion reads); with keep_trajectories the
    inversion latents and the reconstruction too, under another key."""
    data = Path(images["src_a"]).read_bytes()
    cache = StageCache(str(tmp_path / "cache"))
    lean_key = keys.content_key(_sha(data), models.identity, CONTENT)
    full_key = keys.content_key(_sha(data), models.identity, CONTENT, keep_trajectories=True)
    assert lean_key != full_key
    lean = Job("content", lean_key, str(images["src_a"]), to_dict(CONTENT))
    full = Job("content", full_key, str(images["src_a"]), to_dict(CONTENT),
               store={"keep_trajectories": True})
    for job in (lean, full):
        assert run_job(models, job, cache).ok
    lean_bytes = Path(cache.uri("content", lean_key)).read_bytes()
    full_bytes = Path(cache.uri("content", full_key)).read_bytes()
    assert set(load(lean_bytes)) == {"x_T", "embeddings", "reconstruction"}
    assert set(load(full_bytes)) == {"x_T", "embeddings", "inversion_latents", "reconstruction"}
    got_lean = load_result("content", lean_bytes, key=lean_key).result
    got_full = load_result("content", full_bytes, key=full_key).result
    assert got_lean.inversion_latents is None
    assert (got_lean.reconstruction == got_full.reconstruction).all()
    assert got_full.reconstruction.shape[0] == CONTENT.num_inference_steps + 1
    assert got_full.inversion_latents.shape[0] == CONTENT.num_inference_steps + 1
    assert (got_lean.x_T == got_full.x_T).all()
    assert (got_lean.embeddings == got_full.embeddings).all()
    assert len(lean_bytes) < len(full_bytes)


def test_keep_trajectories_is_in_the_content_key_only_when_on(tmp_path):
    make_image(0, (16, 16)).save(tmp_path / "s.png")
    make_image(1, (16, 16)).save(tmp_path / "r.png")
    m = parse_manifest(f"source,reference\n{tmp_path / 's.png'},{tmp_path / 'r.png'}\n".encode(),
                       str(tmp_path / "m.csv"))
    hashes = hash_inputs([str(tmp_path / "s.png"), str(tmp_path / "r.png")])
    plans = {keep: plan_run(m, hashes, "m" * 64, RunSettings(keep_trajectories=keep),
                            str(tmp_path / "out"), "run") for keep in (False, True)}
    lean, full = plans[False].content_jobs[0], plans[True].content_jobs[0]
    src_sha = hashes[str(tmp_path / "s.png")]
    assert lean.key == keys.content_key(src_sha, "m" * 64, ContentConfig())  # unchanged key
    assert lean.store == {} and full.store == {"keep_trajectories": True}
    assert full.key != lean.key and full.config == lean.config
    assert Job.from_dict(full.to_dict()) == full  # survives the rank / shard hand-off
    assert plans[True].concept_jobs[0].key == plans[False].concept_jobs[0].key


def test_per_row_concept_settings_make_their_own_concept(tmp_path):
    """Two rows of one reference with other concept settings learn two concepts, each keyed by
    its own settings; the row without them gets the run's concept."""
    from vct.config import ConceptConfig

    make_image(0, (16, 16)).save(tmp_path / "s.png")
    make_image(1, (16, 16)).save(tmp_path / "r.png")
    s, r = tmp_path / "s.png", tmp_path / "r.png"
    m = parse_manifest(f"source,reference,max_train_steps,num_vectors,output_name\n"
                       f"{s},{r},,,plain\n{s},{r},100,1,tuned\n".encode(),
                       str(tmp_path / "m.csv"))
    hashes = hash_inputs([str(s), str(r)])
    plan = plan_run(m, hashes, "m" * 64, RunSettings(), str(tmp_path / "out"), "run")
    assert len(plan.concept_jobs) == 2
    by_name = {p.row.output_name: p for p in plan.pairs}
    tuned = ConceptConfig(max_train_steps=100, num_vectors=1)
    assert by_name["tuned"].concept == tuned
    assert by_name["tuned"].concept_key == keys.concept_key(hashes[str(r)], "m" * 64, tuned)
    assert by_name["plain"].concept == RunSettings().concept
