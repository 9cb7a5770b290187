"""The job pool: one queue for concepts, contents and fusions, biggest first; a fusion runs as
soon as its inputs exist; claims of other processes are awaited; a sharded run (the pool in
each shard) writes the same bytes; utilization is recorded. On 2 accelerate CPU ranks, through the
flow: tests/test_flow.py::test_accelerate_fan_out_gives_the_same_outputs_as_in_process."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from tests.conftest import make_image
from tests.test_batch_engine import FakeRunner, Overlapping, _manifest, _plan, _run
from tests.test_batch_engine import inputs as inputs  # the fixture
from tests.test_shards import in_process
from vct.batch import engine, shards
from vct.batch.claims import Claims, Owner
from vct.batch.jobs import Job
from vct.batch.pool import rank_usage, run_pool
from vct.batch.queue import JobQueue
from vct.batch.settings import RunSettings
from vct.batch.workers.local import LocalBackend


def _job(kind: str, n: int, cost: float, config: dict | None = None) -> Job:
    return Job(kind, f"{n:064x}", f"/img/{n}.png", config or {}, cost=cost)


def test_the_queue_is_biggest_first_and_ties_keep_their_order() -> None:
    queue = JobQueue()
    for job in (_job("concept", 1, 5.0), _job("content", 2, 9.0), _job("content", 3, 5.0),
                _job("fusion", 4, 7.0)):
        queue.push(job)
    order = []
    while unit := queue.pop_unit():
        order += [int(j.key, 16) for j in unit]
    assert order == [2, 4, 1, 3]


def test_what_unblocks_more_work_goes_first() -> None:
    """A concept that three fusions wait on runs before a bigger content that one waits on."""
    queue = JobQueue()
    queue.push(_job("content", 1, 9.0), unblocks=12.0)
    queue.push(_job("concept", 2, 5.0), unblocks=36.0)
    queue.push(_job("fusion", 3, 20.0))
    assert [int(queue.pop_unit()[0].key, 16) for _ in range(3)] == [2, 1, 3]


def test_a_crossed_manifest_runs_its_concepts_first(tmp_path, inputs) -> None:
    """2 sources x 2 references: each concept gates both fusions, each content one; a fusion
    (2 concepts: 2 (1 + 2) T = 18) outranks what unblocks less than itself."""
    m = _manifest(tmp_path, [f"{inputs[s]},{inputs[r]},{s}{r}" for s in ("a", "b")
                             for r in ("ref1", "ref2")])
    plan, executor = _plan(tmp_path, m, concept={"max_train_steps": 2,
                                                 "gradient_accumulation_steps": 1},
                           content={"num_inference_steps": 3, "num_inner_steps": 1})
    runner = Recording()
    engine.run_pool(plan, executor, runner=runner)
    # concepts: 2 + 18 + 18; contents: 9 + 18; the first fusion (18) is runnable before the
    # second content (27) and waits for it.
    assert [kind for kind, _ in runner.order] == ["concept", "concept", "content", "content",
                                                  "fusion", "fusion"]


def test_content_batches_take_the_next_contents_of_the_same_config() -> None:
    queue = JobQueue(content_batch=2)
    jobs = [_job("content", 1, 9.0, {"t": 1}), _job("content", 2, 8.0, {"t": 2}),
            _job("concept", 3, 8.5), _job("content", 4, 7.0, {"t": 1}),
            _job("content", 5, 6.0, {"t": 1})]
    for job in jobs:
        queue.push(job)
    units = []
    while unit := queue.pop_unit():
        units.append([int(j.key, 16) for j in unit])
    # 1 takes 4 (same config, next biggest); 5 is alone at the end; 2 has no partner.
    assert units == [[1, 4], [3], [2], [5]]


class Recording(FakeRunner):
    """The fake runner, also recording the order in which jobs ran."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.order: list[tuple[str, str]] = []

    def __call__(self, jobs, settings, **kw):
        self.order += [(j.kind, j.input_uri) for j in jobs]
        return super().__call__(jobs, settings, **kw)


