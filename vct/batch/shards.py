"""Sharded runs: one manifest's jobs split over several flow runs, on any workers of a pool.

Why here and not in the flow: what a shard is (which jobs, read from where, what it reports) is
the library's business; the flow only dispatches shard flow runs (Prefect's ``run_deployment``)
and gathers their states. A shard needs nothing but the URI of the stored plan:

    <run>/_plan/plan.json      {"run_id", "run_uri", "cache_uri", "phases": {
                                  "stage":  {"shards": [[job dict, ...], ...]},   concept+content
                                  "fusion": {"shards": [[job dict, ...], ...]}}}  added later
    <run>/_plan/results/<phase>-<shard>-a<attempt>.json   what one shard flow run did
    <run>/_plan/_claims/shard/<key>.json                  its liveness lease
    <run>/_plan/dispatched/<parent flow run id>.json      every shard flow run one parent
                                                          dispatched (so a state hook of the
                                                          parent, in another process, can
                                                          cancel them)

JSON only (jobs as dicts), never pickle: a plan is read by other machines. Every job still runs
through the engine's :func:`vct.batch.engine.run_stage`, so under a claim (a key another shard,
or another run, is computing is awaited, not recomputed) and answered from the cache when it
is there: a re-dispatched shard recomputes only what its crashed attempt did not finish.
"""

from __future__ import annotations

import json
import socket
import time
from dataclasses import asdict, dataclass, field

from vct import storage
from vct.batch.claims import Claims, Owner
from vct.batch.jobs import Job, from_fields
from vct.batch.summary import StageReport
from vct.batch.workers import ExecutorSettings
from vct.cache import cache_key

PLAN_DIR = "_plan"
PLAN_FILE = "plan.json"
RESULTS_DIR = "results"
DISPATCHED_DIR = "dispatched"
PHASES = {"stage": ("concept", "content"), "fusion": ("fusion",)}
"""A shard phase and the job kinds it runs, in order: concepts and contents first, then the
fusions whose inputs exist."""


def plan_uri(run_uri: str) -> str:
    return storage.join(run_uri, PLAN_DIR, PLAN_FILE)


