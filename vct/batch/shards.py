"""Sharded runs: one manifest over several flow runs, each the run's job pool over a slice.

Why here and not in the flow: what a shard is (which jobs and pairs, read from where, what it
reports) and how the parent turns the shards' results into the run's result are the library's
business; the flow only dispatches shard flow runs (Prefect's ``run_deployment``) and watches
their states (``dispatch`` below). A shard needs nothing but the URI of the stored plan.

A sharded run has two phases, because a fusion needs its concepts and contents and a source's
concepts may come from any reference of the manifest:

1. ``stage``: the concepts and contents the unfinished pairs need, split by cost;
2. ``fusion``: the fusion groups (a source's pairs sharing its B* branch) whose inputs did not
   fail, split by cost, each group whole (so the groups, and bytes, are the unsharded
   run's: :func:`fusion_slices`); a fusion shard writes its pairs' PNGs and sidecars.

Each shard runs :func:`vct.batch.engine.run_pool`, the very pool of an unsharded run, over its
slice: the same claims (a key another shard or run is computing is awaited, not recomputed),
the same cache reads, the same resume rule, the same per-rank utilization in its record. A
re-dispatched shard recomputes only what its crashed attempt did not finish.

    <run>/_plan/plan.json      {"run_id", "run_uri", "cache_uri", ..., "phases": {
                                  "stage":  {"shards": [{"jobs": [...], "pairs": []}, ...]},
                                  "fusion": {"shards": [{"jobs": [...], "pairs": [...]}, ...]}}}
    <run>/_plan/results/<phase>-<shard>-a<attempt>.json   what one shard flow run did
    <run>/_plan/_claims/shard/<key>.json                  its liveness lease
    <run>/_plan/dispatched/<parent flow run id>.json      every shard flow run one parent
                                                          dispatched (so a state hook of the
                                                          parent, in another process, can
                                                          cancel them)

JSON only (jobs and pairs as dicts), never pickle: a plan is read by other machines.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from vct import storage
from vct.batch import engine, pairs
from vct.batch.claims import Claims, Owner
from vct.batch.jobs import Job, from_fields
from vct.batch.plan import PairPlan, Plan, fusion_groups, fusion_job
from vct.batch.pool import families
from vct.batch.settings import RunSettings, require_model
from vct.batch.workers import ExecutorSettings, Runner
from vct.cache import StageCache, cache_key
from vct.inversion import Progress
from vct.report.run_record import PairResult, StageReport
from vct.storage.fanout import bounded_map

PLAN_DIR = "_plan"
PLAN_FILE = "plan.json"
RESULTS_DIR = "results"
DISPATCHED_DIR = "dispatched"
PHASES = ("stage", "fusion")
"""The phases in order: concepts and contents first, then the fusions whose inputs exist."""
NOT_FINISHED = "its shard did not finish"


def plan_uri(run_uri: str) -> str:
    return storage.join(run_uri, PLAN_DIR, PLAN_FILE)


def shard_count(n_units: int, shards: int, shard_jobs: int | None = None) -> int:
    """How many shards a phase of ``n_units`` (distinct jobs, or groups) runs as: ``shards``,
    or with a target of ``shard_jobs`` per shard ``ceil(n_units / shard_jobs)``, at most
    ``shards`` (never more shards than units, and at least one for a phase that has any)."""
    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    if shard_jobs is not None and shard_jobs < 1:
        raise ValueError(f"shard_jobs must be >= 1, got {shard_jobs}")
    if n_units <= 0:
        return 0
    wanted = shards if shard_jobs is None else -(-n_units // shard_jobs)
    return max(1, min(wanted, shards, n_units))


def balance(costs: list[float], shards: int) -> list[list[int]]:
    """Indices of ``costs`` in at most ``shards`` non-empty shards balanced by cost: biggest
    first, each to the least loaded shard (LPT; ties to the lowest index, so the split is
    deterministic). Each shard's indices are in input order."""
    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    loads = [0.0] * min(shards, len(costs))
    out: list[list[int]] = [[] for _ in loads]
    for i in sorted(range(len(costs)), key=lambda k: (-costs[k], k)):
        target = min(range(len(loads)), key=lambda k: (loads[k], k))
        out[target].append(i)
        loads[target] += costs[i]
    return [sorted(part) for part in out]


