"""The library side of sharded runs (vct.batch.shards), without Prefect: how jobs are split, the
plan a shard reads (JSON, by URI only), what a shard reports, and how the parent turns its
shards' results into the run's stage reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vct import storage
from vct.batch import shards
from vct.batch.claims import Owner
from vct.batch.jobs import Job
from vct.batch.summary import StageReport
from vct.batch.workers import ExecutorSettings
from vct.cache import cache_key


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


def test_the_stored_plan_is_json_that_gives_each_shard_its_jobs(tmp_path: Path) -> None:
    run = str(tmp_path / "run")
    jobs = [_job("concept", 0, 3), _job("content", 1, 2), _job("content", 2, 1)]
    uri = shards.write_phase(run, "r1", "cache", "stage", shards.split(jobs, 2))
    assert uri == storage.join(run, "_plan", "plan.json")
    shards.write_phase(run, "r1", "cache", "fusion", [[_job("fusion", 9, 1)]])
    plan = json.loads(Path(uri).read_text())  # plain JSON, jobs as dicts
    assert set(plan["phases"]) == {"stage", "fusion"} and plan["cache_uri"] == "cache"
    got = shards.shard_jobs(plan, "stage", 0) + shards.shard_jobs(plan, "stage", 1)
    assert sorted(got, key=lambda j: j.key) == sorted(jobs, key=lambda j: j.key)
    with pytest.raises(ValueError, match="no stage shard 5"):
        shards.shard_jobs(plan, "stage", 5)


def test_a_shard_runs_its_kinds_in_order_and_stores_its_result(tmp_path: Path) -> None:
    run = str(tmp_path / "run")
    jobs = [_job("concept", 0, 3), _job("content", 1, 2)]
    uri = shards.write_phase(run, "r1", str(tmp_path / "cache"), "stage", [jobs])
    seen = []

    def fake_stage(kind, kind_jobs, executor):
        seen.append((kind, [j.key for j in kind_jobs]))
        report = StageReport(kind, computed=[j.key for j in kind_jobs])
        if kind == "content":
            report.computed, report.awaited = [], [kind_jobs[0].key]
        return report

    executor = ExecutorSettings(model="unused", cache_uri=str(tmp_path / "cache"))
    result = shards.run_shard(uri, 0, "stage", executor, attempt=1, worker="w1",
                              flow_run_id="f1", run_stage=fake_stage)
    assert seen == [("concept", [jobs[0].key]), ("content", [jobs[1].key])]
    assert result.computed == [jobs[0].key] and result.awaited == [jobs[1].key]
    assert shards.read_result(run, "stage", 0, 1) == result
    assert result.worker == "w1" and result.flow_run_id == "f1"
    assert not shards.lease_expired(run, "r1", "stage", 0, "f1")  # released when it finished


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
    first = shards.ShardResult("stage", 0, 0, computed=[c[0].key], awaited=[c[1].key])
    retry = shards.ShardResult("stage", 0, 1, computed=[c[1].key], cached=[c[2].key])
    report = shards.stage_reports(("concept",), {"concept": c}, [first, retry])["concept"]
    assert report.computed == [c[0].key, c[1].key]  # computed wins over awaited
    assert report.cached == [c[2].key]
    assert report.failed == {c[3].key: "its shard did not finish"}


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
