"""The batch engine's rules without Prefect or a model: resume, skip, failure attribution,
counts, run status, `_SUCCESS`, output names. A fake runner stands in for the executor and
stores small, valid stage results, so each test takes milliseconds."""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from tests.conftest import make_image
from tests.test_shards import in_process
from vct import storage
from vct.artifacts import FusedImages, Stored, result_bytes
from vct.batch import engine, outputs, shards
from vct.batch.jobs import Job, JobOutcome
from vct.batch.plan import hash_inputs, plan_run
from vct.batch.settings import RunSettings
from vct.batch.workers import ExecutorSettings
from vct.cache import StageCache
from vct.concept import ConceptResult, ConceptStats
from vct.config import ConceptConfig, ConfigError, ContentConfig
from vct.content import ContentResult, ContentStats
from vct.manifest import parse_manifest

T = 3
pytest_plugins = ("tests.fault_proxy",)  # the fault_proxy fixture


class FakeRunner:
    """Stores a valid entry for every job it is given, except the keys told to fail and the
    inputs told not to decode."""

    def __init__(self, fail: set[str] | None = None, undecodable: set[str] | None = None):
        self.fail = fail or set()
        self.undecodable = undecodable or set()
        self.ran: Counter[str] = Counter()

    def __call__(self, jobs: list[Job], settings: ExecutorSettings, **_: object):
        cache = StageCache(settings.cache_uri)
        out = []
        for job in jobs:
            self.ran[job.kind] += 1
            if job.key in self.fail or job.input_uri in self.fail:
                out.append(JobOutcome(job.kind, job.key, False, 0, 0.0, error=f"boom {job.kind}"))
                continue
            if job.input_uri in self.undecodable:
                out.append(JobOutcome(job.kind, job.key, False, 0, 0.0, bad_input=True,
                                      error=f"{job.input_uri}: image data is truncated"))
                continue
            cache.put(job.kind, job.key, result_bytes(job.kind, _stored(job)))
            out.append(JobOutcome(job.kind, job.key, True, 0, 0.01,
                                  unet_evals={job.kind: 1}))
        return out


class Overlapping:
    """Wraps a function to count its calls and the most of them running at once; each call
    is held 0.2 s, so calls made concurrently do overlap."""

    def __init__(self, fn):
        self.fn, self.calls, self.peak, self._active = fn, 0, 0, 0
        self._lock = threading.Lock()

    def __call__(self, *args, **kwargs):
        with self._lock:
            self.calls += 1
            self._active += 1
            self.peak = max(self.peak, self._active)
        time.sleep(0.2)
        try:
            return self.fn(*args, **kwargs)
        finally:
            with self._lock:
                self._active -= 1


def _stored(job: Job) -> Stored:
    prov = {"cache_key": job.key, "unet_evals": {job.kind: 1}, "seconds": 0.01,
            "model": {"identity": "m" * 64, "source": "fake"}}
    if job.kind == "concept":  # the reference, as a concept job records it
        prov["input_uri"] = job.input_uri
        prov["reference_sha256"] = hashlib.sha256(storage.read_input(job.input_uri)).hexdigest()
        return Stored(ConceptResult(torch.zeros(3, 4), ConceptConfig(**job.config),
                                    ConceptStats([0.5], 2e-3, {"concept": 0.01})), prov)
    if job.kind == "content":
        z = torch.zeros(1, 4, 2, 2)
        return Stored(ContentResult(z, torch.zeros(T, 2, 4), torch.zeros(T + 1, 4, 2, 2),
                                    torch.zeros(T + 1, 4, 2, 2), ContentConfig(**job.config),
                                    ContentStats([1] * T, [0.1] * T, [0.1] * T, [20, 10, 0], 16,
                                                 seconds={"inversion": 0.01, "fit": 0.01})),
                      prov)
    k = len(job.config["concept_keys"])
    images = torch.full((k, 8, 8, 3), int(job.key[:2], 16), dtype=torch.uint8)
    summary = {"cache_key": "x", "seconds": {}, "unet_evals": {}}
    return Stored(FusedImages(images), {**prov, "fusion_seconds": {"fusion": 0.01},
                                        "content": summary, "concepts": [summary] * k})


