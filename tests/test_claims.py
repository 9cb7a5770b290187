"""Claims with leases (vct.batch.claims) and the compare-and-swap they stand on, no Prefect.

Every test runs on local disk and on a real S3 endpoint (moto over loopback): a claim is an
object next to the cache, created if absent, renewed and taken over only by the version its
writer saw. The racing tests run real concurrency (threads, and processes on local disk) with a
fake runner that records each computation, so "computed once" is counted, not assumed.
"""

from __future__ import annotations

import json
import multiprocessing
import threading
import time
from pathlib import Path

import pytest

from vct import storage
from vct.batch.claims import Claims, Owner
from vct.batch.jobs import Job, JobOutcome
from vct.batch.plan import Plan
from vct.batch.pool import run_pool
from vct.batch.workers import ExecutorSettings
from vct.batch.workers.local import LocalBackend
from vct.cache import StageCache, cache_key
from vct.report.run_record import StageReport


class FakeClaims(Claims):
    """Claims over the Recorder's stand-in entries (bytes, not artifacts): present = landed."""

    def landed(self, kind: str, key: str) -> bool:
        return self.cache.contains(kind, key)


def run_claimed(root: str, jobs: list[Job], runner, claims: Claims | None = None
                ) -> StageReport:
    """``jobs`` through the job pool, as a stage shard runs them: in process, ``runner``
    computing, every key under a claim (``claims``; FakeClaims by default)."""
    the_plan = Plan(run_id="t", run_uri=storage.join(root, "run"), manifest_uri="",
                    model_identity="m" * 64, pairs=[], errors=[],
                    concept_jobs=[j for j in jobs if j.kind == "concept"],
                    content_jobs=[j for j in jobs if j.kind == "content"])
    backend = LocalBackend(ExecutorSettings(model="unused", cache_uri=root), runner)
    outcome = run_pool(the_plan, backend, root, claims=claims or FakeClaims(root))
    return outcome.stages[jobs[0].kind]


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path: Path) -> str:
    """A cache root on local disk or in a fresh moto bucket."""
    if request.param == "local":
        return str(tmp_path / "cache")
    return request.getfixturevalue("s3_bucket") + "/cache"


def _jobs(n: int, kind: str = "concept") -> list[Job]:
    return [Job(kind=kind, key=cache_key(kind, {"n": i}), input_uri=f"ref{i}.png", config={})
            for i in range(n)]


class Recorder:
    """A runner that 'computes' a job by storing its entry after a pause, and counts it."""

    def __init__(self, cache_uri: str, pause_s: float = 0.05, fail: set[str] | None = None):
        self.cache = StageCache(cache_uri)
        self.pause_s = pause_s
        self.fail = fail or set()
        self.computed: list[str] = []
        self.lock = threading.Lock()

    def __call__(self, jobs, executor, on_progress=None, progress=None) -> list[JobOutcome]:
        out = []
        for job in jobs:
            with self.lock:
                self.computed.append(job.key)
            time.sleep(self.pause_s)
            if job.key in self.fail:
                out.append(JobOutcome(job.kind, job.key, ok=False, rank=0, seconds=0.0,
                                      error="boom"))
                continue
            self.cache.put(job.kind, job.key, b"result of " + job.key.encode())
            out.append(JobOutcome(job.kind, job.key, ok=True, rank=0, seconds=self.pause_s))
        return out


# --------------------------------------------------------------- the compare-and-swap underneath
def test_versioned_objects_swap_only_from_the_version_seen(root: str) -> None:
    uri = storage.join(root, "lease.json")
    assert storage.read_versioned(uri) is None
    v1 = storage.conditional_put(uri, b"one", None)
    assert v1 and storage.conditional_put(uri, b"again", None) is None
    assert storage.read_versioned(uri) == (b"one", v1)
    # The version a listing shows is the one a swap compares with.
    assert [o.etag for o in storage.list_objects(root, (".json",))] == [v1]
    v2 = storage.conditional_put(uri, b"two", v1)
    assert v2 and v2 != v1
    assert storage.conditional_put(uri, b"stale", v1) is None  # someone swapped meanwhile
    assert storage.read_versioned(uri)[0] == b"two"
    assert storage.delete_if_match(uri, v1) is False
    assert storage.read_versioned(uri)[0] == b"two"
    assert storage.delete_if_match(uri, v2) is True
    assert storage.read_versioned(uri) is None
    assert storage.conditional_put(uri, b"x", v2) is None  # gone: nothing to replace
    assert storage.delete_if_match(uri, v2) is False