def test_a_fusion_runs_as_soon_as_its_inputs_exist(tmp_path, inputs) -> None:
    """No stage barrier: source a's fusion with two concepts (2 (1 + 2) T = 18) runs as soon as
    it is runnable, before the concept of source b (2 + its fusion 12 = 14)."""
    m = _manifest(tmp_path, [f"{inputs['a']},{inputs['ref1']},p1",
                             f"{inputs['a']},{inputs['ref2']},p2",
                             f"{inputs['b']},{inputs['ref3']},p3"])
    # Costs: concepts 2 x 1 = 2 each, contents T (1 + 2) = 9 each, T = 3.
    plan, executor = _plan(tmp_path, m, concept={"max_train_steps": 2,
                                                 "gradient_accumulation_steps": 1},
                           content={"num_inference_steps": 3, "num_inner_steps": 1})
    runner = Recording()
    outcome = engine.run_pool(plan, executor, runner=runner)
    fusion_a = runner.order.index(("fusion", str(inputs["a"])))
    assert fusion_a < runner.order.index(("concept", str(inputs["ref3"])))
    assert {p.status for p in outcome.pairs.values()} == {"ok"}
    assert (tmp_path / "out" / "run" / "p1.png").is_file()


def test_a_key_claimed_elsewhere_is_awaited_not_computed(tmp_path, inputs, monkeypatch) -> None:
    monkeypatch.setenv("VCT_CLAIM_POLL_S", "0.05")
    m = _manifest(tmp_path, [f"{inputs['a']},{inputs['ref1']},p1"])
    plan, executor = _plan(tmp_path, m)
    concept = plan.concept_jobs[0]
    other = Claims(executor.cache_uri, Owner(worker="elsewhere"), lease_s=30.0)
    claim = other.acquire("concept", concept.key)
    assert claim is not None

    def the_other_process_finishes() -> None:
        time.sleep(0.5)
        FakeRunner()([concept], executor)
        other.release(claim)

    thread = threading.Thread(target=the_other_process_finishes)
    thread.start()
    runner = Recording()
    outcome = engine.run_pool(plan, executor, runner=runner)
    thread.join()
    assert ("concept", concept.input_uri) not in runner.order
    assert outcome.stages["concept"].awaited == [concept.key]
    assert outcome.pairs["p1"].status == "ok"


def test_utilization_is_recorded_per_rank(tmp_path, inputs) -> None:
    m = _manifest(tmp_path, [f"{inputs['a']},{inputs['ref1']},p1"])
    plan, executor = _plan(tmp_path, m)
    outcome = engine.run_pool(plan, executor, runner=FakeRunner())
    [rank] = outcome.ranks
    assert rank["rank"] == 0 and rank["jobs"] == 3
    assert 0 < rank["busy_s"] <= rank["ready_s"] and 0 < rank["utilization"] <= 1
    assert outcome.details()["pool"]["min_utilization"] == rank["utilization"]


def test_utilization_is_busy_over_the_time_from_ready_to_the_last_outcome() -> None:
    usage = [{"rank": 1, "jobs": 2, "busy_s": 9.0, "load_s": 1.5, "ready_at": 100.0},
             {"rank": 0, "jobs": 1, "busy_s": 3.0, "load_s": 1.0, "ready_at": 104.0},
             {"rank": 2, "jobs": 0, "busy_s": 0.0, "load_s": 0.0, "ready_at": None}]
    assert [(r["rank"], r["ready_s"], r["utilization"]) for r in rank_usage(usage, 110.0)] \
        == [(0, 6.0, 0.5), (1, 10.0, 0.9), (2, None, None)]