@pytest.fixture
def inputs(tmp_path) -> dict[str, Path]:
    paths = {}
    for name, kind in (("a", 0), ("b", 2), ("ref1", 1), ("ref2", 3), ("ref3", 5)):
        paths[name] = tmp_path / f"{name}.png"
        make_image(kind, (16, 16)).save(paths[name])
    return paths


def _manifest(tmp_path: Path, rows: list[str], prefix: str = "") -> Path:
    """Rows of "source,reference,name": the name is the pair id (after `prefix`) and the
    output name."""
    path = tmp_path / "m.csv"
    lines = [f"{r},{prefix}{r.rsplit(',', 1)[1]}" for r in rows]
    path.write_text("source,reference,output_name,pair_id\n" + "\n".join(lines) + "\n")
    return path


def _plan(tmp_path: Path, manifest: Path, **settings):
    cfg = RunSettings.build({"content": {"num_inference_steps": T}, **settings})
    parsed = parse_manifest(manifest.read_bytes(), str(manifest))
    hashes = hash_inputs([u for r in parsed.rows for u in (r.source, r.reference)])
    plan = plan_run(parsed, hashes, "m" * 64, cfg, str(tmp_path / "out" / "run"), "run")
    return plan, ExecutorSettings(model="unused", cache_uri=str(tmp_path / "cache"))


@pytest.fixture(params=["pool", "shards"])
def path(request) -> str:
    """The rules hold for a run in one pool and for a sharded one (the pool in each shard)."""
    return request.param


def _run(tmp_path: Path, manifest: Path, runner: FakeRunner, path: str = "pool", **settings):
    """One engine run with the fake runner: plan (fake model identity), jobs, outputs; with
    ``path="shards"`` two shards a phase, run in this process one after the other."""
    plan, executor = _plan(tmp_path, manifest, **settings)
    if path == "pool":
        outcome = engine.run_pool(plan, executor, runner=runner)
    else:
        outcome = shards.run_sharded(plan, executor.cache_uri, RunSettings(shards=2), {},
                                     in_process(executor, runner))
    summary = engine.summarize(plan, outcome.pairs, outcome.stages)
    engine.finish(summary, "2026-01-01T00:00:00+00:00", write_report=False)
    return summary, json.loads((Path(plan.run_uri) / "run.json").read_text())


def _status(summary) -> dict[str, str]:
    return {p.pair_id: p.status for p in summary.pairs}


def test_a_complete_run_writes_every_output_under_its_name_and_success(tmp_path, inputs, path):
    m = _manifest(tmp_path, [f"{inputs['a']},{inputs['ref1']},house",
                             f"{inputs['b']},{inputs['ref1']},tree"], prefix="id-")
    runner = FakeRunner()
    summary, data = _run(tmp_path, m, runner, path)
    assert _status(summary) == {"id-house": "ok", "id-tree": "ok"}
    run = tmp_path / "out" / "run"
    assert summary.status == "complete" == data["status"]
    assert summary.counts["pairs_ok"] == 2 and summary.counts["concepts_computed"] == 1
    assert runner.ran == {"concept": 1, "content": 2, "fusion": 2}
    for name in ("house", "tree"):
        sidecar = json.loads((run / f"{name}.json").read_text())
        assert sidecar["png"] == f"{name}.png" and len(sidecar["png_sha256"]) == 64
    assert (run / "_SUCCESS").exists()
    # every link run.json gives resolves to a file (output_name, not pair_id)
    for pair in data["pairs"]:
        assert (run / pair["output_file"]).is_file() and (run / pair["sidecar_file"]).is_file()


def test_a_rerun_computes_nothing_and_rewrites_nothing(tmp_path, inputs, path):
    m = _manifest(tmp_path, [f"{inputs['a']},{inputs['ref1']},house"])
    _run(tmp_path, m, FakeRunner(), path)
    png = tmp_path / "out" / "run" / "house.png"
    stamp = png.stat().st_mtime_ns
    again = FakeRunner()
    summary, _ = _run(tmp_path, m, again, path)
    assert _status(summary) == {"house": "skipped"} and summary.status == "complete"
    assert not again.ran and png.stat().st_mtime_ns == stamp
    assert summary.counts["concepts_cached"] == 1 and summary.counts["contents_cached"] == 1