def shard_count(n_jobs: int, shards: int, shard_jobs: int | None = None) -> int:
    """How many shards a phase of ``n_jobs`` (distinct) jobs runs as: ``shards``, or with a
    target of ``shard_jobs`` jobs per shard ``ceil(n_jobs / shard_jobs)``, at most ``shards``
    (never more shards than jobs, and at least one for a phase that has any)."""
    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    if shard_jobs is not None and shard_jobs < 1:
        raise ValueError(f"shard_jobs must be >= 1, got {shard_jobs}")
    if n_jobs <= 0:
        return 0
    wanted = shards if shard_jobs is None else -(-n_jobs // shard_jobs)
    return max(1, min(wanted, shards, n_jobs))


def split(jobs: list[Job], shards: int) -> list[list[Job]]:
    """At most ``shards`` non-empty shards balanced by cost: biggest job first, each to the
    least loaded shard (LPT; ties to the lowest index, so the split is deterministic)."""
    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    unique = list({(j.kind, j.key): j for j in jobs}.values())
    loads = [0.0] * min(shards, len(unique))
    out: list[list[Job]] = [[] for _ in loads]
    for job in sorted(unique, key=lambda j: -j.cost):
        i = min(range(len(loads)), key=lambda k: (loads[k], k))
        out[i].append(job)
        loads[i] += job.cost
    return out


def write_phase(run_uri: str, run_id: str, cache_uri: str, phase: str,
                shards: list[list[Job]]) -> str:
    """Store (or extend) the run's plan with one phase's shards; returns the plan's URI.
    Only the parent flow run writes it, atomically, before dispatching that phase."""
    if phase not in PHASES:
        raise ValueError(f"unknown shard phase {phase!r}; use one of {', '.join(PHASES)}")
    uri = plan_uri(run_uri)
    try:
        data = json.loads(storage.read_bytes(uri))
    except storage.StorageNotFound:
        data = {}
    if data.get("run_id") not in (None, run_id):
        data = {}  # another run's plan in this folder: replaced, never mixed
    data.update({"run_id": run_id, "run_uri": run_uri, "cache_uri": cache_uri})
    data.setdefault("phases", {})[phase] = {
        "shards": [[job.to_dict() for job in shard] for shard in shards]}
    storage.write_bytes(uri, json.dumps(data, indent=1).encode(), "application/json")
    return uri


def read_plan(uri: str) -> dict:
    return json.loads(storage.read_bytes(uri))


def shard_jobs(plan: dict, phase: str, shard: int) -> list[Job]:
    try:
        dicts = plan["phases"][phase]["shards"][shard]
    except (KeyError, IndexError):
        raise ValueError(f"plan {plan.get('run_uri')} has no {phase} shard {shard}") from None
    return [Job.from_dict(d) for d in dicts]


def dispatched_uri(run_uri: str, parent: str) -> str:
    return storage.join(run_uri, PLAN_DIR, DISPATCHED_DIR, f"{parent}.json")


def read_dispatched(run_uri: str, parent: str) -> list[dict]:
    """The shard flow runs parent flow run ``parent`` dispatched for this run, oldest first:
    ``{"flow_run_id", "phase", "shard", "attempt", "parent_run_count", "idempotency_key"}``."""
    try:
        return json.loads(storage.read_bytes(dispatched_uri(run_uri, parent)))["runs"]
    except storage.StorageNotFound:
        return []


def record_dispatch(run_uri: str, parent: str, entry: dict) -> None:
    """Add one dispatched shard flow run to the parent's record (its only writer; each write
    replaces the file atomically, so a reader sees the list before or after, never half)."""
    runs = [r for r in read_dispatched(run_uri, parent)
            if r.get("flow_run_id") != entry.get("flow_run_id")]
    body = {"parent_flow_run_id": parent, "runs": [*runs, entry]}
    storage.write_bytes(dispatched_uri(run_uri, parent), json.dumps(body, indent=1).encode(),
                        "application/json")


def result_uri(run_uri: str, phase: str, shard: int, attempt: int) -> str:
    return storage.join(run_uri, PLAN_DIR, RESULTS_DIR, f"{phase}-{shard}-a{attempt}.json")


def lease_key(run_id: str, phase: str, shard: int) -> str:
    """The key of a shard's liveness lease (the same for every attempt of that shard)."""
    return cache_key("shard", {"run_id": run_id, "phase": phase, "shard": shard})


def lease_claims(run_uri: str, **kwargs) -> Claims:
    """Leases of a run's shards live beside its plan: the parent reads them to tell a shard
    that is still working from one whose machine died (its flow run then stays Running)."""
    return Claims(storage.join(run_uri, PLAN_DIR), **kwargs)


@dataclass
class ShardResult:
    """What one shard flow run did: the row of ``run.json``'s ``shards`` list."""

    phase: str
    shard: int
    attempt: int
    flow_run_id: str = ""
    worker: str = ""
    host: str = ""
    state: str = "COMPLETED"
    computed: list[str] = field(default_factory=list)
    awaited: list[str] = field(default_factory=list)
    cached: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    bad: list[str] = field(default_factory=list)  # failed keys whose input did not decode
    took_over: list[str] = field(default_factory=list)
    unet_evals: dict[str, dict[str, int]] = field(default_factory=dict)  # kind -> counts
    busy_s: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ShardResult:
        return from_fields(cls, d)


def run_shard(plan_uri_: str, shard: int, phase: str, executor: ExecutorSettings,
              attempt: int = 0, worker: str = "", flow_run_id: str = "",
              run_stage=None) -> ShardResult:
    """Run one shard's jobs, kind by kind, through the engine; store and return its result.

    The shard's liveness lease is held (renewed) for the whole shard, so the parent can tell a
    dead machine from a slow one. ``run_stage`` is the engine's (a seam for tests)."""
    if run_stage is None:
        from vct.batch.engine import run_stage
    plan = read_plan(plan_uri_)
    jobs = shard_jobs(plan, phase, shard)
    run_uri, run_id = plan["run_uri"], plan["run_id"]
    leases = lease_claims(run_uri, owner=Owner(worker=worker, flow_run_id=flow_run_id))
    key = lease_key(run_id, phase, shard)
    lease = None
    for _ in range(3):  # a previous attempt's lease: ours once it expires (that one is dead)
        lease = leases.acquire("shard", key)
        if lease is not None:
            break
        time.sleep(leases.lease_s / 2)
    result = ShardResult(phase=phase, shard=shard, attempt=attempt, flow_run_id=flow_run_id,
                         worker=worker, host=socket.gethostname())
    start = time.perf_counter()
    try:
        with leases.renewing([lease] if lease else []):
            for kind in PHASES[phase]:
                report = run_stage(kind, [j for j in jobs if j.kind == kind], executor)
                result.computed += report.computed
                result.awaited += report.awaited
                result.cached += report.cached
                result.failed.update(report.failed)
                result.bad += report.bad
                result.took_over += report.took_over
                result.unet_evals[kind] = dict(report.unet_evals)
    finally:
        if lease is not None:
            leases.release(lease)
    result.busy_s = round(time.perf_counter() - start, 3)
    storage.write_bytes(result_uri(run_uri, phase, shard, attempt),
                        json.dumps(result.to_dict()).encode(), "application/json")
    return result


def shard_executor(plan_uri_: str, settings, model: str) -> ExecutorSettings:
    """How a shard runs its jobs: the parent's settings and model, into the plan's cache
    (the tiny and mini models are made on this machine when asked for by name)."""
    from vct.batch.engine import RunRequest, named_model_folder
    from vct.batch.settings import RunSettings, require_model

    spec = named_model_folder(require_model(model))
    if not isinstance(settings, RunSettings):
        settings = RunSettings.build(settings)
    cache = read_plan(plan_uri_)["cache_uri"]
    return RunRequest(manifest_uri="", output_uri="", model=spec,
                      settings=settings.model_copy(update={"cache_uri": cache})).executor()


def read_result(run_uri: str, phase: str, shard: int, attempt: int) -> ShardResult | None:
    try:
        return ShardResult.from_dict(json.loads(storage.read_bytes(
            result_uri(run_uri, phase, shard, attempt))))
    except storage.StorageNotFound:
        return None


def lease_expired(run_uri: str, run_id: str, phase: str, shard: int, flow_run_id: str) -> bool:
    """True when the shard's lease is held by flow run ``flow_run_id`` and has expired: that
    attempt stopped renewing (its process or machine died). Absent (not started yet, or
    finished) is not expired, and neither is a previous attempt's stale lease, which the new
    attempt takes over once it starts."""
    leases = lease_claims(run_uri)
    current = leases.read("shard", lease_key(run_id, phase, shard))
    if current is None or current[0].get("owner", {}).get("flow_run_id") != flow_run_id:
        return False
    return float(current[0]["expires_at"]) <= leases.clock()


def stage_reports(kinds: tuple[str, ...], planned: dict[str, list[Job]],
                  results: list[ShardResult]) -> dict[str, StageReport]:
    """Each kind's report for the whole run from its shards' results. A key a shard computed
    is computed (even if an earlier attempt also reported it awaited); a key no attempt
    answered failed with the reason of its last failure, or "its shard did not finish"."""
    out = {}
    for kind in kinds:
        report = StageReport(kind)
        keys = [j.key for j in planned.get(kind, [])]
        wanted = set(keys)
        computed, awaited, cached, failed, bad = set(), set(), set(), {}, set()
        evals: dict[str, int] = {}
        for r in results:
            computed |= wanted & set(r.computed)
            awaited |= wanted & set(r.awaited)
            cached |= wanted & set(r.cached)
            failed.update({k: v for k, v in r.failed.items() if k in wanted})
            bad |= wanted & set(r.bad)
            report.took_over += [k for k in r.took_over if k in wanted]
            for name, n in r.unet_evals.get(kind, {}).items():
                evals[name] = evals.get(name, 0) + n
        for key in dict.fromkeys(keys):
            if key in computed:
                report.computed.append(key)
            elif key in awaited:
                report.awaited.append(key)
            elif key in cached:
                report.cached.append(key)
            else:
                report.failed[key] = failed.get(key, "its shard did not finish")
                if key in bad:
                    report.bad.append(key)
        report.unet_evals = evals
        out[kind] = report
    return out
