"""The parent of a sharded run (flows/fleet.py) against a fake Prefect client: a shard no worker
takes is given up with one line naming the pool, each parent attempt dispatches its own shard
flow runs, ``shard_jobs`` sets how many, and cancelling the parent cancels its unfinished
shards (also against a real embedded Prefect, as the parent's state hook does)."""

from __future__ import annotations

import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
from prefect.client.schemas.objects import StateType

from tests.test_shards import _job
from vct.batch import shards
from vct.batch.jobs import JobOutcome
from vct.batch.plan import Plan
from vct.batch.workers import ExecutorSettings


class _Run(SimpleNamespace):
    """A flow run as the Prefect client returns it, with what Fleet reads."""

    def set(self, kind: str, name: str | None = None) -> None:
        self.state = SimpleNamespace(type=StateType(kind), name=name or kind.title())


class FakeClient:
    """The few Prefect client calls Fleet makes, on flow runs held in memory."""

    def __init__(self, tick: float = 0.0):
        self.runs: dict[str, _Run] = {}
        self.children: dict[str, list[str]] = {}
        self.proposed: list[tuple[str, str, str]] = []  # (run id, state type, message)
        self.labels: dict[str, dict] = {}
        self.now, self.tick = 0.0, tick
        self.on_read = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def add(self, state: str = "SCHEDULED", **fields) -> _Run:
        run = _Run(id=uuid.uuid4(), name=f"run-{len(self.runs)}", labels={},
                   work_pool_name="vct-process", work_queue_name="default")
        run.__dict__.update(fields)
        run.set(state)
        self.runs[str(run.id)] = run
        return run

    def read_flow_run(self, run_id):
        self.now += self.tick
        run = self.runs[str(run_id)]
        if self.on_read:
            self.on_read(run)
        return run

    def set_flow_run_state(self, run_id, state, force: bool = False):
        run = self.runs[str(run_id)]
        kind = state.type.value
        self.proposed.append((str(run_id), kind, state.message or ""))
        run.set(kind)
        return SimpleNamespace(state=run.state)

    def update_flow_run_labels(self, run_id, labels) -> None:
        self.labels.setdefault(str(run_id), {}).update(labels)
        self.runs[str(run_id)].labels.update(labels)

    def read_flow_runs(self, flow_run_filter=None):
        parents = flow_run_filter.parent_flow_run_id.any_
        return [self.runs[c] for p in parents for c in self.children.get(str(p), [])]


def _fleet(tmp_path: Path, client: FakeClient, settings: dict, run_count: int = 1,
           parent: str | None = None):
    from flows.fleet import Fleet
    from vct.batch.settings import RunSettings

    plan = Plan(run_id="r1", run_uri=str(tmp_path / "run"), manifest_uri="m.csv",
                model_identity="m" * 64, pairs=[], errors=[])
    request = SimpleNamespace(settings=RunSettings.build(settings), model="tiny",
                              cache_uri=str(tmp_path / "cache"))
    parent = parent or str(client.add("RUNNING").id)

    class TestFleet(Fleet):
        keys: list[str] = []

        def _client(self):
            return client

        def _run_deployment(self, key, uri, phase, shard, attempt):
            self.keys.append(key)
            return client.add("SCHEDULED", shard=shard, attempt=attempt)

    fleet = TestFleet(plan, request, parent, run_count)
    fleet.clock = lambda: client.now
    return fleet