def test_the_resume_check_reads_only_listed_outputs_and_reads_them_at_once(
        tmp_path, inputs, path, monkeypatch):
    """A fresh run folder costs one listing, no read per pair (10 000 pairs on S3 were minutes
    of serial 404s before the first fusion); a rerun verifies the finished pairs on
    ``plan_threads`` threads at once."""
    rows = [f"{inputs[s]},{inputs[r]},{s}{r}" for s in ("a", "b") for r in ("ref1", "ref2")]
    m = _manifest(tmp_path, rows)
    checked = Overlapping(outputs.finished_sidecar)
    monkeypatch.setattr(outputs, "finished_sidecar", checked)
    summary, _ = _run(tmp_path, m, FakeRunner(), path, plan_threads=4)
    assert set(_status(summary).values()) == {"ok"} and checked.calls == 0
    summary, _ = _run(tmp_path, m, FakeRunner(), path, plan_threads=4)
    assert set(_status(summary).values()) == {"skipped"} and checked.calls == 4
    assert checked.peak > 1


def test_a_truncated_png_is_redone_not_kept(tmp_path, inputs):
    m = _manifest(tmp_path, [f"{inputs['a']},{inputs['ref1']},house"])
    _run(tmp_path, m, FakeRunner())
    png = tmp_path / "out" / "run" / "house.png"
    good = png.read_bytes()
    png.write_bytes(good[:20])
    summary, _ = _run(tmp_path, m, FakeRunner())
    assert _status(summary) == {"house": "ok"} and png.read_bytes() == good


def test_a_failed_concept_fails_only_its_pairs(tmp_path, inputs, path):
    m = _manifest(tmp_path, [f"{inputs['a']},{inputs['ref1']},p1",
                             f"{inputs['a']},{inputs['ref2']},p2",
                             f"{inputs['b']},{inputs['ref2']},p3"])
    summary, data = _run(tmp_path, m, FakeRunner(fail={str(inputs["ref2"])}), path)
    assert _status(summary) == {"p1": "ok", "p2": "failed", "p3": "failed"}
    assert summary.status == "partial" == data["status"]
    assert summary.counts["concepts_failed"] == 1 and summary.counts["pairs_failed"] == 2
    assert all(p.reason == "boom concept" for p in summary.pairs if p.status == "failed")
    assert not (tmp_path / "out" / "run" / "_SUCCESS").exists()
    assert "2 failed" in summary.message


def test_a_failed_content_fails_only_its_pairs(tmp_path, inputs, path):
    m = _manifest(tmp_path, [f"{inputs['a']},{inputs['ref1']},p1",
                             f"{inputs['b']},{inputs['ref1']},p2"])
    summary, _ = _run(tmp_path, m, FakeRunner(fail={str(inputs["b"])}), path)
    assert _status(summary) == {"p1": "ok", "p2": "failed"}
    assert summary.counts["contents_failed"] == 1 and summary.counts["fusions_computed"] == 1


def test_an_input_found_undecodable_by_its_job_is_a_bad_row(tmp_path, inputs, path):
    """A PNG whose header passes planning's probe but whose pixels do not decode is a bad row
    (reported by its line), like one refused at planning: the run completes without it."""
    m = _manifest(tmp_path, [f"{inputs['a']},{inputs['ref1']},good",
                             f"{inputs['b']},{inputs['ref1']},half"])
    summary, data = _run(tmp_path, m, FakeRunner(undecodable={str(inputs["b"])}), path)
    assert _status(summary) == {"good": "ok", "half": "bad"}
    bad = next(p for p in summary.pairs if p.pair_id == "half")
    assert bad.line == 3 and "truncated" in bad.reason
    assert summary.status == "complete" == data["status"]
    assert summary.counts["pairs_bad"] == 1 and summary.counts["contents_failed"] == 1
    assert (tmp_path / "out" / "run" / "_SUCCESS").exists()
    assert not (tmp_path / "out" / "run" / "half.png").exists()