def split(jobs: list[Job], shards: int) -> list[list[Job]]:
    """Distinct jobs in at most ``shards`` shards balanced by cost (:func:`balance`)."""
    unique = list({(j.kind, j.key): j for j in jobs}.values())
    return [sorted((unique[i] for i in part), key=lambda j: -j.cost)  # biggest first
            for part in balance([j.cost for j in unique], shards)]


@dataclass
class Slice:
    """One shard's share of a phase: the concept and content jobs its pool runs or reads, and
    the pairs it fuses and writes (none in the stage phase)."""

    jobs: list[Job] = field(default_factory=list)
    pairs: list[PairPlan] = field(default_factory=list)
    cost: float = 0.0
    """The UNet work it does: its jobs' costs (stage), its fusion groups' costs (fusion)."""

    def to_dict(self) -> dict:
        return {"jobs": [j.to_dict() for j in self.jobs],
                "pairs": [p.to_dict() for p in self.pairs], "cost": self.cost}

    @classmethod
    def from_dict(cls, d: dict) -> Slice:
        return cls(jobs=[Job.from_dict(j) for j in d.get("jobs", [])],
                   pairs=[PairPlan.from_dict(p) for p in d.get("pairs", [])],
                   cost=float(d.get("cost", 0.0)))


def stage_slices(the_plan: Plan, finished: dict[str, dict], settings: RunSettings
                 ) -> list[Slice]:
    """The stage phase: every concept and content a family with an unfinished pair needs
    (``finished``: :func:`vct.batch.pairs.finished_outputs`), split by cost."""
    wanted = {dep for fam in families(the_plan)
              if any(p.row.pair_id not in finished for p in fam.pairs)
              for dep in fam.waiting_on}
    jobs = [j for j in (*the_plan.concept_jobs, *the_plan.content_jobs)
            if (j.kind, j.key) in wanted]
    count = shard_count(len(jobs), settings.shards, settings.shard_jobs)
    return [Slice(jobs=part, cost=sum(j.cost for j in part))
            for part in split(jobs, count)] if count else []


def fusion_slices(the_plan: Plan, stages: dict[str, StageReport], finished: dict[str, dict],
                  settings: RunSettings) -> tuple[list[Slice], dict[str, PairResult]]:
    """The fusion phase: the fusion groups with an unfinished pair, formed as the pool forms
    them over the pairs whose concept and content did not fail, split by cost, each group
    whole; and the results the parent knows already (those failed pairs, and the pairs of
    groups with nothing to write: kept).

    Why groups stay whole and in order: a shard's pool forms its groups again from its pairs
    (:func:`vct.batch.plan.fusion_groups`: a source's concepts in plan order, 4 a group).
    Only a source's last group can hold fewer than 4, so any of its groups together, in plan
    order, chunk exactly as they did here: the same batches, the same bytes."""
    results: dict[str, PairResult] = {}
    fusable = []
    for pair in the_plan.pairs:
        unusable = pairs.input_failure(pair, lambda kind, key: stages[kind].failed.get(key),
                                       lambda kind, key: key in stages[kind].bad)
        if unusable:
            results[pair.row.pair_id] = unusable
        else:
            fusable.append(pair)
    todo = [g for g in fusion_groups(fusable)
            if any(p.row.pair_id not in finished for p in g)]
    open_ids = {p.row.pair_id for group in todo for p in group}
    kept, _ = pairs.resume_state([p for p in fusable if p.row.pair_id not in open_ids],
                                 finished)
    results.update(kept)
    count = shard_count(len(todo), settings.shards, settings.shard_jobs)
    if not count:
        return [], results
    jobs = {(j.kind, j.key): j for j in (*the_plan.concept_jobs, *the_plan.content_jobs)}
    costs = [fusion_job(group).cost for group in todo]
    slices = []
    for part in balance(costs, count):
        members = {p.row.pair_id for i in part for p in todo[i]}
        chosen = [p for p in fusable if p.row.pair_id in members]  # plan order
        needed = dict.fromkeys(dep for p in chosen for dep in (("content", p.content_key),
                                                              ("concept", p.concept_key)))
        slices.append(Slice(jobs=[jobs[d] for d in needed if d in jobs], pairs=chosen,
                            cost=sum(costs[i] for i in part)))
    return slices, results