def test_a_shard_no_worker_takes_is_cancelled_and_its_jobs_fail_naming_the_pool(
        tmp_path: Path, monkeypatch) -> None:
    """Shard 1 never starts. It is not given up while shard 0 runs (longer than the timeout:
    it may be queued behind it), only once nothing of the phase has run or moved for 900 s;
    then it is cancelled through the client, not retried, and its jobs fail with one line."""
    monkeypatch.setenv("VCT_SHARD_POLL_S", "0")
    monkeypatch.delenv("VCT_SHARD_START_TIMEOUT_S", raising=False)
    client = FakeClient(tick=50.0)
    fleet = _fleet(tmp_path, client, {"shards": 2})
    jobs = [_job("concept", 0, 5), _job("content", 1, 1)]
    slices = [shards.Slice(jobs=part) for part in shards.split(jobs, 2)]
    uri = shards.write_phase(fleet.plan, str(tmp_path / "cache"), {}, "stage", slices)
    reads: dict[int, int] = {}
    done_at: list[float] = []

    def script(run: _Run) -> None:  # shard 0: runs for 40 reads (2000 s), then completes
        if getattr(run, "shard", None) != 0:
            return
        reads[0] = reads.get(0, 0) + 1
        if reads[0] == 1:
            run.set("RUNNING")
        elif reads[0] == 40:
            shards.run_shard(uri, 0, "stage", ExecutorSettings(
                model="unused", cache_uri=str(tmp_path / "cache")), flow_run_id=str(run.id),
                runner=lambda unit, settings, **_: [JobOutcome(j.kind, j.key, True, 0, 0.01)
                                                    for j in unit])
            run.set("COMPLETED")
            done_at.append(client.now)

    client.on_read = script
    results = fleet.run_phase("stage", uri, slices)
    first, lost = sorted((r.to_dict() for r in results), key=lambda r: r["shard"])
    assert first["state"] == "COMPLETED"
    assert first["stages"]["concept"]["computed"] == [jobs[0].key]
    assert lost["state"] == "CANCELLED"
    message = lost["error"]
    assert message.startswith("no worker took stage shard 1 of restyle-shard/shard within "
                              "900 s") and "pool 'vct-process'" in message
    assert "\n" not in message
    assert [(p[1], p[2]) for p in client.proposed] == [("CANCELLED", message)]
    assert client.runs[lost["flow_run_id"]].state.type.value == "CANCELLED"
    # given up 900 s after shard 0 finished (it ran 4000 s), not 900 s after its dispatch
    assert done_at[0] > 3900 and done_at[0] + 900 <= client.now <= done_at[0] + 900 + 100
    reports = shards.stage_reports({"concept": [jobs[0].key], "content": [jobs[1].key]},
                                   results)
    assert reports["concept"].computed == [jobs[0].key]
    assert reports["content"].failed == {jobs[1].key: message}
    assert len(fleet.keys) == 2  # not re-dispatched: no worker would take it either


def test_the_start_timeout_comes_from_the_environment(tmp_path: Path, monkeypatch) -> None:
    from flows.fleet import start_timeout_s

    monkeypatch.setenv("VCT_SHARD_POLL_S", "0")
    monkeypatch.setenv("VCT_SHARD_START_TIMEOUT_S", "120")
    client = FakeClient(tick=10.0)
    fleet = _fleet(tmp_path, client, {"shards": 3})
    slices = [shards.Slice(jobs=[_job("concept", i, 1)]) for i in range(3)]
    uri = shards.write_phase(fleet.plan, str(tmp_path / "cache"), {}, "stage", slices)
    results = fleet.run_phase("stage", uri, slices)
    assert {r.state for r in results} == {"CANCELLED"} and len(results) == 3
    assert all("within 120 s" in r.error for r in results)
    assert 120 <= client.now <= 120 + 3 * 10 + 30
    for bad in ("0", "soon"):
        monkeypatch.setenv("VCT_SHARD_START_TIMEOUT_S", bad)
        with pytest.raises(ValueError, match="VCT_SHARD_START_TIMEOUT_S"):
            start_timeout_s()


