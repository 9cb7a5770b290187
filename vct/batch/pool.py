"""One job pool per run: concepts, contents and fusions in one queue, served by every worker.

Why: run as stages (every concept, then every content, then every fusion) each stage is a
barrier, and with accelerate a fresh launch that loads the model on every rank again; with 3
references on 8 GPUs, 5 idle through the concept stage although concepts and contents do not
depend on each other. The pool launches the workers once per run, keeps each of them fed with
the runnable job on the longest path of work (its cost plus the fusions it unblocks), and
makes a source's fusions runnable as soon as what they need is resolved, so fusion overlaps
with the stage jobs still running elsewhere and outputs appear early (a killed run keeps them).

Determinism (a pair's bytes do not depend on where or with what else it ran): a *family* is
the pairs that share a content key and fusion settings. Its fusion groups are formed only when
its content and every concept it names are resolved (done or failed), exactly as
:func:`vct.batch.plan.fusion_groups` forms them over the family's fusable pairs, finished or
not; content batches take runnable contents of the same config in queue order, as
:func:`vct.batch.jobs.run_in_order` does (and with content batches off, a content's bytes never
depend on the order). Every job runs under a fleet claim (:mod:`vct.batch.claims`): a key
another process holds is awaited, not recomputed. A sharded run is this same pool in each
shard, over the shard's slice of the plan (:mod:`vct.batch.shards`): whole families, so the
same groups.

The start costs what the run needs, not what the manifest names: one listing of the run
folder says which pairs are finished (:func:`vct.batch.pairs.finished_outputs`); only the
concepts and contents of families with an unfinished pair are read and verified, the others
only looked up (a complete rerun reads no stage entry), ``plan_threads`` at a time.

Utilization: each worker's busy seconds (its jobs' wall time) over the time it was ready to
work (from its model being loaded to the pool's last outcome) goes to run.json, per rank.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Protocol

from vct import storage
from vct.batch import outputs, pairs
from vct.batch.claims import Claim, Claims, ClaimStats
from vct.batch.jobs import Job, JobOutcome, load
from vct.batch.plan import PairPlan, Plan, fusion_groups, fusion_job
from vct.batch.queue import JobQueue
from vct.cache import StageCache, result_memo
from vct.config import to_dict
from vct.inversion import Progress
from vct.report.run_record import PairResult, StageReport
from vct.storage.fanout import bounded_map

log = logging.getLogger("vct.batch")



class Backend(Protocol):
    """Workers that run units of jobs (one job, or one content batch) into the stage cache."""

    def free_slots(self) -> int:
        """How many more units can be submitted now without a worker queueing two deep."""

    def outstanding(self) -> int:
        """Units submitted whose outcomes have not been returned by :meth:`poll` yet."""

    def submit(self, unit: list[Job]) -> None: ...

    def poll(self, timeout: float) -> list[JobOutcome]:
        """Outcomes that finished (waiting at most ``timeout`` seconds for the first)."""

    def usage(self) -> list[dict]:
        """Per worker: ``rank``, ``jobs``, ``busy_s``, ``load_s``, ``ready_at`` (time.time)."""

    def close(self) -> None:
        """Stop the workers after the last outcome."""

    def cancel(self) -> None:
        """Stop the workers now (the run was cancelled or failed)."""


@dataclass
class PoolOutcome:
    """What a pool run returns: every planned pair's result, the three stage reports, and per
    rank usage (``utilization`` = busy / ready time)."""

    pairs: dict[str, PairResult]
    stages: dict[str, StageReport]
    ranks: list[dict] = field(default_factory=list)
    wall_s: float = 0.0

    def details(self) -> dict:
        """What run.json says of the pool: per rank jobs, busy and ready seconds, utilization."""
        utils = [r["utilization"] for r in self.ranks if r.get("utilization") is not None]
        return {"ranks": self.ranks, "pool": {"wall_s": round(self.wall_s, 4),
                                              "min_utilization": min(utils) if utils else None}}


# ---------------------------------------------------------------- families
@dataclass
class _Family:
    """Pairs sharing a content key and fusion settings: fused together once resolved."""

    pairs: list[PairPlan]
    waiting_on: set[tuple[str, str]]

    @property
    def fusion_cost(self) -> float:
        """Its fusion jobs' cost if nothing fails: 2 (1 + K) T per group of K <= 4 concepts."""
        concepts = len({p.concept_key for p in self.pairs})
        groups = -(-concepts // 4)
        return float(2 * (groups + concepts) * self.pairs[0].content.num_inference_steps)


def families(the_plan: Plan) -> list[_Family]:
    out: dict[tuple, _Family] = {}
    for pair in the_plan.pairs:
        ident = (pair.content_key, json.dumps(to_dict(pair.fusion), sort_keys=True))
        fam = out.setdefault(ident, _Family([], {("content", pair.content_key)}))
        fam.pairs.append(pair)
        fam.waiting_on.add(("concept", pair.concept_key))
    return list(out.values())


# ---------------------------------------------------------------- the pool
class JobPool:
    """One run's jobs on one backend; see the module docstring."""

    def __init__(self, the_plan: Plan, backend: Backend, cache_uri: str, *,
                 content_batch: int = 1, run_info: dict | None = None,
                 on_progress: Progress | None = None, claims: Claims | None = None):
        self.plan = the_plan
        self.backend = backend
        self.cache = StageCache(cache_uri)
        self.claims = claims or Claims(cache_uri)
        self.run_info = run_info or {}
        self.on_progress = on_progress
        self.queue = JobQueue(content_batch)
        self.stages = {kind: StageReport(kind) for kind in ("concept", "content", "fusion")}
        self.results: dict[str, PairResult] = {}
        self.todo: set[str] = set()
        self.status: dict[tuple[str, str], str | None] = {}  # None: ok, else the error
        self.families = families(the_plan)
        self._waiters: dict[tuple[str, str], list[_Family]] = {}
        for fam in self.families:
            for dep in fam.waiting_on:
                self._waiters.setdefault(dep, []).append(fam)
        self._groups: dict[str, list[PairPlan]] = {}  # fusion key -> its group
        self._held: dict[str, Claim] = {}  # job key -> the claim this pool holds on it
        self._held_list: list[Claim] = []  # what the renewer thread renews
        self._waiting: list[Job] = []  # claimed by another process
        self._claim_stats = ClaimStats()
        self._hits: dict[str, set[str]] = {kind: set() for kind in self.stages}
        self._evals: dict[str, dict[str, int]] = {kind: {} for kind in self.stages}
        self._ranks: dict[str, set[int]] = {kind: set() for kind in self.stages}
        self._total = max(1, len(the_plan.concept_jobs) + len(the_plan.content_jobs)
                          + len(the_plan.given_concepts) + len(self.families))
        self._resolved = 0
        self._kept: dict[str, dict] = {}  # pair id -> sidecar of an output to keep

    # ------------------------------------------------------------ bookkeeping
    def _moved(self) -> None:
        self._resolved += 1
        if self.on_progress is not None:
            try:
                self.on_progress(min(self._resolved, self._total), self._total)
            except Exception:  # a progress display must never fail the run
                log.exception("progress callback failed (ignored)")

    def _unblocks(self, job: Job) -> float:
        """The fusion work waiting on this job: each waiting family's estimated fusion cost."""
        return sum(fam.fusion_cost for fam in self._waiters.get((job.kind, job.key), ()))

    def _hit(self, kind: str, key: str) -> bool:
        return key in self._hits[kind]

    def _cached(self, kind: str, key: str) -> None:
        self.stages[kind].cached.append(key)
        self._hits[kind].add(key)

    def _resolve(self, kind: str, key: str, error: str | None) -> None:
        """A concept or content is done (error None) or failed: families waiting on it move."""
        self.status[(kind, key)] = error
        self._moved()
        for fam in self._waiters.pop((kind, key), []):
            fam.waiting_on.discard((kind, key))
            if not fam.waiting_on:
                self._form(fam)

    def _form(self, fam: _Family) -> None:
        """All a family needs is resolved: fail the pairs whose input failed, keep the finished
        ones, and queue (or answer from the cache) the fusion of each group with a pair to write."""
        fusable = []
        for pair in fam.pairs:
            unusable = pairs.input_failure(pair, lambda kind, key: self.status.get((kind, key)),
                                           lambda kind, key: key in self.stages[kind].bad)
            if unusable:
                self.results[pair.row.pair_id] = unusable
            else:
                fusable.append(pair)
        kept, todo = pairs.resume_state(fusable, self._kept)
        self.results.update(kept)
        self._moved()
        if todo and not self.todo:
            storage.delete(storage.join(self.plan.run_uri, outputs.SUCCESS))
        self.todo |= todo
        for group in fusion_groups(fusable):
            if not any(p.row.pair_id in todo for p in group):
                continue
            job = fusion_job(group)
            self._groups[job.key] = group
            if (stored := load(self.cache, "fusion", job.key)) is not None:
                self._cached("fusion", job.key)
                self._write(job.key, stored, None)
            else:
                self.queue.push(job)

    def _write(self, key: str, stored, error: str | None) -> None:
        group = self._groups.pop(key)
        pairs.write_fused(group, stored, error, self._hit, key, self.run_info, self.todo,
                          self.results)

    # ------------------------------------------------------------ claims
    def _claim(self, unit: list[Job]) -> list[Job]:
        """The jobs of ``unit`` this pool may compute now (claimed); the others are awaited."""
        return [job for job in unit if job.key in self._held or self._take(job)]

    def _take(self, job: Job) -> bool:
        """Claim ``job``: True when this pool holds it now. Held by another process, it waits
        (:meth:`_check_waiting`); found stored once claimed, it is awaited: its owner may have
        stored it and let go between our look and our claim."""
        claim = self.claims.acquire(job.kind, job.key, self._claim_stats)
        if claim is None:
            self._waiting.append(job)
            return False
        if self.claims.landed(job.kind, job.key):
            self.claims.release(claim)
            self._awaited(job)
            return False
        self._hold(job.key, claim)
        return True

    def _hold(self, key: str, claim: Claim) -> None:
        self._held[key] = claim
        self._held_list.append(claim)

    def _release(self, key: str) -> None:
        claim = self._held.pop(key, None)
        if claim is not None:
            self._held_list.remove(claim)
            self.claims.release(claim)

    def _awaited(self, job: Job) -> None:
        self.stages[job.kind].awaited.append(job.key)
        self._hits[job.kind].add(job.key)
        self._stored(job.kind, job.key)

    def _check_waiting(self) -> None:
        """Jobs another process holds: landed -> awaited; claimable again -> back in line."""
        waiting, self._waiting = self._waiting, []
        for job in waiting:
            if self.claims.landed(job.kind, job.key):
                self._awaited(job)
            elif self._take(job):
                self.queue.push(job, self._unblocks(job))

    # ------------------------------------------------------------ outcomes
    def _stored(self, kind: str, key: str) -> None:
        if kind == "fusion":
            self._write(key, load(self.cache, "fusion", key), None)
        else:
            self._resolve(kind, key, None)

    def _finished(self, outcome: JobOutcome) -> None:
        kind, key = outcome.kind, outcome.key
        self._release(key)
        report = self.stages[kind]
        self._ranks[kind].add(outcome.rank)
        if outcome.ok:
            report.computed.append(key)
            for name, n in outcome.unet_evals.items():
                self._evals[kind][name] = self._evals[kind].get(name, 0) + n
            self._stored(kind, key)
            return
        error = outcome.error or "failed"
        report.failed[key] = error
        if outcome.bad_input:
            report.bad.append(key)
        log.error("%s job %s failed: %s", kind, key[:12], error)
        if kind == "fusion":
            self._write(key, None, error)
        else:
            self._resolve(kind, key, error)

    # ------------------------------------------------------------ the start
    def _needed(self) -> set[tuple[str, str]]:
        """The concepts and contents an unfinished pair needs: every one a family with an
        unfinished pair waits on (its groups are formed over the whole family, finished
        pairs included, so they fuse as before). A family whose pairs are all finished needs
        none: a complete rerun reads no stage entry. A job no pair of this plan uses is
        needed too: a stage shard computes it for the fusion shards (:mod:`vct.batch.shards`)."""
        out: set[tuple[str, str]] = set()
        for fam in self.families:
            if any(p.row.pair_id not in self._kept for p in fam.pairs):
                out |= fam.waiting_on
        used = {(p_kind, key) for p in self.plan.pairs
                for p_kind, key in (("concept", p.concept_key), ("content", p.content_key))}
        out |= {(j.kind, j.key) for j in (*self.plan.concept_jobs, *self.plan.content_jobs)
                if (j.kind, j.key) not in used}
        return out

    def _look_up(self, jobs: list[Job], needed: set[tuple[str, str]]) -> list[bool]:
        """Whether each job's result is in the cache, ``plan_threads`` lookups at once (on S3,
        10 000 contents one after another were minutes before the first job): a needed one
        is read and verified (and kept in the run's memo for its fusions), any other only
        looked for, since nothing will read it."""
        def one(job: Job) -> bool:
            if (job.kind, job.key) in needed:
                return load(self.cache, job.kind, job.key) is not None
            return self.cache.contains(job.kind, job.key)

        return bounded_map(one, jobs, self.plan.plan_threads, "vct-lookup")

    # ------------------------------------------------------------ the loop
    def run(self) -> PoolOutcome:
        started = time.time()
        with result_memo(), self.claims.renewing(self._held_list):
            try:
                self._kept = pairs.finished_outputs(self.plan.pairs, self.plan.run_uri,
                                                    self.plan.plan_threads)
                needed = self._needed()
                jobs = [*self.plan.concept_jobs, *self.plan.content_jobs]
                unused = []  # every pair that uses it is finished: nothing to compute
                for job, found in zip(jobs, self._look_up(jobs, needed)):
                    if found:
                        self._cached(job.kind, job.key)
                    elif (job.kind, job.key) in needed:
                        self.queue.push(job, self._unblocks(job))
                    else:
                        unused.append(job)
                for key in self.plan.given_concepts:  # concept files: planning cached them
                    self._cached("concept", key)
                for kind in ("concept", "content"):
                    for key in self.stages[kind].cached:
                        self._resolve(kind, key, None)
                for job in unused:
                    self._resolve(job.kind, job.key, None)
                log.info("pool: %d concepts and %d contents cached, %d jobs to run",
                         len(self.stages["concept"].cached), len(self.stages["content"].cached),
                         len(self.queue))
                self._loop()
                worked = time.time()  # the last outcome: what follows is shutting down
            except BaseException:
                self.backend.cancel()
                raise
            finally:
                for key in list(self._held):
                    self._release(key)
                self.backend.close()
        ended = time.time()
        return PoolOutcome(pairs=self.results, stages=self._reports(),
                           ranks=rank_usage(self.backend.usage(), worked), wall_s=ended - started)

    def _loop(self) -> None:
        last_check = 0.0
        while len(self.queue) or self._waiting or self.backend.outstanding():
            while self.backend.free_slots() > 0 and len(self.queue):
                unit = self._claim(self.queue.pop_unit())
                if unit:
                    self.backend.submit(unit)
            if self.backend.outstanding():
                for outcome in self.backend.poll(timeout=self.claims.poll_s):
                    self._finished(outcome)
            elif self._waiting and not len(self.queue):
                time.sleep(self.claims.poll_s)
            if self._waiting and time.monotonic() - last_check >= self.claims.poll_s:
                last_check = time.monotonic()
                self._check_waiting()

    def _reports(self) -> dict[str, StageReport]:
        for kind, report in self.stages.items():
            report.ranks = sorted(self._ranks[kind])
            report.unet_evals = dict(self._evals[kind])
            report.took_over = [k for k in self._claim_stats.took_over
                                if k in set(report.computed) | set(report.failed)]
        return self.stages


def rank_usage(usage: list[dict], worked: float) -> list[dict]:
    """Per rank: jobs, busy seconds, model load seconds and utilization = busy / the time it
    was ready to work: from its model being loaded to the pool's last outcome (``worked``).
    The workers' shutdown after it is part of the pool's wall time, not of any rank's work."""
    out = []
    for u in sorted(usage, key=lambda u: u["rank"]):
        ready = max(1e-9, worked - u["ready_at"]) if u.get("ready_at") else None
        out.append({"rank": u["rank"], "jobs": u["jobs"], "busy_s": round(u["busy_s"], 4),
                    "load_s": round(u.get("load_s", 0.0), 4),
                    "ready_s": round(ready, 4) if ready else None,
                    "utilization": round(min(1.0, u["busy_s"] / ready), 4) if ready else None})
    return out


def run_pool(the_plan: Plan, backend: Backend, cache_uri: str, **kwargs) -> PoolOutcome:
    """Every job of a planned run on ``backend``: see :class:`JobPool`."""
    return JobPool(the_plan, backend, cache_uri, **kwargs).run()
