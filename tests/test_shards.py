"""The library side of sharded runs (vct.batch.shards), without Prefect: how jobs are split, the
plan a shard reads (JSON, by URI only), what a shard reports, and how the parent turns its
shards' results into the run's stage reports."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest

from vct import storage
from vct.batch import shards
from vct.batch.claims import Owner
from vct.batch.jobs import Job, JobOutcome
from vct.batch.plan import PairPlan, Plan
from vct.batch.settings import RunSettings
from vct.batch.workers import ExecutorSettings
from vct.cache import cache_key
from vct.report.run_record import StageReport


def in_process(executor: ExecutorSettings, runner=None) -> shards.Dispatch:
    """A dispatch with no Prefect: each shard of a phase run here, one after the other."""
    def dispatch(phase: str, uri: str, slices: list[shards.Slice]) -> list[shards.ShardResult]:
        return [shards.run_shard(uri, i, phase, executor, runner=runner)
                for i in range(len(slices))]
    return dispatch


def _job(kind: str, n: int, cost: float) -> Job:
    return Job(kind=kind, key=cache_key(kind, {"n": n}), input_uri=f"img{n}.png",
               config={"n": n}, cost=cost)


def test_split_balances_by_cost_and_never_makes_empty_shards() -> None:
    jobs = [_job("concept", 0, 10), _job("concept", 1, 9), _job("content", 2, 5),
            _job("content", 3, 4), _job("content", 4, 1)]
    parts = shards.split(jobs + [jobs[0]], 2)  # a duplicate key is one job
    assert sorted(sum(j.cost for j in p) for p in parts) == [14, 15]
    assert sorted(j.key for p in parts for j in p) == sorted(j.key for j in jobs)
    assert len(shards.split(jobs[:1], 4)) == 1 and shards.split([], 3) == []
    assert shards.split(jobs, 2) == parts  # deterministic
    with pytest.raises(ValueError):
        shards.split(jobs, 0)


def _plan(tmp_path: Path, jobs: list[Job]) -> Plan:
    return Plan(run_id="r1", run_uri=str(tmp_path / "run"), manifest_uri="m.csv",
                model_identity="m" * 64, pairs=[], errors=[],
                concept_jobs=[j for j in jobs if j.kind == "concept"],
                content_jobs=[j for j in jobs if j.kind == "content"])


def test_the_stored_plan_is_json_that_gives_each_shard_its_slice(tmp_path: Path) -> None:
    jobs = [_job("concept", 0, 3), _job("content", 1, 2), _job("content", 2, 1)]
    the_plan = _plan(tmp_path, jobs)
    parts = [shards.Slice(jobs=part) for part in shards.split(jobs, 2)]
    uri = shards.write_phase(the_plan, "cache", {"run_id": "r1"}, "stage", parts)
    assert uri == storage.join(the_plan.run_uri, "_plan", "plan.json")
    shards.write_phase(the_plan, "cache", {}, "fusion", [shards.Slice([_job("concept", 9, 1)])])
    stored = json.loads(Path(uri).read_text())  # plain JSON, jobs as dicts
    assert set(stored["phases"]) == {"stage", "fusion"} and stored["cache_uri"] == "cache"
    got = [shards.shard_plan(stored, "stage", i) for i in (0, 1)]
    assert sorted((j for p in got for j in (*p.concept_jobs, *p.content_jobs)),
                  key=lambda j: j.key) == sorted(jobs, key=lambda j: j.key)
    assert got[0].run_uri == the_plan.run_uri and got[0].pairs == []
    with pytest.raises(ValueError, match="no stage shard 5"):
        shards.shard_plan(stored, "stage", 5)


def test_a_pair_travels_to_its_shard_unchanged(tmp_path: Path) -> None:
    """A fusion shard rebuilds its pairs from JSON: equal to the parent's, field by field
    (configs, row overrides, reference images), so it keys and fuses them the same."""
    from tests.conftest import make_image
    from tests.test_batch_engine import _plan as engine_plan

    for k in range(3):
        make_image(k, (16, 16)).save(tmp_path / f"i{k}.png")
    manifest = tmp_path / "m.csv"
    manifest.write_text("source,reference,output_name,pair_id,reweight_value,seed,num_vectors\n"
                        f"{tmp_path}/i0.png,{tmp_path}/i1.png,a,a,1.5,7,2\n"
                        f"{tmp_path}/i0.png,{tmp_path}/i2.png,b,b,,,\n")
    the_plan, _ = engine_plan(tmp_path, manifest)
    assert len(the_plan.pairs) == 2
    for pair in the_plan.pairs:
        again = PairPlan.from_dict(json.loads(json.dumps(pair.to_dict())))
        assert again == pair


def test_a_shard_runs_the_pool_over_its_slice_and_stores_its_result(tmp_path: Path) -> None:
    jobs = [_job("concept", 0, 3), _job("content", 1, 2)]
    the_plan = _plan(tmp_path, jobs)
    uri = shards.write_phase(the_plan, str(tmp_path / "cache"), {}, "stage",
                             [shards.Slice(jobs=jobs)])
    ran = []

    def runner(unit, settings, **_):
        ran.append([j.key for j in unit])
        return [JobOutcome(j.kind, j.key, True, 0, 0.01) for j in unit]

    executor = ExecutorSettings(model="unused", cache_uri=str(tmp_path / "cache"))
    result = shards.run_shard(uri, 0, "stage", executor, attempt=1, worker="w1",
                              flow_run_id="f1", runner=runner)
    assert ran == [[jobs[0].key], [jobs[1].key]]  # biggest first, one unit each
    assert result.keys("computed") == [jobs[0].key, jobs[1].key]
    assert result.ranks[0]["jobs"] == 2 and "min_utilization" in result.pool
    assert shards.read_result(the_plan.run_uri, "stage", 0, 1) == result
    assert result.worker == "w1" and result.flow_run_id == "f1"
    assert not shards.lease_expired(the_plan.run_uri, "r1", "stage", 0, "f1")  # released


def test_only_the_attempts_own_expired_lease_says_it_died(tmp_path: Path) -> None:
    """A retry that has not taken over yet must not be judged by its dead predecessor's lease
    (the parent would mark the healthy retry Crashed)."""
    run = str(tmp_path / "run")
    dead = shards.lease_claims(run, owner=Owner(flow_run_id="attempt-0"), lease_s=10,
                               clock=lambda: 100.0)  # expired long ago, by the real clock
    assert dead.acquire("shard", shards.lease_key("r1", "stage", 0)) is not None
    assert shards.lease_expired(run, "r1", "stage", 0, "attempt-0")
    assert not shards.lease_expired(run, "r1", "stage", 0, "attempt-1")
    assert not shards.lease_expired(run, "r1", "stage", 1, "attempt-0")  # no lease: not dead


def test_stage_reports_say_who_computed_awaited_or_never_answered() -> None:
    c = [_job("concept", i, 1) for i in range(4)]

    def result(attempt: int, **lists) -> shards.ShardResult:
        return shards.ShardResult("stage", 0, attempt,
                                  stages={"concept": asdict(StageReport("concept", **lists))})

    first = result(0, computed=[c[0].key], awaited=[c[1].key])
    retry = result(1, computed=[c[1].key], cached=[c[2].key])
    report = shards.stage_reports({"concept": [j.key for j in c]}, [first, retry])["concept"]
    assert report.computed == [c[0].key, c[1].key]  # computed wins over awaited
    assert report.cached == [c[2].key]
    assert report.failed == {c[3].key: "its shard did not finish"}


def test_the_parent_splits_by_shard_jobs_and_fuses_whole_groups(tmp_path: Path) -> None:
    """The stage phase splits jobs (``shard_jobs`` a shard, at most ``shards``); the fusion
    phase splits fusion groups (a source's concepts, 4 at most), never one group over two
    shards, and the pairs whose input failed stay with the parent, failed."""
    from tests.conftest import make_image
    from tests.test_batch_engine import _plan as engine_plan

    for k in range(6):
        make_image(k, (16, 16)).save(tmp_path / f"i{k}.png")
    rows = [f"{tmp_path}/i{s}.png,{tmp_path}/i{r}.png,s{s}r{r},s{s}r{r}"
            for s in (0, 1, 2) for r in (3, 4, 5)]
    manifest = tmp_path / "m.csv"
    manifest.write_text("source,reference,output_name,pair_id\n" + "\n".join(rows) + "\n")
    the_plan, _ = engine_plan(tmp_path, manifest)
    settings = RunSettings.build({"shards": 8, "shard_jobs": 4})
    stage = shards.stage_slices(the_plan, {}, settings)
    assert len(stage) == 2 and sum(len(s.jobs) for s in stage) == 6  # ceil(6 / 4) shards
    stages = {k: StageReport(k) for k in ("concept", "content", "fusion")}
    ref5 = next(j.key for j in the_plan.concept_jobs if j.input_uri.endswith("i5.png"))
    stages["concept"].failed[ref5] = "boom"
    fusion, known = shards.fusion_slices(the_plan, stages, {},
                                         RunSettings.build({"shards": 2}))
    assert sorted(known) == ["s0r5", "s1r5", "s2r5"]
    assert {r.status for r in known.values()} == {"failed"}
    assert sorted(len(s.pairs) for s in fusion) == [2, 4]  # 3 groups of 2 over 2 shards
    for part in fusion:
        sources = {p.content_key for p in part.pairs}
        assert {j.key for j in part.jobs} == sources | {p.concept_key for p in part.pairs}
    assert sorted(p.row.pair_id for s in fusion for p in s.pairs) == sorted(
        f"s{s}r{r}" for s in (0, 1, 2) for r in (3, 4))


def test_an_embedded_run_cannot_shard_and_says_why(prefect_harness, tiny_model_dir,
                                                   tmp_path: Path) -> None:
    """No shard deployment on the server: one line naming it and the fix, not a hang."""
    from flows.restyle import restyle
    from tests.conftest import make_image

    for k in (0, 1):
        make_image(k).save(tmp_path / f"img{k}.png")
    (tmp_path / "m.csv").write_text("source,reference\nimg0.png,img1.png\n")
    with pytest.raises(RuntimeError, match="restyle-shard/shard.*use shards = 1"):
        restyle(manifest_uri=str(tmp_path / "m.csv"), output_uri=str(tmp_path / "out"),
                model=str(tiny_model_dir), settings={"shards": 2})


# ------------------------------------------------------------------ shard sizes
def test_shard_count_targets_jobs_per_shard_at_most_shards() -> None:
    assert shards.shard_count(10, 4) == 4  # no target: always `shards`
    assert shards.shard_count(3, 4) == 3  # never more shards than jobs
    assert shards.shard_count(0, 4) == 0
    assert shards.shard_count(100, 8, shard_jobs=30) == 4  # ceil(100 / 30)
    assert shards.shard_count(90, 8, shard_jobs=30) == 3
    assert shards.shard_count(1000, 8, shard_jobs=30) == 8  # capped by `shards`
    assert shards.shard_count(5, 8, shard_jobs=30) == 1
    with pytest.raises(ValueError):
        shards.shard_count(5, 2, shard_jobs=0)


def test_shard_jobs_is_a_setting_and_a_flag_that_needs_shards() -> None:
    from vct.batch.settings import RunSettings
    from vct.cli import build_parser, settings_from
    from vct.config import ConfigError

    args = build_parser().parse_args(["run", "m.csv", "--output", "o", "--model", "tiny",
                                      "--shards", "8", "--shard-jobs", "30"])
    assert settings_from(args).shard_jobs == 30 and settings_from(args).shards == 8
    assert RunSettings().shard_jobs is None
    with pytest.raises(ConfigError, match=r"shard_jobs \(--shard-jobs\): needs shards > 1"):
        RunSettings.build({"shard_jobs": 30})