def test_each_parent_attempt_dispatches_its_own_shard_runs(tmp_path: Path) -> None:
    """The key holds the parent's run count: a retried parent (run_count 2) gets new shard
    flow runs, while a repeated dispatch within one attempt gets the same one back."""
    from flows.fleet import idempotency_key

    key = idempotency_key("r1", "parent", 1, "stage", 3, 0)
    assert key == idempotency_key("r1", "parent", 1, "stage", 3, 0)
    others = {idempotency_key("r1", "parent", 2, "stage", 3, 0),
              idempotency_key("r1", "parent", 1, "stage", 3, 1),
              idempotency_key("r1", "parent", 1, "fusion", 3, 0),
              idempotency_key("r1", "other", 1, "stage", 3, 0)}
    assert key not in others and len(others) == 4

    client = FakeClient()
    parent = str(client.add("RUNNING").id)
    by_key: dict[str, _Run] = {}  # what run_deployment's idempotency does on the server
    fleets = [_fleet(tmp_path, client, {"shards": 2}, run_count=n, parent=parent)
              for n in (1, 1, 2)]
    for fleet in fleets:
        fleet._run_deployment = lambda key, *a: by_key.setdefault(key, client.add())
    ids = [f._start("plan-uri", "stage", 0, 0) for f in fleets]
    assert ids[0] == ids[1] and ids[2] != ids[0]
    record = shards.read_dispatched(str(tmp_path / "run"), parent)
    assert [(r["flow_run_id"], r["parent_run_count"]) for r in record] == [
        (str(ids[0]), 1), (str(ids[2]), 2)]  # one entry per flow run
    assert record[1]["idempotency_key"] == idempotency_key("r1", parent, 2, "stage", 0, 0)


def test_cancelling_the_parent_cancels_every_unfinished_shard_run(tmp_path: Path) -> None:
    """What the parent's state hooks call: the recorded shard runs (found through the
    parent's label, as a hook in the worker's process must) and its subflow runs on the
    server; finished ones are left alone."""
    from flows.fleet import RUN_URI_LABEL, cancel_dispatched

    client = FakeClient()
    run_uri = str(tmp_path / "run")
    parent = client.add("CANCELLING", labels={RUN_URI_LABEL: run_uri})
    waiting, running, done = client.add("SCHEDULED"), client.add("RUNNING"), client.add(
        "COMPLETED")
    unrecorded = client.add("PENDING")  # dispatched, its record not written yet
    for run in (waiting, running, done):
        shards.record_dispatch(run_uri, str(parent.id), {"flow_run_id": str(run.id)})
    client.children[str(parent.id)] = [str(running.id), str(unrecorded.id)]
    cancelled = cancel_dispatched(client, str(parent.id), "parent flow run Cancelling")
    assert sorted(cancelled) == sorted(str(r.id) for r in (waiting, running, unrecorded))
    assert waiting.state.type.value == "CANCELLED"  # nobody started it: Cancelled at once
    assert running.state.type.value == "CANCELLING"  # its worker stops its process
    assert done.state.type.value == "COMPLETED"
    assert all("cancelled with its parent flow run" in m for _, _, m in client.proposed)
    assert cancel_dispatched(client, str(parent.id), "again") == [
        str(running.id), str(unrecorded.id)]  # still not final; asked again, harmless
    # an unsharded parent: no label, no children, nothing to cancel
    assert cancel_dispatched(client, str(client.add("CANCELLED").id), "x") == []


def _fake_shard_flow_and_link(link_name: str):
    """A flow to create shard flow runs of, and a task to create the task run that links a
    subflow run to its parent (as Prefect does for a subflow or a ``run_deployment``)."""
    from prefect import flow, task

    @flow(name="fake-shard")
    def fake_shard() -> None:
        pass

    @task(name=link_name)
    def link() -> None:
        pass

    return fake_shard, link