def write_phase(the_plan: Plan, cache_uri: str, run_info: dict, phase: str,
                slices: list[Slice]) -> str:
    """Store (or extend) the run's plan with one phase's slices; returns the plan's URI.
    Only the parent flow run writes it, atomically, before dispatching that phase."""
    if phase not in PHASES:
        raise ValueError(f"unknown shard phase {phase!r}; use one of {', '.join(PHASES)}")
    uri = plan_uri(the_plan.run_uri)
    try:
        data = json.loads(storage.read_bytes(uri))
    except storage.StorageNotFound:
        data = {}
    if data.get("run_id") not in (None, the_plan.run_id):
        data = {}  # another run's plan in this folder: replaced, never mixed
    data.update({"run_id": the_plan.run_id, "run_uri": the_plan.run_uri,
                 "manifest_uri": the_plan.manifest_uri,
                 "model_identity": the_plan.model_identity,
                 "plan_threads": the_plan.plan_threads,
                 "given_concepts": the_plan.given_concepts, "cache_uri": cache_uri,
                 "run_info": run_info})
    data.setdefault("phases", {})[phase] = {"shards": [s.to_dict() for s in slices]}
    storage.write_bytes(uri, json.dumps(data, indent=1).encode(), "application/json")
    return uri


def read_plan(uri: str) -> dict:
    return json.loads(storage.read_bytes(uri))


def shard_slice(stored: dict, phase: str, shard: int) -> Slice:
    try:
        return Slice.from_dict(stored["phases"][phase]["shards"][shard])
    except (KeyError, IndexError):
        raise ValueError(f"plan {stored.get('run_uri')} has no {phase} shard {shard}") from None


def shard_plan(stored: dict, phase: str, shard: int) -> Plan:
    """The plan one shard's pool runs: its slice's jobs and pairs in the run's folder."""
    part = shard_slice(stored, phase, shard)
    used = {p.concept_key for p in part.pairs}
    return Plan(run_id=stored["run_id"], run_uri=stored["run_uri"],
                manifest_uri=stored.get("manifest_uri", ""),
                model_identity=stored.get("model_identity", ""), pairs=part.pairs, errors=[],
                concept_jobs=[j for j in part.jobs if j.kind == "concept"],
                content_jobs=[j for j in part.jobs if j.kind == "content"],
                plan_threads=stored.get("plan_threads", 8),
                given_concepts=[k for k in stored.get("given_concepts", []) if k in used])


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
    """What one shard flow run did: the row of ``run.json``'s ``shards`` list. ``stages``,
    ``pairs``, ``ranks`` and ``pool`` are what its pool returned, in the shape an unsharded
    run's ``run.json`` gives them; ``error``: why it has none (never started, say)."""

    phase: str
    shard: int
    attempt: int
    flow_run_id: str = ""
    worker: str = ""
    host: str = ""
    state: str = "COMPLETED"
    stages: dict[str, dict] = field(default_factory=dict)
    pairs: list[dict] = field(default_factory=list)
    ranks: list[dict] = field(default_factory=list)
    pool: dict = field(default_factory=dict)
    busy_s: float = 0.0
    error: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ShardResult:
        return from_fields(cls, d)

    def reports(self) -> dict[str, StageReport]:
        return {kind: from_fields(StageReport, d) for kind, d in self.stages.items()}

    def keys(self, status: str) -> list[str]:
        """Every key of this shard with one status (``computed``, ``awaited``, ...)."""
        return [k for r in self.reports().values() for k in getattr(r, status)]