def test_the_workers_shutdown_is_not_counted_as_idle(tmp_path, inputs) -> None:
    """Stopping the workers after the last outcome (accelerate ranks exiting) is pool wall
    time but no rank's idle time: it would make every rank look idle in proportion."""
    m = _manifest(tmp_path, [f"{inputs['a']},{inputs['ref1']},p1"])
    plan, executor = _plan(tmp_path, m)
    backend = LocalBackend(executor, runner=FakeRunner())
    close = backend.close

    def slow_close() -> None:
        time.sleep(1.0)
        close()

    backend.close = slow_close
    outcome = run_pool(plan, backend, executor.cache_uri)
    [rank] = outcome.ranks
    assert outcome.wall_s >= 1.0 and rank["ready_s"] < outcome.wall_s - 0.9


def test_a_complete_rerun_reads_no_stage_entry_and_a_lost_cache_recomputes_nothing(
        tmp_path, inputs, monkeypatch) -> None:
    """What a finished pair needs is already written: a rerun only looks its stage results up
    (no read; 10 000 contents of ~12 MB at SD 1.5 scale were read just to be verified), and
    with the cache gone it computes nothing for pairs whose outputs are kept."""
    import shutil

    from vct.batch import pool as pool_module

    m = _manifest(tmp_path, [f"{inputs['a']},{inputs['ref1']},p1",
                             f"{inputs['b']},{inputs['ref1']},p2"])
    _run(tmp_path, m, FakeRunner())
    read: list[str] = []
    real = pool_module.load

    def counting(cache, kind, key):
        read.append(kind)
        return real(cache, kind, key)

    monkeypatch.setattr(pool_module, "load", counting)
    again = FakeRunner()
    summary, _ = _run(tmp_path, m, again)
    assert {p.status for p in summary.pairs} == {"skipped"} and not again.ran
    assert read == [] and summary.counts["concepts_cached"] == 1
    assert summary.counts["contents_cached"] == 2
    shutil.rmtree(tmp_path / "cache")
    summary, _ = _run(tmp_path, m, again)
    assert {p.status for p in summary.pairs} == {"skipped"} and not again.ran
    # one pair unfinished: its family's content and concept are needed, and computed
    (tmp_path / "out" / "run" / "p2.json").unlink()
    summary, _ = _run(tmp_path, m, again)
    assert {p.pair_id: p.status for p in summary.pairs} == {"p1": "skipped", "p2": "ok"}
    assert again.ran == {"concept": 1, "content": 1, "fusion": 1}


def test_the_start_looks_stage_results_up_at_once_into_the_runs_memo(tmp_path, inputs,
                                                                     monkeypatch) -> None:
    from vct.batch import pool as pool_module
    from vct.batch.pool import JobPool
    from vct.cache import active_memo, result_memo

    m = _manifest(tmp_path, [f"{inputs[s]},{inputs[r]},{s}{r}" for s in ("a", "b")
                             for r in ("ref1", "ref2")])
    plan, executor = _plan(tmp_path, m, plan_threads=4)
    jobs = [*plan.concept_jobs, *plan.content_jobs]
    FakeRunner()(jobs, executor)
    slow = Overlapping(pool_module.load)
    monkeypatch.setattr(pool_module, "load", slow)
    the_pool = JobPool(plan, LocalBackend(executor, runner=FakeRunner()), executor.cache_uri)
    with result_memo():
        found = the_pool._look_up(jobs, {(j.kind, j.key) for j in jobs})
        memo = active_memo()
        assert found == [True] * 4 and slow.peak > 1
        assert all(memo.get((the_pool.cache.root_uri, j.kind, j.key)) for j in jobs)


# ---------------------------------------------------------------- the real model
FAST = {"concept": {"max_train_steps": 2, "gradient_accumulation_steps": 1,
                    "reference_resolution": 32},
        "content": {"num_inference_steps": 3, "num_inner_steps": 2, "resolution": 32},
        "fusion": {}}