def test_every_pair_failing_is_a_failed_run_without_success(tmp_path, inputs, path):
    m = _manifest(tmp_path, [f"{inputs['a']},{inputs['ref1']},p1"])
    (tmp_path / "out" / "run").mkdir(parents=True)
    (tmp_path / "out" / "run" / "_SUCCESS").write_text("stale")
    summary, data = _run(tmp_path, m, FakeRunner(fail={str(inputs["ref1"])}), path)
    assert summary.status == "failed" == data["status"]
    assert not (tmp_path / "out" / "run" / "_SUCCESS").exists()


def test_a_failed_fusion_fails_its_group_only(tmp_path, inputs, path):
    m = _manifest(tmp_path, [f"{inputs['a']},{inputs['ref1']},p1",
                             f"{inputs['b']},{inputs['ref1']},p2"])

    class FusionOfBFails(FakeRunner):
        def __call__(self, jobs, settings, **kw):
            self.fail = {str(inputs["b"])} if jobs[0].kind == "fusion" else set()
            return super().__call__(jobs, settings, **kw)

    summary, _ = _run(tmp_path, m, FusionOfBFails(), path)
    assert _status(summary) == {"p1": "ok", "p2": "failed"}
    assert summary.counts["fusions_failed"] == 1 and summary.status == "partial"
    assert next(p for p in summary.pairs if p.pair_id == "p2").reason == "fusion: boom fusion"


def test_bad_rows_are_reported_and_do_not_fail_the_run(tmp_path, inputs):
    m = _manifest(tmp_path, [f"{inputs['a']},{inputs['ref1']},p1",
                             f"{tmp_path / 'missing.png'},{inputs['ref1']},p2",
                             f"{inputs['b']},{inputs['ref1']},run"])
    summary, data = _run(tmp_path, m, FakeRunner())
    assert _status(summary) == {"p1": "ok", "p2": "bad", "run": "bad"}
    assert summary.status == "complete" and summary.counts["pairs_bad"] == 2
    assert (tmp_path / "out" / "run" / "_SUCCESS").exists()
    reasons = {f["line"]: f["reason"] for f in data["failures"]}
    assert "not found" in reasons[3] and "a name the run itself writes" in reasons[4]


def test_strict_refuses_the_manifest_with_a_bad_row(tmp_path, inputs, tiny_model_dir):
    m = _manifest(tmp_path, [f"{tmp_path / 'missing.png'},{inputs['ref1']},p1"])
    from vct.manifest import ManifestError

    parsed = parse_manifest(m.read_bytes(), str(m))
    assert parsed.rows  # the row parses; its input is what is missing
    with pytest.raises(ManifestError, match="line 2"):
        engine.plan(engine.prepare(str(m), str(tmp_path / "out"), str(tiny_model_dir),
                                   {"strict": True}), manifest=parsed)
    from vct.models import ModelError

    with pytest.raises(ModelError, match="no such folder"):
        engine.plan(engine.prepare(str(m), str(tmp_path / "out"), str(tmp_path / "nope")),
                    manifest=parsed)


def test_identical_rows_share_one_branch_and_each_get_an_output(tmp_path, inputs):
    m = _manifest(tmp_path, [f"{inputs['a']},{inputs['ref1']},one",
                             f"{inputs['a']},{inputs['ref1']},two"])
    runner = FakeRunner()
    summary, _ = _run(tmp_path, m, runner)
    run = tmp_path / "out" / "run"
    assert runner.ran["fusion"] == 1 and summary.status == "complete"
    assert (run / "one.png").read_bytes() == (run / "two.png").read_bytes()