def run_shard(plan_uri_: str, shard: int, phase: str, executor: ExecutorSettings,
              attempt: int = 0, worker: str = "", flow_run_id: str = "",
              runner: Runner | None = None) -> ShardResult:
    """Run one shard: the job pool over its slice of the stored plan; store and return its
    result. The shard's liveness lease is held (renewed) for the whole shard, so the parent
    can tell a dead machine from a slow one. ``runner``: the pool's in-process worker (tests)."""
    stored = read_plan(plan_uri_)
    the_plan = shard_plan(stored, phase, shard)
    run_uri, run_id = stored["run_uri"], stored["run_id"]
    leases = lease_claims(run_uri, owner=Owner(worker=worker, flow_run_id=flow_run_id))
    key = lease_key(run_id, phase, shard)
    lease = None
    for _ in range(3):  # a previous attempt's lease: ours once it expires (that one is dead)
        lease = leases.acquire("shard", key)
        if lease is not None:
            break
        time.sleep(leases.lease_s / 2)
    start = time.perf_counter()
    try:
        with leases.renewing([lease] if lease else []):
            outcome = engine.run_pool(the_plan, executor, stored.get("run_info") or {},
                                      runner=runner)
    finally:
        if lease is not None:
            leases.release(lease)
    result = ShardResult(phase=phase, shard=shard, attempt=attempt, flow_run_id=flow_run_id,
                         worker=worker, host=socket.gethostname(),
                         stages={k: asdict(r) for k, r in outcome.stages.items()},
                         pairs=[asdict(p) for p in outcome.pairs.values()],
                         busy_s=round(time.perf_counter() - start, 3), **outcome.details())
    storage.write_bytes(result_uri(run_uri, phase, shard, attempt),
                        json.dumps(result.to_dict()).encode(), "application/json")
    return result


def shard_executor(plan_uri_: str, settings, model: str) -> ExecutorSettings:
    """How a shard runs its jobs: the parent's settings and model, into the plan's cache
    (the tiny and mini models are made on this machine when asked for by name)."""
    spec = engine.named_model_folder(require_model(model))
    if not isinstance(settings, RunSettings):
        settings = RunSettings.build(settings)
    cache = read_plan(plan_uri_)["cache_uri"]
    return engine.RunRequest(manifest_uri="", output_uri="", model=spec,
                             settings=settings.model_copy(update={"cache_uri": cache})
                             ).executor()


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


# ---------------------------------------------------------------- the parent's side
def stage_reports(planned: dict[str, list[str]], results: list[ShardResult]
                  ) -> dict[str, StageReport]:
    """Each kind's report for the whole run from its shards' reports (``planned``: the keys
    each kind must answer; for fusion, None of them is known before the shards form them).
    A key a shard computed is computed (even if an earlier attempt also reported it awaited),
    then awaited, then cached; a key no attempt answered failed with the reason of its last
    failure, or "its shard did not finish"."""
    out = {}
    for kind, keys in planned.items():
        reports = [r.reports().get(kind) or StageReport(kind) for r in results]
        report = StageReport(kind)
        computed, awaited, cached, failed, bad = set(), set(), set(), {}, set()
        for r in reports:
            computed |= set(r.computed)
            awaited |= set(r.awaited)
            cached |= set(r.cached)
            failed.update(r.failed)
            bad |= set(r.bad)
            report.took_over += [k for k in r.took_over if k not in report.took_over]
            report.ranks = sorted(set(report.ranks) | set(r.ranks))
            for name, n in r.unet_evals.items():
                report.unet_evals[name] = report.unet_evals.get(name, 0) + n
        for key in dict.fromkeys(keys):
            if key in computed:
                report.computed.append(key)
            elif key in awaited:
                report.awaited.append(key)
            elif key in cached:
                report.cached.append(key)
            else:
                report.failed[key] = failed.get(key, NOT_FINISHED)
                if key in bad:
                    report.bad.append(key)
        out[kind] = report
    return out


def not_started(phase: str, shard: int, attempt: int, flow_run_id: str, state: str,
                part: Slice, message: str) -> ShardResult:
    """The result of a shard that never ran: its jobs and pairs fail with ``message``."""
    stages = {kind: asdict(StageReport(kind, failed={j.key: message for j in part.jobs
                                                     if j.kind == kind}))
              for kind in ("concept", "content")}
    return ShardResult(phase=phase, shard=shard, attempt=attempt, flow_run_id=flow_run_id,
                       state=state, stages=stages, error=message,
                       pairs=[asdict(pairs.pair_result(p, "failed", message))
                              for p in part.pairs])