# --------------------------------------------------------------- one claim's life
def test_a_live_claim_excludes_others_and_an_expired_one_is_taken_over(root: str) -> None:
    now = [1000.0]
    holder = FakeClaims(root, Owner(worker="a"), lease_s=60, poll_s=0.01, clock=lambda: now[0])
    other = FakeClaims(root, Owner(worker="b"), lease_s=60, poll_s=0.01, clock=lambda: now[0])
    key = _jobs(1)[0].key
    mine = holder.acquire("concept", key)
    assert mine is not None
    record, _ = holder.read("concept", key)
    assert record["owner"]["worker"] == "a" and record["expires_at"] == 1060.0
    assert other.acquire("concept", key) is None  # live: not ours

    now[0] = 1050.0
    assert holder.renew(mine) is True
    now[0] = 1100.0  # past the first expiry, within the renewed one
    assert other.acquire("concept", key) is None

    now[0] = 1111.0  # the holder stopped renewing (dead): expired
    theirs = other.acquire("concept", key)
    assert theirs is not None and theirs.record["took_over"]["worker"] == "a"
    assert holder.renew(mine) is False and mine.lost  # the late holder notices, never overwrites
    holder.release(mine)  # and its release does not delete the new owner's claim
    assert other.read("concept", key)[0]["owner"]["worker"] == "b"
    other.release(theirs)
    assert other.read("concept", key) is None


def test_the_renewer_thread_keeps_a_working_claim_alive(root: str) -> None:
    claims = Claims(root, Owner(), lease_s=0.6, poll_s=0.01)
    claim = claims.acquire("content", _jobs(1, "content")[0].key)
    first = claim.record["expires_at"]
    with claims.renewing([claim]):
        for _ in range(600):  # wait for a renewal, however slow the machine (no timing asserted)
            if claim.record["expires_at"] > first:
                break
            time.sleep(0.05)
    assert claim.record["expires_at"] > first and not claim.lost
    stored, _ = claims.read("content", claim.key)
    assert stored["expires_at"] == claim.record["expires_at"]


def test_an_unreadable_claim_never_blocks_its_key(root: str) -> None:
    claims = Claims(root, Owner(), lease_s=60, poll_s=0.01)
    key = _jobs(1)[0].key
    storage.write_bytes(claims.uri("concept", key), b"{not json")
    assert claims.acquire("concept", key) is not None