def test_prepare_refuses_what_needs_no_reading(tmp_path):
    for model in ("", None, "   "):
        with pytest.raises(ConfigError, match="model .*a model is required"):
            engine.prepare("m.csv", str(tmp_path), model)
    for run_id in ("../escaped", "/abs", ".hidden", "a/b", "run"):
        with pytest.raises(ConfigError, match="run_id"):
            engine.prepare("m.csv", str(tmp_path), "some/model", run_id=run_id)
    with pytest.raises(ConfigError, match="content_batch"):
        engine.prepare("m.csv", str(tmp_path), "some/model", {"content_batch": 0})
    with pytest.raises(ConfigError, match="device"):
        engine.prepare("m.csv", str(tmp_path), "some/model", {"device": "gpu"})
    with pytest.raises(ConfigError, match="fusion.reweight_value"):
        engine.prepare("m.csv", str(tmp_path), "some/model", {"fusion": {"reweight_value": -1}})
    with pytest.raises(ConfigError, match="content.inversion_prompt"):
        engine.prepare("m.csv", str(tmp_path), "some/model",
                       {"content": {"inversion_prompt": "hello"}})


def test_every_link_of_the_report_resolves_with_output_names(tmp_path, inputs):
    """output_name differs from pair_id: run.json and every report page link the real files."""
    import re

    m = _manifest(tmp_path, [f"{inputs['a']},{inputs['ref1']},house",
                             f"{inputs['b']},{inputs['ref2']},tree"], prefix="pair-")
    summary, _ = _run(tmp_path, m, FakeRunner())
    engine.finish(summary, "2026-01-01T00:00:00+00:00", write_report=True)
    run = tmp_path / "out" / "run"
    pages = sorted(run.glob("report*.html"))
    links = {link for page in pages
             for link in re.findall(r'(?:href|src)="([^"#]+)"', page.read_text())}
    assert {"house.png", "house.json", "tree.png", "tree.json"} <= links
    for link in links:
        assert (run / link).is_file(), link


def test_sizes_the_model_cannot_work_at_are_refused_before_any_job(tmp_path, inputs,
                                                                   tiny_model_dir):
    """content.resolution / concept.reference_resolution against the VAE factor and the UNet's
    depth, read from the model's config files: refused by plan, before a job or a write."""
    m = _manifest(tmp_path, [f"{inputs['a']},{inputs['ref1']},p1"])
    cases = {("content", "resolution", 12): "not a multiple of the model's VAE factor 8",
             ("concept", "reference_resolution", 12): "not a multiple",
             ("content", "resolution", 16): "too small for this model (at least 24",
             ("concept", "reference_resolution", 8): "too small"}
    for (stage, name, value), needle in cases.items():
        request = engine.prepare(str(m), str(tmp_path / "out"), str(tiny_model_dir),
                                 {stage: {name: value}})
        with pytest.raises(ConfigError, match=rf"{stage}\.{name} .*{re.escape(needle)}"):
            engine.plan(request)
    assert not (tmp_path / "out").exists()
    ok = engine.prepare(str(m), str(tmp_path / "out"), str(tiny_model_dir),
                        {"content": {"resolution": 24}, "concept": {"reference_resolution": 24}})
    assert len(engine.plan(ok).pairs) == 1