def test_the_parents_state_hook_cancels_its_shards_on_a_real_prefect(prefect_harness,
                                                                     tmp_path: Path) -> None:
    """The hook as the worker's process calls it (no flow run context): the parent's label
    leads it to the record; a subflow run the record misses is found on the server; Prefect
    itself turns a Scheduled run's Cancelling into Cancelled."""
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelled, Completed, Running, Scheduled

    from flows.fleet import RUN_URI_LABEL
    from flows.restyle import _cancel_shards, restyle

    fake_shard, link_task = _fake_shard_flow_and_link("restyle-shard/shard")
    run_uri = str(tmp_path / "run")
    with get_client(sync_client=True) as client:
        parent = client.create_flow_run(restyle, parameters={"settings": {"shards": 2}},
                                        state=Running())
        client.update_flow_run_labels(parent.id, {RUN_URI_LABEL: run_uri})
        link = client.create_task_run(link_task, flow_run_id=parent.id, dynamic_key="0")
        waiting = client.create_flow_run(fake_shard, state=Scheduled())
        running = client.create_flow_run(fake_shard, state=Running())
        done = client.create_flow_run(fake_shard, state=Completed())
        unrecorded = client.create_flow_run(fake_shard, state=Scheduled(),
                                            parent_task_run_id=link.id)
        for run in (waiting, running, done):
            shards.record_dispatch(run_uri, str(parent.id), {"flow_run_id": str(run.id)})
        unsharded = client.create_flow_run(restyle, state=Running())
        other = client.create_flow_run(fake_shard, state=Scheduled())

        _cancel_shards(restyle, client.read_flow_run(parent.id), Cancelled())
        _cancel_shards(restyle, client.read_flow_run(unsharded.id), Cancelled())
        states = {name: client.read_flow_run(r.id).state for name, r in (
            ("waiting", waiting), ("running", running), ("done", done),
            ("unrecorded", unrecorded), ("other", other))}
    assert states["waiting"].type.value == "CANCELLED"
    assert "cancelled with its parent flow run" in states["waiting"].message
    assert states["running"].type.value == "CANCELLING"  # a worker would stop its process
    assert states["done"].type.value == "COMPLETED"
    assert states["unrecorded"].type.value == "CANCELLED"
    assert states["other"].type.value == "SCHEDULED"  # not this parent's


def test_the_incoming_runs_state_hook_cancels_its_subflows_shards_on_a_real_prefect(
        prefect_harness, tmp_path: Path) -> None:
    """restyle-incoming's hook as the worker calls it: the restyle subflow it started (linked
    by a task run, as Prefect links an in-process subflow) leads to that run's shards."""
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelled, Running, Scheduled

    from flows.fleet import RUN_URI_LABEL
    from flows.restyle import _incoming_ended, restyle, restyle_incoming

    fake_shard, link_task = _fake_shard_flow_and_link("restyle")
    run_uri = str(tmp_path / "run")
    with get_client(sync_client=True) as client:
        parent = client.create_flow_run(restyle_incoming,
                                        parameters={"settings": {"shards": 2}}, state=Running())
        link = client.create_task_run(link_task, flow_run_id=parent.id, dynamic_key="0")
        child = client.create_flow_run(restyle, state=Running(), parent_task_run_id=link.id)
        client.update_flow_run_labels(child.id, {RUN_URI_LABEL: run_uri})
        waiting = client.create_flow_run(fake_shard, state=Scheduled())
        shards.record_dispatch(run_uri, str(child.id), {"flow_run_id": str(waiting.id)})
        _incoming_ended(restyle_incoming, client.read_flow_run(parent.id), Cancelled())
        state = client.read_flow_run(waiting.id).state
    assert state.type.value == "CANCELLED"
    assert "cancelled with its parent flow run" in state.message


def test_cancelling_an_incoming_run_cancels_the_shards_of_the_runs_it_started(
        tmp_path: Path) -> None:
    """restyle-incoming runs each manifest's restyle as an in-process subflow: stopped with
    the incoming run's process, the subflow runs no hook of its own, so the incoming run's
    hook cancels its grandchildren (each child's shards), and leaves finished ones alone."""
    from flows.fleet import RUN_URI_LABEL, cancel_grandchildren

    client = FakeClient()
    incoming_run = client.add("CANCELLING")
    children, shard_runs = [], []
    for n in range(2):
        run_uri = str(tmp_path / f"run{n}")
        child = client.add("RUNNING", labels={RUN_URI_LABEL: run_uri})
        running, done = client.add("RUNNING"), client.add("COMPLETED")
        for run in (running, done):
            shards.record_dispatch(run_uri, str(child.id), {"flow_run_id": str(run.id)})
        children.append(str(child.id))
        shard_runs.append((running, done))
    client.children[str(incoming_run.id)] = children
    cancelled = cancel_grandchildren(client, str(incoming_run.id), "parent flow run Cancelled")
    assert sorted(cancelled) == sorted(str(running.id) for running, _ in shard_runs)
    assert all(done.state.type.value == "COMPLETED" for _, done in shard_runs)
    assert cancel_grandchildren(client, str(client.add("CANCELLED").id), "x") == []