# --------------------------------------------------------------- racing for the same keys
def test_two_threads_racing_compute_each_key_once(root: str) -> None:
    jobs = _jobs(6)
    runner = Recorder(root, pause_s=0.05)
    results: dict[str, StageReport] = {}
    start = threading.Barrier(2)

    def contender(name: str) -> None:
        claims = FakeClaims(root, Owner(worker=name), lease_s=30, poll_s=0.02)
        start.wait()
        results[name] = run_claimed(root, jobs, runner, claims)

    threads = [threading.Thread(target=contender, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(runner.computed) == sorted(j.key for j in jobs)  # each once, fleet-wide
    for name in ("a", "b"):
        run = results[name]
        mine = set(run.computed)
        assert not run.failed
        assert mine.isdisjoint(run.awaited)
        assert mine | set(run.awaited) == {j.key for j in jobs}  # every job answered
    assert Claims(root).read("concept", jobs[0].key) is None  # nothing left claimed


def _process_contender(root: str, name: str, out: str, start) -> None:
    jobs = _jobs(6)
    runner = Recorder(root, pause_s=0.05)
    claims = FakeClaims(root, Owner(worker=name), lease_s=30, poll_s=0.02)
    start.wait()
    run = run_claimed(root, jobs, runner, claims)
    Path(out).write_text(json.dumps({"computed": runner.computed, "awaited": run.awaited}))


@pytest.mark.slow  # make test-slow (in make check): see pyproject.toml
def test_two_processes_racing_compute_each_key_once(tmp_path: Path) -> None:
    root = str(tmp_path / "cache")
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(2)
    outs = [tmp_path / f"{n}.json" for n in ("a", "b")]
    procs = [ctx.Process(target=_process_contender, args=(root, n, str(o), start))
             for n, o in zip(("a", "b"), outs)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    got = [json.loads(o.read_text()) for o in outs]
    computed = got[0]["computed"] + got[1]["computed"]
    assert sorted(computed) == sorted(j.key for j in _jobs(6))
    for g in got:
        assert set(g["computed"]) | set(g["awaited"]) == {j.key for j in _jobs(6)}


# --------------------------------------------------------------- owners that fail or die
def test_a_dead_owners_job_is_redone_by_the_next_one(root: str) -> None:
    jobs = _jobs(2)
    dead = FakeClaims(root, Owner(worker="dead"), lease_s=0.5, poll_s=0.02)
    assert dead.acquire("concept", jobs[0].key) is not None  # claimed, then never renewed
    runner = Recorder(root, pause_s=0.0)
    run = run_claimed(root, jobs, runner,
                      FakeClaims(root, Owner(worker="next"), lease_s=30, poll_s=0.05))
    assert sorted(runner.computed) == sorted(j.key for j in jobs)
    assert run.took_over == [jobs[0].key] and run.awaited == []


def test_a_waiter_uses_the_result_when_it_lands(root: str) -> None:
    jobs = _jobs(1)
    owner = FakeClaims(root, Owner(worker="owner"), lease_s=60, poll_s=0.02)
    claim = owner.acquire("concept", jobs[0].key)

    def finish_later() -> None:
        time.sleep(0.3)
        StageCache(root).put("concept", jobs[0].key, b"theirs")
        owner.release(claim)

    t = threading.Thread(target=finish_later)
    t.start()
    runner = Recorder(root)
    run = run_claimed(root, jobs, runner,
                      FakeClaims(root, Owner(worker="waiter"), lease_s=60, poll_s=0.02))
    t.join()
    assert runner.computed == [] and run.awaited == [jobs[0].key]
    assert run.computed == [] and run.failed == {}


def test_a_key_stored_between_the_look_and_the_claim_is_awaited(root: str) -> None:
    """The owner stores its result and lets go right after the waiter looked for it and just
    before the waiter claims it: the waiter looks once more after claiming, and awaits."""
    jobs = _jobs(1)
    owner = FakeClaims(root, Owner(worker="owner"), lease_s=60, poll_s=0.01)
    claim = owner.acquire("concept", jobs[0].key)

    class Racing(FakeClaims):
        looks = 0

        def landed(self, kind: str, key: str) -> bool:
            found = super().landed(kind, key)
            self.looks += 1
            if self.looks == 1:  # the waiter's first look: the owner finishes just after it
                StageCache(root).put(kind, key, b"theirs")
                owner.release(claim)
            return found

    runner = Recorder(root)
    run = run_claimed(root, jobs, runner, Racing(root, Owner(worker="waiter"), lease_s=60,
                                                 poll_s=0.01))
    assert runner.computed == [] and run.awaited == [jobs[0].key] and run.computed == []
    assert Claims(root).read("concept", jobs[0].key) is None  # the waiter let go of it too


def test_a_failed_job_releases_its_claim_and_the_next_one_tries(root: str) -> None:
    jobs = _jobs(1)
    failing = Recorder(root, fail={jobs[0].key})
    run = run_claimed(root, jobs, failing, FakeClaims(root, poll_s=0.02))
    assert list(run.failed) == [jobs[0].key] and run.computed == []
    assert Claims(root).read("concept", jobs[0].key) is None  # released on failure
    good = Recorder(root)
    run = run_claimed(root, jobs, good, FakeClaims(root, poll_s=0.02))
    assert good.computed == [jobs[0].key] and run.computed == [jobs[0].key]


def test_the_pool_claims_for_every_runner_and_reports_awaited(root: str, monkeypatch) -> None:
    """The job pool goes through claims whatever the runner: a key another owner holds is
    awaited, not computed, and the report says so."""
    monkeypatch.setenv("VCT_CLAIM_POLL_S", "0.05")
    jobs = _jobs(3)
    owner = FakeClaims(root, Owner(worker="elsewhere"), lease_s=60, poll_s=0.02)
    claim = owner.acquire("concept", jobs[1].key)
    runner = Recorder(root)

    def finish_when_the_others_are_done() -> None:
        while len(runner.computed) < 2:
            time.sleep(0.02)
        StageCache(root).put("concept", jobs[1].key, b"theirs")
        owner.release(claim)

    t = threading.Thread(target=finish_when_the_others_are_done)
    t.start()
    report = run_claimed(root, jobs, runner)
    t.join()
    assert sorted(report.computed) == sorted([jobs[0].key, jobs[2].key])
    assert report.awaited == [jobs[1].key] and not report.failed
    assert sorted(runner.computed) == sorted(report.computed)


def test_a_bad_entry_is_recomputed_not_awaited(root: str) -> None:
    """The real check verifies the entry: one that fails verification is why the job is asked
    for again, so it must be computed, never taken as someone else's result."""
    jobs = _jobs(1)
    StageCache(root).put("concept", jobs[0].key, b"truncated garbage")
    runner = Recorder(root)
    run = run_claimed(root, jobs, runner, Claims(root, poll_s=0.02))
    assert runner.computed == [jobs[0].key] and run.awaited == []
