"""The concept library: a run writes every concept it used under ``concepts/`` with its
provenance, and a manifest may name such a file as a reference instead of an image."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tests.conftest import make_image
from tests.test_batch_engine import FakeRunner, _stored
from tests.test_shards import in_process
from vct import storage
from vct.artifacts import Stored, read_textual_inversion
from vct.batch import engine, library, shards
from vct.batch.jobs import Job, store
from vct.batch.settings import RunSettings
from vct.cache import StageCache
from vct.concept import ConceptResult, ConceptStats
from vct.config import ConceptConfig
from vct.models import model_identity

FAST = {"concept": {"max_train_steps": 2, "batch_microsteps": True},
        "content": {"num_inference_steps": 4, "num_inner_steps": 1}, "threads": 1}


@pytest.fixture
def pictures(tmp_path) -> dict[str, Path]:
    paths = {}
    for name, kind in (("house", 0), ("stripes", 1)):
        paths[name] = tmp_path / "in" / f"{name}.png"
        paths[name].parent.mkdir(exist_ok=True)
        make_image(kind, (64, 64)).save(paths[name])
    return paths


def _run(tmp_path: Path, name: str, rows: str, model: Path, cache: str, runner=None,
         output: str | None = None):
    manifest = tmp_path / f"{name}.csv"
    manifest.write_text("source,reference,pair_id\n" + rows)
    request = engine.prepare(str(manifest), output or str(tmp_path / name), str(model),
                             {**FAST, "cache_uri": cache}, run_id="r1")
    return engine.run(request, write_report=False, runner=runner)


def test_a_run_keeps_its_concept_and_a_manifest_can_name_it_instead_of_the_image(
        tmp_path, pictures, tiny_model_dir):
    first = _run(tmp_path, "first", f"{pictures['house']},{pictures['stripes']},p1\n",
                 tiny_model_dir, str(tmp_path / "cache1"))
    assert first.status == "complete" and first.counts["concepts_computed"] == 1
    run = tmp_path / "first" / "r1"
    sidecar = json.loads((run / "p1.json").read_text())
    key = sidecar["cache"]["concept"]["key"]
    assert sidecar["concept_file"] == f"concepts/stripes-{key[:12]}.safetensors"
    path = run / sidecar["concept_file"]
    # the diffusers textual-inversion format: one token, n x D vectors
    vectors = load_file(str(path))
    assert list(vectors) == ["<s2>"] and vectors["<s2>"].shape == (3, 32)
    file = library.read_concept_file(str(path), model_identity(tiny_model_dir))
    assert file.key == key  # the key the run computed, from the file's provenance
    meta = read_textual_inversion(path.read_bytes())[1]
    assert meta["references"] == [{"uri": str(pictures["stripes"]),
                                   "sha256": sidecar["reference"]["sha256"]}]
    assert meta["model_identity"] == model_identity(tiny_model_dir)
    assert meta["config"]["max_train_steps"] == 2 and meta["concept_key"] == key

    # a second manifest names the file: no concept job, the same PNG (content and fusion
    # recomputed in a fresh cache, at the same thread count)
    second = _run(tmp_path, "second", f"{pictures['house']},{path},p1\n", tiny_model_dir,
                  str(tmp_path / "cache2"))
    assert second.status == "complete", second.pairs
    concept = second.stages["concept"]
    assert concept.computed == [] and concept.unet_evals == {} and concept.cached == [key]
    assert "concept_grad" not in second.stages["content"].unet_evals
    again = tmp_path / "second" / "r1"
    assert (again / "p1.png").read_bytes() == (run / "p1.png").read_bytes()
    assert json.loads((again / "p1.json").read_text())["output_key"] == sidecar["output_key"]
    # its own library holds the same concept under the same name and bytes
    assert (again / sidecar["concept_file"]).read_bytes() == path.read_bytes()


def _concept_file(path: Path, identity: str, width: int = 32, **config) -> Path:
    cfg = ConceptConfig(**config)
    stored = Stored(ConceptResult(torch.ones(cfg.num_vectors, width), cfg,
                                  ConceptStats([0.5], 1e-3)),
                    {"input_uri": "/styles/stripes.png", "reference_sha256": "a" * 64,
                     "model": {"identity": identity}})
    path.write_bytes(library.concept_file_bytes(stored, "b" * 64, identity))
    return path


def test_a_concept_file_another_model_or_hand_made_is_a_bad_row_naming_why(
        tmp_path, pictures, tiny_model_dir):
    ours = model_identity(tiny_model_dir)
    other = _concept_file(tmp_path / "other.safetensors", "c" * 64)
    good = _concept_file(tmp_path / "good.safetensors", ours)
    wide = _concept_file(tmp_path / "wide.safetensors", ours, width=768)
    with safe_open(str(good), "pt") as f:  # its settings edited, its checksum kept
        header = json.loads(f.metadata()["vct"])
        tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    header["meta"]["config"]["max_train_steps"] = 501
    edited = tmp_path / "edited.safetensors"
    save_file(tensors, str(edited), metadata={"vct": json.dumps(header)})
    plain = tmp_path / "plain.safetensors"  # a textual inversion from elsewhere
    save_file({"<s2>": torch.ones(3, 32)}, str(plain))
    house = pictures["house"]
    manifest = tmp_path / "m.csv"
    manifest.write_text("source,reference,pair_id,seed\n"
                        f"{house},{other},other,\n{house},{wide},wide,\n"
                        f"{house},{edited},edited,\n{house},{plain},plain,\n"
                        f"{house},{good},reseeded,7\n{house},{good},ok,0\n")
    plan = engine.plan(engine.prepare(str(manifest), str(tmp_path / "out"), str(tiny_model_dir),
                                      {**FAST, "cache_uri": str(tmp_path / "cache")}))
    reasons = {e.pair_id: e.reason for e in plan.errors}
    assert f"learned on model {'c' * 64}" in reasons["other"]
    assert f"this run's model is {ours}" in reasons["other"] and str(other) in reasons["other"]
    assert "768 wide" in reasons["wide"] and "is 32" in reasons["wide"]
    assert "checksum" in reasons["edited"]
    assert "without vct's header" in reasons["plain"]
    assert "seed 7" in reasons["reseeded"] and "concept file" in reasons["reseeded"]
    assert [p.row.pair_id for p in plan.pairs] == ["ok"]
    assert plan.concept_jobs == [] and plan.given_concepts == [plan.pairs[0].concept_key]


def test_the_library_is_written_to_s3_and_reads_back(s3_bucket, pictures, tmp_path,
                                                      tiny_model_dir):
    for name in ("house", "stripes"):
        storage.write_bytes(f"{s3_bucket}/in/{name}.png", pictures[name].read_bytes())
    rows = f"{s3_bucket}/in/house.png,{s3_bucket}/in/stripes.png,p1\n"
    summary = _run(tmp_path, "m", rows, tiny_model_dir, f"{s3_bucket}/cache",
                   runner=FakeRunner(), output=f"{s3_bucket}/out")
    assert summary.status == "complete"
    sidecar = json.loads(storage.read_bytes(f"{s3_bucket}/out/r1/p1.json"))
    uri = f"{s3_bucket}/out/r1/{sidecar['concept_file']}"
    assert storage.list_uris(f"{s3_bucket}/out/r1/concepts") == [uri]
    file = library.read_concept_file(uri, model_identity(tiny_model_dir))
    assert file.key == sidecar["cache"]["concept"]["key"]
    assert file.stored.result.vectors.shape == (3, 4)  # the fake runner's concept


def test_a_concept_a_rerun_already_wrote_is_not_written_again(pictures, s3_bucket):
    """write_concepts lists the folder once and writes only what is missing."""
    job = Job("concept", "d" * 64, str(pictures["stripes"]),
              ConceptConfig().model_dump(mode="json"))
    cache = f"{s3_bucket}/cache"
    store(StageCache(cache), "concept", job.key, _stored(job))
    run = f"{s3_bucket}/run"
    name = "concepts/stripes-dddddddddddd.safetensors"
    assert library.write_concepts(run, "m" * 64, {job.key: name}, cache) == {job.key: name}
    storage.write_bytes(f"{run}/{name}", b"kept")
    assert library.write_concepts(run, "m" * 64, {job.key: name}, cache) == {job.key: name}
    assert storage.read_bytes(f"{run}/{name}") == b"kept"


@pytest.mark.parametrize("path", ["pool", "shards"])
def test_both_paths_fuse_a_concept_files_concept_from_the_cache(tmp_path, pictures,
                                                                tiny_model_dir, path):
    """A run in one pool and a sharded one: no concept job runs, the pair is fused and its
    sidecar says its concept came from the cache."""
    ours = model_identity(tiny_model_dir)
    file = _concept_file(tmp_path / "look.safetensors", ours)
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"source,reference,pair_id\n{pictures['house']},{file},p\n")
    request = engine.prepare(str(manifest), str(tmp_path / "out"), str(tiny_model_dir),
                             {**FAST, "cache_uri": str(tmp_path / "cache")}, run_id="r")
    plan, runner, executor = engine.plan(request), FakeRunner(), request.executor()
    if path == "pool":
        results = engine.run_pool(plan, executor, runner=runner).pairs
    else:
        results = shards.run_sharded(plan, executor.cache_uri, RunSettings(shards=2), {},
                                     in_process(executor, runner)).pairs
    assert results["p"].status == "ok" and runner.ran == {"content": 1, "fusion": 1}
    sidecar = json.loads((tmp_path / "out" / "r" / "p.json").read_text())
    assert sidecar["cache"]["concept"] == {"key": plan.pairs[0].concept_key, "hit": True}
    assert sidecar["references"] == [{"uri": "/styles/stripes.png", "sha256": "a" * 64}]
    assert (tmp_path / "out" / "r" / sidecar["concept_file"]).is_file()
