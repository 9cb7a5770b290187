"""The job pool's workers (vct.batch.workers): in process and accelerate (2 CPU ranks), each
running units of stage jobs into the cache.

The jobs are real (tiny model, 64 px, a few steps), so the tests also pin that both modes store
bit-identical results: the mode decides where a job runs, never what it computes.
"""

from __future__ import annotations

import hashlib
import os
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from vct.artifacts import load_result
from vct.batch import engine
from vct.batch.jobs import Job, JobOutcome
from vct.batch.keys import concept_key, content_key
from vct.batch.plan import Plan
from vct.batch.workers import ExecutorSettings, accelerate, local
from vct.batch.workers.accelerate import AccelerateBackend
from vct.batch.workers.local import LocalBackend
from vct.cache import StageCache
from vct.config import ConceptConfig, ContentConfig, to_dict

RANK_THREADS = max(1, (os.cpu_count() or 1) // 2)  # what each of 2 ranks gets on this node
CONTENT = ContentConfig(num_inference_steps=5, num_inner_steps=2, resolution=64)
CONCEPT = ConceptConfig(max_train_steps=3, batch_microsteps=True, reference_resolution=64)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def content_job(models, path: Path, cost: float = 20.0) -> Job:
    """With the trajectories kept: the tests below compare them across executors and batches."""
    return Job("content", content_key(_sha(path), models.identity, CONTENT,
                                      keep_trajectories=True), str(path),
               to_dict(CONTENT), cost, store={"keep_trajectories": True})


def concept_job(models, path: Path, cost: float = 12.0) -> Job:
    return Job("concept", concept_key(_sha(path), models.identity, CONCEPT), str(path),
               to_dict(CONCEPT), cost)


@pytest.fixture(scope="module")
def bad_image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bad") / "not_an_image.png"
    path.write_bytes(b"this is text, not a PNG")
    return path


@pytest.fixture(scope="module")
def good_jobs(models, images) -> list[Job]:
    """Two content jobs and one concept job; the concept is not the biggest, so biggest-first
    reorders them."""
    return [concept_job(models, images["ref"]), content_job(models, images["src_a"]),
            content_job(models, images["src_b"], cost=25.0)]


def _settings(model_dir: Path, cache: Path, **kw) -> ExecutorSettings:
    return ExecutorSettings(model=str(model_dir), cache_uri=str(cache), device="cpu", **kw)


def run_units(jobs: list[Job], settings: ExecutorSettings) -> list[JobOutcome]:
    """Each job as one unit on the settings' backend, biggest first, a unit whenever a slot is
    free (as the pool submits them); the outcomes in input order."""
    backend = (LocalBackend(settings) if settings.mode == "local"
               else AccelerateBackend(settings, world=len(jobs)))
    todo = sorted(jobs, key=lambda j: -j.cost)
    got: dict[str, JobOutcome] = {}
    try:
        while todo or backend.outstanding():
            while todo and backend.free_slots() > 0:
                backend.submit([todo.pop(0)])
            for outcome in backend.poll(timeout=0.05):
                got[outcome.key] = outcome
    finally:
        backend.close()
    return [got[j.key] for j in jobs]


def _plan(jobs: list[Job], run_uri: Path) -> Plan:
    """A plan of stage jobs and no pairs: what a stage shard's pool runs."""
    return Plan(run_id="w", run_uri=str(run_uri), manifest_uri="", model_identity="m" * 64,
                pairs=[], errors=[], concept_jobs=[j for j in jobs if j.kind == "concept"],
                content_jobs=[j for j in jobs if j.kind == "content"])


@pytest.fixture(scope="module")
def local_run(tiny_model_dir, good_jobs, tmp_path_factory):
    """The three good jobs in local mode: (outcomes, cache dir).

    They run with the thread count each of 2 accelerate CPU ranks uses (the thread budget):
    concept inversion's backward pass sums in a thread-count-dependent order, so CPU results
    are bit-identical across processes only at equal thread counts.
    """
    cache = tmp_path_factory.mktemp("local_cache")
    outcomes = run_units(good_jobs, _settings(tiny_model_dir, cache, threads=RANK_THREADS))
    return outcomes, cache


def _entry(cache_dir: Path, job: Job) -> bytes:
    return Path(StageCache(str(cache_dir)).uri(job.kind, job.key)).read_bytes()


_NAMES = {"concept": ("vectors",), "content": ("x_T", "embeddings", "inversion_latents",
                                                "reconstruction")}


def _tensors(job: Job, data: bytes) -> dict[str, torch.Tensor]:
    result = load_result(job.kind, data, key=job.key).result
    return {name: getattr(result, name) for name in _NAMES[job.kind]}


# ---------------------------------------------------------------- local mode
def test_local_runs_every_job_into_the_cache(local_run, good_jobs) -> None:
    outcomes, cache = local_run
    assert [o.key for o in outcomes] == [j.key for j in good_jobs]
    for job, outcome in zip(good_jobs, outcomes):
        assert outcome.ok and outcome.error is None and outcome.rank == 0, outcome
        assert outcome.seconds > 0 and sum(outcome.unet_evals.values())
        result = _tensors(job, _entry(cache, job))
        assert result  # parsed and verified against its key
    assert outcomes[0].unet_evals == {"concept_grad": 3 * CONCEPT.gradient_accumulation_steps}


def test_one_unit_runs_biggest_first(good_jobs, tiny_model_dir, tmp_path) -> None:
    """A unit of several jobs (a content batch's shape) runs its biggest job first."""
    settings = _settings(tiny_model_dir, tmp_path / "cache", threads=RANK_THREADS)
    cache = StageCache(settings.cache_uri)
    local.run(good_jobs, settings)
    written = [Path(cache.uri(j.kind, j.key)).stat().st_mtime_ns for j in good_jobs]
    # src_b (25), src_a (20), then the concept (12)
    assert written[2] <= written[1] <= written[0]


def test_a_stage_answers_cached_jobs_without_running_them(local_run, good_jobs,
                                                         tiny_model_dir) -> None:
    """The pool verifies each entry once and sends only misses to the workers: a rerun of
    finished jobs computes nothing, reloads no model and rewrites no entry."""
    _, cache = local_run
    settings = _settings(tiny_model_dir, cache)
    models = local.models_for(settings)  # the memoised ones: no reload per call
    before = dict(models.unet_evals)
    entries = [_entry(cache, j) for j in good_jobs]
    report = engine.run_pool(_plan(good_jobs[1:], cache / "run"), settings,
                             runner=lambda *a, **k: pytest.fail("nothing to run")
                             ).stages["content"]
    assert sorted(report.cached) == sorted(j.key for j in good_jobs[1:])
    assert not report.computed and not report.failed
    assert dict(models.unet_evals) == before
    assert [_entry(cache, j) for j in good_jobs] == entries
    assert local.models_for(settings) is models


def test_local_bad_input_fails_alone(models, images, bad_image, tiny_model_dir,
                                     tmp_path) -> None:
    missing = tmp_path / "missing.png"
    jobs = [content_job(models, images["src_a"]), concept_job(models, bad_image, cost=100),
            Job("content", "ab" * 32, str(missing), to_dict(CONTENT))]
    outcomes = run_units(jobs, _settings(tiny_model_dir, tmp_path / "cache"))
    assert [o.ok for o in outcomes] == [True, False, False]
    assert outcomes[1].error == f"reference {bad_image}: not a readable image " \
                                "(UnidentifiedImageError)"
    assert str(missing) in outcomes[2].error and "not found" in outcomes[2].error
    assert "\n" not in outcomes[1].error + outcomes[2].error
    cache = StageCache(str(tmp_path / "cache"))
    assert cache.contains("content", jobs[0].key)
    assert not cache.contains("concept", jobs[1].key)


def test_model_error_fails_every_job(good_jobs, tmp_path) -> None:
    outcomes = run_units(good_jobs, _settings(tmp_path / "no-model", tmp_path / "cache"))
    assert [o.ok for o in outcomes] == [False] * 3
    assert all("no such folder" in o.error for o in outcomes)


def test_job_and_outcome_round_trip_and_validation(good_jobs) -> None:
    job = good_jobs[0]
    assert Job.from_dict(job.to_dict()) == job
    outcome = JobOutcome("content", job.key, ok=False, rank=1, seconds=2.5, error="x",
                         unet_evals={"content": 3})
    assert JobOutcome.from_dict(outcome.to_dict()) == outcome
    with pytest.raises(ValueError):
        Job("upscale", job.key, "x.png", {})
    with pytest.raises(ValueError):
        Job("content", "not-a-key", "x.png", {})
    with pytest.raises(ValueError):
        ExecutorSettings(model="m", cache_uri="c", mode="threads")


# ---------------------------------------------------------------- accelerate mode
@pytest.fixture(scope="module")
def accelerate_run(tiny_model_dir, good_jobs, models, bad_image, tmp_path_factory):
    """The good jobs plus a bad one on 2 CPU ranks (one launch for all accelerate checks)."""
    cache = tmp_path_factory.mktemp("acc_cache")
    jobs = [*good_jobs, content_job(models, bad_image, cost=1.0)]
    # each rank at the local fixture's count, set here too: VCT_THREADS would change a rank's
    settings = _settings(tiny_model_dir, cache, mode="accelerate", cpu=True, num_processes=2,
                         threads=RANK_THREADS)
    return jobs, run_units(jobs, settings), cache


@pytest.mark.slow  # make test-slow (in make check): see pyproject.toml
def test_accelerate_matches_local_bit_for_bit(accelerate_run, local_run) -> None:
    jobs, outcomes, cache = accelerate_run
    assert [o.ok for o in outcomes] == [True, True, True, False], outcomes
    for job in jobs[:3]:
        got, want = _tensors(job, _entry(cache, job)), _tensors(job, _entry(local_run[1], job))
        assert got.keys() == want.keys()
        for name in want:
            assert torch.equal(got[name], want[name]), (job.kind, name)


@pytest.mark.slow  # make test-slow (in make check): see pyproject.toml
def test_accelerate_uses_both_ranks_and_isolates_failures(accelerate_run, bad_image) -> None:
    jobs, outcomes, cache = accelerate_run
    assert [o.key for o in outcomes] == [j.key for j in jobs]
    assert {o.rank for o in outcomes} == {0, 1}
    assert outcomes[3].error == f"source {bad_image}: not a readable image " \
                                "(UnidentifiedImageError)"
    assert not StageCache(str(cache)).contains("content", jobs[3].key)
    assert all(o.seconds > 0 and o.unet_evals for o in outcomes[:3])


# A stand-in for `accelerate launch`: rank 0 finishes its first unit, then the launcher dies.
_CRASH = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    from vct.cache import StageCache
    workdir = Path(sys.argv[-1])
    spec = json.loads((workdir / "jobs.json").read_text())
    inbox = workdir / "inbox-0.jsonl"
    while not inbox.exists() or not inbox.read_text().strip():
        time.sleep(0.05)
    unit = json.loads(inbox.read_text().splitlines()[0])
    job = unit["jobs"][0]  # rank 0's first unit: the biggest job
    StageCache(spec["settings"]["cache_uri"]).put(job["kind"], job["key"], b"entry")
    line = {"kind": job["kind"], "key": job["key"], "ok": True, "rank": 0, "seconds": 1.0,
            "unit": unit["unit"], "index": 0}
    (workdir / "rank-0.jsonl").write_text(json.dumps(line) + "\\n")
    print("Traceback: rank 1 was killed (OOM)", file=sys.stderr)
    sys.exit(7)
""")


def test_dead_rank_fails_only_unfinished_jobs(tiny_model_dir, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(accelerate, "launcher_argv",
                        lambda config, world, workdir: [sys.executable, "-c", _CRASH,
                                                        str(workdir)])
    jobs = [Job("content", f"{i:064x}", f"/img/{i}.png", {}, cost=c)
            for i, c in enumerate((1.0, 2.0, 3.0))]
    settings = _settings(tiny_model_dir, tmp_path, mode="accelerate", cpu=True, num_processes=2)
    outcomes = run_units(jobs, settings)
    assert len(outcomes) == 3 and [o.ok for o in outcomes] == [False, False, True]
    # Units biggest first, each to the rank with the fewest outstanding: 2 and 0 on rank 0,
    # 1 on rank 1.
    assert outcomes[0].rank == 0 and outcomes[1].rank == 1 and outcomes[2].rank == 0
    assert outcomes[1].error.startswith("source /img/1.png: worker rank 1 exited with code 7")
    assert "rank 1 was killed (OOM)" in outcomes[1].error
    assert "worker rank 0 exited with code 7" in outcomes[0].error


# ---------------------------------------------------------------- fusion jobs
def test_fusion_job_fuses_from_the_cache_and_fails_alone_without_inputs(
        local_run, good_jobs, tiny_model_dir) -> None:
    from vct.batch.keys import fusion_key
    from vct.config import FusionConfig

    _, cache = local_run
    concept, content = good_jobs[0], good_jobs[1]
    fusion = to_dict(FusionConfig())
    key = fusion_key(content.key, [concept.key], FusionConfig())
    good = Job("fusion", key, content.input_uri,
               {"content_key": content.key, "concept_keys": [concept.key], "fusion": fusion},
               cost=40.0)
    missing_key = "0" * 64
    bad = Job("fusion", fusion_key(missing_key, [concept.key], FusionConfig()),
              content.input_uri,
              {"content_key": missing_key, "concept_keys": [concept.key], "fusion": fusion})
    ok, failed = local.run([good, bad], _settings(tiny_model_dir, cache))
    # counted by the UNet wrapper; expected from spec §8: B's 2 passes + B*'s conditional one
    # (B* replays the fit) per step
    assert ok.ok and ok.unet_evals == {"fusion": 3 * CONTENT.num_inference_steps}
    images = load_result("fusion", _entry(cache, good), key=key).result.images
    assert images.shape == (1, 64, 64, 3) and images.dtype == torch.uint8
    assert not failed.ok and "not in the cache" in failed.error


def test_content_jobs_batch_and_bad_inputs_still_fail_alone(local_run, models, images,
                                                             bad_image, tiny_model_dir,
                                                             tmp_path) -> None:
    _, single_cache = local_run
    jobs = [content_job(models, images["src_a"]), content_job(models, bad_image),
            content_job(models, images["src_b"], cost=25.0)]
    settings = _settings(tiny_model_dir, tmp_path / "cache", content_batch=3)
    used = local.models_for(settings)
    before = used.unet_evals["content_grad"]
    outcomes = local.run(jobs, settings)  # one unit: a content batch
    assert [o.ok for o in outcomes] == [True, False, True]
    assert "not a readable image" in outcomes[1].error
    fitted = used.unet_evals["content_grad"] - before
    assert fitted == sum(o.unet_evals["content_grad"] for o in outcomes if o.ok)
    for job in (jobs[0], jobs[2]):
        batched = load_result("content", _entry(tmp_path / "cache", job), key=job.key)
        alone = load_result("content", _entry(single_cache, job), key=job.key).result
        assert batched.provenance["batch_size"] == 2 == batched.result.stats.batch_size
        torch.testing.assert_close(batched.result.reconstruction, alone.reconstruction,
                                   atol=1e-3,
                                   rtol=1e-3)
    with pytest.raises(ValueError, match="content_batch"):
        _settings(tiny_model_dir, tmp_path, content_batch=0)