def test_prepare_refuses_an_unusable_output_or_device(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(storage.OutputUnusable, match="is a file"):
        engine.prepare("m.csv", str(tmp_path / "file"), "some/model")
    with pytest.raises(storage.OutputUnusable, match="is not a folder"):
        engine.prepare("m.csv", str(tmp_path / "out"), "some/model",
                       {"cache_uri": str(tmp_path / "file" / "cache")})
    from vct.models import ModelError

    with pytest.raises(ModelError, match="--dtype bf16 needs CUDA"):
        engine.prepare("m.csv", str(tmp_path / "out"), "some/model",
                       {"device": "cpu", "dtype": "bf16"})
    with pytest.raises(ModelError, match="--device cuda:63"):
        engine.prepare("m.csv", str(tmp_path / "out"), "some/model", {"device": "cuda:63"})


def test_a_resumed_group_is_fused_as_before_not_regrouped(tmp_path, inputs, path):
    """Two pairs share a source, so one fusion job makes both. If only one was written before
    a kill, the rerun fuses the same group (its cached result: nothing recomputed) and writes
    the missing pair with the same bytes, instead of fusing it alone (another batch, other
    bytes)."""
    m = _manifest(tmp_path, [f"{inputs['a']},{inputs['ref1']},p1",
                             f"{inputs['a']},{inputs['ref2']},p2"])
    _run(tmp_path, m, FakeRunner(), path)
    run = tmp_path / "out" / "run"
    first = (run / "p2.png").read_bytes()
    stamp = (run / "p1.png").stat().st_mtime_ns
    (run / "p2.png").unlink()
    (run / "p2.json").unlink()
    again = FakeRunner()
    summary, _ = _run(tmp_path, m, again, path)
    assert _status(summary) == {"p1": "skipped", "p2": "ok"}
    assert not again.ran and summary.counts["fusions_cached"] == 1
    assert (run / "p2.png").read_bytes() == first
    assert (run / "p1.png").stat().st_mtime_ns == stamp  # the finished pair is not rewritten


def test_a_5000x1_and_a_1x1_source_still_give_the_report_and_success(tmp_path,
                                                                     tiny_model_dir):
    """End to end through the engine with the real (tiny) model: degenerate sources are
    computed, and their thumbnails (160x0 once raised "cannot write empty image") never fail
    the report; run.json, report.html, the contact sheet and _SUCCESS all land."""
    from PIL import Image

    Image.new("RGB", (5000, 1), (200, 30, 30)).save(tmp_path / "wide.png")
    Image.new("RGB", (1, 1), (30, 200, 30)).save(tmp_path / "dot.png")
    make_image(1, (64, 64)).save(tmp_path / "ref.png")
    (tmp_path / "m.csv").write_text("source,reference\nwide.png,ref.png\ndot.png,ref.png\n")
    fast = {"concept": {"max_train_steps": 2, "batch_microsteps": True},
            "content": {"num_inference_steps": 4, "num_inner_steps": 1}, "threads": 1}
    summary = engine.run(engine.prepare(str(tmp_path / "m.csv"), str(tmp_path / "out"),
                                        str(tiny_model_dir), fast, "r"))
    run = tmp_path / "out" / "r"
    assert summary.status == "complete" and summary.counts["pairs_ok"] == 2
    for name in ("run.json", "report.html", "contact_sheet.png", "_SUCCESS"):
        assert (run / name).is_file(), name
    thumbs = sorted((run / "thumbs").iterdir())
    assert len(thumbs) >= 3  # two sources, the reference, the outputs
    for thumb in thumbs:
        with Image.open(thumb) as img:
            assert min(img.size) >= 1
    html = (run / "report.html").read_text()
    assert all(f"thumbs/{t.name}" in html for t in thumbs)


def test_unreadable_inputs_fail_only_their_rows_at_plan_time(tmp_path, inputs, tiny_model_dir,
                                                           monkeypatch):
    """/dev/zero, a FIFO, a folder, a file over the byte cap, a text file, a missing file: each
    fails its own row with its reason, read at most up to the cap, and the other rows run."""
    import os

    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    (tmp_path / "folder.png").mkdir()
    (tmp_path / "big.png").write_bytes(b"\x89PNG" + b"\0" * 5000)
    (tmp_path / "notes.png").write_text("not an image")
    monkeypatch.setenv(storage.ENV_MAX_INPUT_BYTES, "4096")
    bad = {"zero": "/dev/zero", "fifo": str(fifo), "folder": str(tmp_path / "folder.png"),
           "big": str(tmp_path / "big.png"), "text": str(tmp_path / "notes.png"),
           "missing": str(tmp_path / "missing.png")}
    rows = [f"{inputs['a']},{inputs['ref1']},good"]
    rows += [f"{path},{inputs['ref1']},{name}" for name, path in bad.items()]
    m = _manifest(tmp_path, rows)
    plan = engine.plan(engine.prepare(str(m), str(tmp_path / "out"), str(tiny_model_dir)))
    assert [p.row.pair_id for p in plan.pairs] == ["good"]
    reasons = {e.pair_id: e.reason for e in plan.errors}
    assert set(reasons) == set(bad)
    assert "not a regular file" in reasons["zero"] and "character device" in reasons["zero"]
    assert "FIFO" in reasons["fifo"] and "directory" in reasons["folder"]
    assert "input too large" in reasons["big"] and "not a readable image" in reasons["text"]
    assert "not found" in reasons["missing"]


def test_a_half_written_png_is_a_bad_row_not_a_failed_run(tmp_path, inputs, tiny_model_dir):
    """Tried as a user would: a good pair beside a PNG cut off mid-data (its header passes
    planning's probe; its pixels do not decode when the content job reads them). The real job
    on the tiny model: the run completes, the row is bad by its line, _SUCCESS is written."""
    half = tmp_path / "half.png"
    data = inputs["b"].read_bytes()
    half.write_bytes(data[:len(data) // 2])
    m = _manifest(tmp_path, [f"{inputs['a']},{inputs['ref1']},good",
                             f"{half},{inputs['ref1']},half"])
    settings = {"concept": {"max_train_steps": 1, "batch_microsteps": True},
                "content": {"num_inference_steps": 2, "num_inner_steps": 1}, "threads": 1}
    request = engine.prepare(str(m), str(tmp_path / "out"), str(tiny_model_dir), settings, "r")
    summary = engine.run(request, write_report=False)
    assert _status(summary) == {"good": "ok", "half": "bad"}, summary.pairs
    bad = next(p for p in summary.pairs if p.pair_id == "half")
    assert bad.line == 3 and str(half) in bad.reason, bad.reason
    assert summary.status == "complete" and (tmp_path / "out" / "r" / "_SUCCESS").exists()


def test_success_is_removed_before_a_folder_is_rewritten(tmp_path, inputs, path):
    """A finished folder whose input is edited in place and rerun: _SUCCESS is gone before the
    first job of the rewrite, so a kill mid-rewrite never leaves a folder claiming success
    beside a mix of new and old files; it comes back last."""
    m = _manifest(tmp_path, [f"{inputs['a']},{inputs['ref1']},house"])
    _run(tmp_path, m, FakeRunner(), path)
    success = tmp_path / "out" / "run" / "_SUCCESS"
    assert success.exists()
    make_image(5, (16, 16)).save(inputs["a"])  # edited in place: a new content key
    seen: list[bool] = []

    class Watching(FakeRunner):
        def __call__(self, jobs, settings, **kw):
            if jobs[0].kind == "fusion":
                seen.append(success.exists())
            return super().__call__(jobs, settings, **kw)

    summary, _ = _run(tmp_path, m, Watching(), path)
    assert summary.counts["pairs_ok"] == 1 and seen == [False] and success.exists()


def test_s3_inputs_answering_403_or_500_fail_only_their_rows(fault_proxy, s3_bucket, inputs,
                                                             tiny_model_dir, tmp_path):
    """An object that answers 403 (not retried) or keeps answering 500 (retried, then given
    up): planning reports those rows with the reason and plans the others."""
    for name in ("a", "b", "ref1"):
        storage.write_bytes(f"{s3_bucket}/in/{name}.png", inputs[name].read_bytes())
    storage.write_bytes(f"{s3_bucket}/in/secret.png", inputs["a"].read_bytes())
    storage.write_bytes(f"{s3_bucket}/in/broken.png", inputs["b"].read_bytes())
    fault_proxy.fail("secret.png", 403, "AccessDenied")
    fault_proxy.fail("broken.png", 500, "InternalError")
    m = tmp_path / "m.csv"
    m.write_text("source,reference,pair_id\n"
                 f"{s3_bucket}/in/a.png,{s3_bucket}/in/ref1.png,good\n"
                 f"{s3_bucket}/in/secret.png,{s3_bucket}/in/ref1.png,denied\n"
                 f"{s3_bucket}/in/b.png,{s3_bucket}/in/broken.png,broken\n")
    plan = engine.plan(engine.prepare(str(m), str(tmp_path / "out"), str(tiny_model_dir)))
    assert [p.row.pair_id for p in plan.pairs] == ["good"]
    reasons = {e.pair_id: e.reason for e in plan.errors}
    assert "permission denied" in reasons["denied"] and "HTTP 403" in reasons["denied"]
    assert "storage unavailable" in reasons["broken"] and "HTTP 500" in reasons["broken"]