Dispatch = Callable[[str, str, list[Slice]], list[ShardResult]]
"""(phase, stored plan URI, the phase's slices) -> the result of every attempt of every shard
(the fleet: each a flow run on the work pool; tests: :func:`run_shard` in process)."""


@dataclass
class ShardedRun:
    """What a sharded run returns: every planned pair's result, the three stage reports, and
    each shard attempt's record (``run.json``'s ``details.shards``)."""

    pairs: dict[str, PairResult]
    stages: dict[str, StageReport]
    shards: list[ShardResult]

    def details(self) -> dict:
        return {"shards": [r.to_dict() for r in self.shards]}


def _pair_results(slices: list[Slice], results: list[ShardResult]) -> dict[str, PairResult]:
    """Each fusion shard's pairs as its last attempt with a result says; a pair of a shard
    that never finished fails with the shard's error."""
    out: dict[str, PairResult] = {}
    for shard, part in enumerate(slices):
        tries = sorted((r for r in results if r.shard == shard), key=lambda r: r.attempt)
        got = {d["pair_id"]: from_fields(PairResult, d) for r in tries for d in r.pairs}
        reason = next((r.error for r in reversed(tries) if r.error), NOT_FINISHED)
        for pair in part.pairs:
            out[pair.row.pair_id] = got.get(pair.row.pair_id) or pairs.pair_result(
                pair, "failed", reason)
    return out


def run_sharded(the_plan: Plan, cache_uri: str, settings: RunSettings, run_info: dict,
                dispatch: Dispatch, on_progress: Progress | None = None) -> ShardedRun:
    """The parent's part: the stage phase, then the fusion phase of what it left fusable,
    each shard dispatched with ``dispatch``; the run's pairs and stage reports from what the
    shards returned, as an unsharded run's pool gives them."""
    finished = pairs.finished_outputs(the_plan.pairs, the_plan.run_uri, the_plan.plan_threads)
    stage = stage_slices(the_plan, finished, settings)
    done = (dispatch("stage", write_phase(the_plan, cache_uri, run_info, "stage", stage), stage)
            if stage else [])
    planned = {kind: [j.key for s in stage for j in s.jobs if j.kind == kind]
               for kind in ("concept", "content")}
    fusion, results = fusion_slices(the_plan, stage_reports(planned, done), finished, settings)
    # progress by UNet cost: the stage phase's work against the fusions it left to do
    stage_cost = round(sum(s.cost for s in stage))
    total = max(1, stage_cost + round(sum(s.cost for s in fusion)))
    if on_progress is not None:
        on_progress(stage_cost, total)
    fused = (dispatch("fusion", write_phase(the_plan, cache_uri, run_info, "fusion", fusion),
                      fusion) if fusion else [])
    answered = ("computed", "awaited", "cached", "failed")  # every fusion key a shard formed
    planned["fusion"] = list(dict.fromkeys(
        k for r in fused if (rep := r.reports().get("fusion")) is not None
        for status in answered for k in getattr(rep, status)))
    results.update(_pair_results(fusion, fused))
    if on_progress is not None:
        on_progress(total, total)
    reports = stage_reports(planned, done + fused)
    for kind, key in _looked_up(the_plan, cache_uri, planned):
        reports[kind].cached.append(key)
    return ShardedRun(pairs=results, stages=reports, shards=done + fused)


def _looked_up(the_plan: Plan, cache_uri: str, planned: dict[str, list[str]]
               ) -> list[tuple[str, str]]:
    """The concepts and contents only finished pairs use, found in the cache: only looked up,
    ``plan_threads`` at a time, as the pool of an unsharded rerun does (nothing reads them)."""
    sharded = {k for keys in planned.values() for k in keys}
    idle = [j for j in (*the_plan.concept_jobs, *the_plan.content_jobs) if j.key not in sharded]
    cache = StageCache(cache_uri)
    found = bounded_map(lambda j: cache.contains(j.kind, j.key), idle, the_plan.plan_threads,
                        "vct-lookup")
    return [(j.kind, j.key) for j, hit in zip(idle, found) if hit]