@pytest.fixture(scope="module")
def crossed(tmp_path_factory) -> Path:
    """3 sources x 2 references, crossed: 6 pairs, 2 concepts, 3 contents, 3 fusion groups."""
    root = tmp_path_factory.mktemp("crossed")
    rows = []
    for s in range(3):
        make_image(s, (32, 32)).save(root / f"s{s}.png")
    for r in range(2):
        make_image(4 + r, (32, 32)).save(root / f"r{r}.png")
    for s in range(3):
        for r in range(2):
            rows.append(f"{root}/s{s}.png,{root}/r{r}.png,s{s}r{r}")
    (root / "m.csv").write_text("source,reference,output_name\n" + "\n".join(rows) + "\n")
    return root


def _pngs(run_uri: str) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(run_uri).glob("*.png"))
            if not p.name.startswith(("contact_sheet", "report"))}


def _settings(tmp: Path, **extra) -> RunSettings:
    return RunSettings.build({**FAST, "cache_uri": str(tmp / "cache"), "threads": 1, **extra})


def test_a_sharded_run_gives_the_pools_bytes(crossed, tiny_model_dir, tmp_path) -> None:
    """Two shards a phase (the pool in each, run here one after the other) against one pool,
    each with its own cache: every job computed twice, the same PNG bytes."""
    pooled = engine.run(engine.prepare(str(crossed / "m.csv"), str(tmp_path / "pool"),
                                       str(tiny_model_dir), _settings(tmp_path / "p")))
    assert pooled.status == "complete"
    request = engine.prepare(str(crossed / "m.csv"), str(tmp_path / "shards"),
                             str(tiny_model_dir), _settings(tmp_path / "s", shards=2))
    plan = engine.plan(request)
    seen: list[tuple[int, int]] = []
    sharded = shards.run_sharded(plan, request.cache_uri, request.settings, {},
                                 in_process(request.executor()),
                                 on_progress=lambda done, total: seen.append((done, total)))
    assert {p.status for p in sharded.pairs.values()} == {"ok"}
    # progress by UNet cost: the stage phase's share once it ends, then all of it
    (stage, total), end = seen
    assert 0 < stage < total and end == (total, total)
    assert [(r.phase, r.shard) for r in sharded.shards] == [
        ("stage", 0), ("stage", 1), ("fusion", 0), ("fusion", 1)]
    assert sharded.stages["concept"].computed and sharded.stages["content"].computed
    got, want = _pngs(pooled.run_uri), _pngs(plan.run_uri)
    assert len(want) == 6 and got == want


def test_one_sources_fusion_groups_spread_over_shards_with_the_same_bytes(
        tiny_model_dir, tmp_path) -> None:
    """One source, 6 references: two fusion groups (4 concepts and 2, sharing B*). The fusion
    phase gives each group to its own shard; every PNG is the one pool's."""
    root = tmp_path / "in"
    root.mkdir()
    make_image(0, (32, 32)).save(root / "s.png")
    for r in range(6):
        make_image(3 + r, (32, 32)).save(root / f"r{r}.png")
    (root / "m.csv").write_text("source,reference,output_name\n" + "".join(
        f"{root}/s.png,{root}/r{r}.png,r{r}\n" for r in range(6)))
    pooled = engine.run(engine.prepare(str(root / "m.csv"), str(tmp_path / "pool"),
                                       str(tiny_model_dir), _settings(tmp_path / "p")))
    request = engine.prepare(str(root / "m.csv"), str(tmp_path / "shards"),
                             str(tiny_model_dir), _settings(tmp_path / "s", shards=2))
    plan = engine.plan(request)
    sharded = shards.run_sharded(plan, request.cache_uri, request.settings, {},
                                 in_process(request.executor()))
    fusion = [r for r in sharded.shards if r.phase == "fusion"]
    assert sorted(len(r.pairs) for r in fusion) == [2, 4]
    assert {p.status for p in sharded.pairs.values()} == {"ok"}
    got, want = _pngs(pooled.run_uri), _pngs(plan.run_uri)
    assert len(want) == 6 and got == want
