"""Several reference images per concept: a ';' list, a folder or an S3 prefix in the
`reference` cell; one concept learns from all of them, keyed by the set of their hashes."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.conftest import make_image
from vct import storage
from vct.batch import engine, keys, library
from vct.concept import ImageOrder, learn_concept
from vct.config import ConceptConfig
from vct.manifest import parse_manifest
from vct.models import model_identity

FAST = {"concept": {"max_train_steps": 2, "batch_microsteps": True},
        "content": {"num_inference_steps": 4, "num_inner_steps": 1}, "threads": 1}


@pytest.fixture
def refs(tmp_path) -> dict[str, Path]:
    paths = {}
    for name, kind in (("house", 0), ("r1", 1), ("r2", 3), ("r3", 5)):
        paths[name] = tmp_path / "in" / f"{name}.png"
        paths[name].parent.mkdir(exist_ok=True)
        make_image(kind, (64, 64)).save(paths[name])
    folder = tmp_path / "in" / "style"
    folder.mkdir()
    for name in ("r1", "r2"):
        (folder / f"{name}.png").write_bytes(paths[name].read_bytes())
    (folder / "notes.txt").write_text("not an image: ignored")
    (tmp_path / "in" / "empty").mkdir()
    return paths


def test_a_reference_cell_may_list_images_each_resolved_like_a_path(tmp_path):
    data = (b"source,reference\n"
            b"a.png, r1.png ; ../r2.png\n"
            b"a.png,style/\n"
            b"a.png,r1.png;;r2.png\n")
    m = parse_manifest(data, str(tmp_path / "jobs" / "m.csv"))
    assert m.rows[0].reference == f"{tmp_path}/jobs/r1.png;{tmp_path}/r2.png"
    assert m.rows[1].reference == f"{tmp_path}/jobs/style/"
    assert [str(e) for e in m.errors] == ["line 4: reference 'r1.png;;r2.png' has an empty "
                                          "part between ';'"]
    on_s3 = parse_manifest(b"source,reference\na.png,refs/;b.png\n", "s3://bkt/jobs/m.csv")
    assert on_s3.rows[0].reference == "s3://bkt/jobs/refs/;s3://bkt/jobs/b.png"


def _plan(tmp_path: Path, rows: list[str], model: Path, **settings):
    manifest = tmp_path / "m.csv"
    manifest.write_text("source,reference,pair_id\n" + "\n".join(rows) + "\n")
    request = engine.prepare(str(manifest), str(tmp_path / "out"), str(model),
                             {**FAST, "cache_uri": str(tmp_path / "cache"), **settings})
    return engine.plan(request)


def test_one_concept_per_set_of_images_whatever_the_order_or_the_form(tmp_path, refs,
                                                                      tiny_model_dir):
    house, r1, r2, r3 = refs["house"], refs["r1"], refs["r2"], refs["r3"]
    style = tmp_path / "in" / "style"
    plan = _plan(tmp_path, [f'{house},"{r1};{r2}",list', f'{house},"{r2};{r1}",reversed',
                            f"{house},{style},folder", f'{house},"{r1};{r1}",twice',
                            f'{house},"{r1};{r2};{r3}",three',
                            f'{house},"{r1};{tmp_path / "in" / "gone.png"}",missing',
                            f"{house},{tmp_path / 'in' / 'empty'},empty"],
                 tiny_model_dir, max_reference_images=2)
    by_id = {p.row.pair_id: p for p in plan.pairs}
    assert set(by_id) == {"list", "reversed", "folder", "twice"}
    sha = {name: keys.sha256_bytes(refs[name].read_bytes()) for name in ("r1", "r2")}
    assert len({by_id[n].concept_key for n in ("list", "reversed", "folder")}) == 1
    assert by_id["list"].concept_key == keys.concept_key(
        keys.references_digest([sha["r2"], sha["r1"]]), plan.model_identity,
        by_id["list"].concept)
    # an image named twice is one image: the one-image concept, keyed as before
    assert by_id["twice"].concept_key == keys.concept_key(sha["r1"], plan.model_identity,
                                                          by_id["twice"].concept)
    jobs = {j.key: j for j in plan.concept_jobs}
    assert len(jobs) == 2
    assert sorted(jobs[by_id["list"].concept_key].inputs) == sorted([str(r1), str(r2)])
    assert [s for _, s in by_id["list"].reference_images] == sorted(sha.values())
    reasons = {e.pair_id: e.reason for e in plan.errors}
    assert "3 images, more than max_reference_images (2)" in reasons["three"]
    assert "gone.png" in reasons["missing"] and "not found" in reasons["missing"].lower()
    assert "empty: no images" in reasons["empty"]


def test_the_learner_draws_every_image_shuffled_like_the_original():
    order = ImageOrder(3, seed=0)
    first = order.take(300)  # one epoch: each image REPEATS times, shuffled
    assert Counter(first.tolist()) == {0: 100, 1: 100, 2: 100}
    assert first[:20].tolist() != sorted(first[:20].tolist())
    assert torch.equal(ImageOrder(3, seed=0).take(300), first)
    assert ImageOrder(1, seed=0).take(5).tolist() == [0] * 5


def test_a_concept_of_two_images_differs_from_each_and_one_in_a_list_is_the_same(models,
                                                                                refs):
    cfg = ConceptConfig(max_train_steps=2, batch_microsteps=True, reference_resolution=32)
    one, two = (Image.open(refs[n]).convert("RGB") for n in ("r1", "r2"))
    alone = learn_concept(models, one, cfg)
    assert torch.equal(learn_concept(models, [one], cfg).vectors, alone.vectors)
    both = learn_concept(models, [one, two], cfg)
    assert not torch.equal(both.vectors, alone.vectors)
    assert not torch.equal(both.vectors, learn_concept(models, two, cfg).vectors)


def test_sidecars_report_and_concept_file_show_every_reference_image(tmp_path, refs,
                                                                     tiny_model_dir):
    manifest = tmp_path / "m.csv"
    manifest.write_text(f'source,reference,pair_id\n{refs["house"]},"{refs["r1"]};{refs["r2"]}",p\n')
    request = engine.prepare(str(manifest), str(tmp_path / "out"), str(tiny_model_dir),
                             {**FAST, "cache_uri": str(tmp_path / "cache")}, run_id="r")
    summary = engine.run(request, write_report=False)
    assert summary.status == "complete"
    run = tmp_path / "out" / "r"
    sidecar = json.loads((run / "p.json").read_text())
    shown = {(r["uri"], r["sha256"]) for r in sidecar["references"]}
    assert shown == {(str(refs[n]), keys.sha256_bytes(refs[n].read_bytes())) for n in ("r1", "r2")}
    pair = json.loads((run / "run.json").read_text())["pairs"][0]
    assert str(refs["r1"]) in pair["reference_uri"] and str(refs["r2"]) in pair["reference_uri"]
    file = library.read_concept_file(str(run / sidecar["concept_file"]),
                                     model_identity(tiny_model_dir))
    assert {u for u, _ in file.references} == {str(refs["r1"]), str(refs["r2"])}
    assert file.key == sidecar["cache"]["concept"]["key"]
    assert sidecar["concept_file"].startswith("concepts/r1-")


def test_an_s3_prefix_is_every_image_under_it(s3_bucket, refs, tmp_path, tiny_model_dir):
    for name in ("r1", "r2"):
        storage.write_bytes(f"{s3_bucket}/style/{name}.png", refs[name].read_bytes())
    storage.write_bytes(f"{s3_bucket}/style/README.md", b"ignored")
    plan = _plan(tmp_path, [f"{refs['house']},{s3_bucket}/style/,p",
                            f'{refs["house"]},"{refs["r1"]};{refs["r2"]}",local'], tiny_model_dir)
    (job,) = plan.concept_jobs  # the same two images: one concept
    assert sorted(job.inputs) == [f"{s3_bucket}/style/r1.png", f"{s3_bucket}/style/r2.png"]
    assert plan.pairs[0].concept_key == plan.pairs[1].concept_key


def test_an_image_of_the_set_that_does_not_decode_fails_its_rows_naming_it(tmp_path, refs,
                                                                           tiny_model_dir):
    """Its header passes planning; its pixels fail when the concept job reads them."""
    half = tmp_path / "in" / "half.png"
    data = refs["r2"].read_bytes()
    half.write_bytes(data[:len(data) // 2])
    manifest = tmp_path / "m.csv"
    manifest.write_text(f'source,reference,pair_id\n{refs["house"]},"{refs["r1"]};{half}",p\n')
    request = engine.prepare(str(manifest), str(tmp_path / "out"), str(tiny_model_dir),
                             {**FAST, "cache_uri": str(tmp_path / "cache")}, run_id="r")
    (pair,) = engine.run(request, write_report=False).pairs
    assert pair.status == "bad" and pair.reason.startswith(f"reference {half}:"), pair.reason
