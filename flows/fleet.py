"""Dispatch a run's shards as flow runs of the shard deployment, and gather them.

Prefect's own distribution, no scheduler of ours: each shard is a flow run of
``restyle-shard/shard`` (infra/prefect.yaml) created with ``run_deployment`` on the same work
pool, so whichever worker polls first, on any machine, takes it. The parent does not block on
one child at a time (``timeout=0``) and judges every child's state itself (platform notes: a
child's failure does not fail its parent):

- COMPLETED: its result file (``<run>/_plan/results/...``) says what it computed and awaited.
- CRASHED, CANCELLED or FAILED, or still RUNNING while its liveness lease has expired (its
  machine died with it; nobody else will ever mark it): marked Crashed and re-dispatched once,
  same jobs, a new attempt in the idempotency key. The jobs it finished are in the cache and
  its dead claims expire, so the retry recomputes only what was unfinished.
"""

from __future__ import annotations

import logging
import os
import time
import uuid

from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound
from prefect.states import Crashed

from vct.batch import shards
from vct.batch.engine import RunRequest
from vct.batch.jobs import Job, JobOutcome
from vct.batch.plan import Plan
from vct.batch.settings import RunSettings
from vct.batch.summary import StageReport

log = logging.getLogger("vct.flows")

SHARD_DEPLOYMENT = "restyle-shard/shard"
ENV_SHARD_DEPLOYMENT = "VCT_SHARD_DEPLOYMENT"
ENV_POLL = "VCT_SHARD_POLL_S"
RETRIES = 1
FINAL_BAD = {"CRASHED", "CANCELLED", "FAILED"}


def _poll_s() -> float:
    return float(os.environ.get(ENV_POLL, "2"))


class Fleet:
    """The shard flow runs of one parent flow run (one run of one manifest)."""

    def __init__(self, plan: Plan, request: RunRequest, parent_flow_run_id: str):
        self.plan = plan
        self.request = request
        self.parent = parent_flow_run_id or uuid.uuid4().hex
        self.rows: list[dict] = []  # run.json's details.shards, one per shard flow run
        self.deployment = os.environ.get(ENV_SHARD_DEPLOYMENT, SHARD_DEPLOYMENT)

    # ---------------------------------------------------------------- one phase
    def _settings(self) -> dict:
        s: RunSettings = self.request.settings
        return s.model_copy(update={"shards": 1, "cache_uri": self.request.cache_uri}).model_dump(
            mode="json")

    def _start(self, uri: str, phase: str, shard: int, attempt: int):
        key = f"{self.plan.run_id}:{self.parent}:{phase}:{shard}:a{attempt}"
        try:
            run = self._run_deployment(key, uri, phase, shard, attempt)
        except ObjectNotFound:
            raise RuntimeError(
                f"settings.shards = {self.request.settings.shards} needs the deployment "
                f"{self.deployment!r} on this Prefect server (prefect deploy --all --prefect-file "
                "infra/prefect.yaml) and workers on its pool; an embedded run cannot shard: "
                "use shards = 1") from None
        log.info("%s shard %d attempt %d: flow run %s", phase, shard, attempt, run.id)
        return run.id

    def _run_deployment(self, key: str, uri: str, phase: str, shard: int, attempt: int):
        return run_deployment(
            name=self.deployment, timeout=0, idempotency_key=key,
            flow_run_name=f"{self.plan.run_id}-{phase}-{shard}-a{attempt}",
            parameters={"plan_uri": uri, "shard": shard, "phase": phase,
                        "settings": self._settings(), "model": self.request.model,
                        "attempt": attempt})

    def run_phase(self, phase: str, jobs: list[Job]) -> list[shards.ShardResult]:
        """Split ``jobs`` into the configured number of shards, run them all on the pool,
        wait for every one (retrying a crashed one once); every attempt's result."""
        parts = shards.split(jobs, self.request.settings.shards)
        if not parts:
            return []
        uri = shards.write_phase(self.plan.run_uri, self.plan.run_id, self.request.cache_uri,
                                 phase, parts)
        live = {i: (0, self._start(uri, phase, i, 0)) for i in range(len(parts))}
        results: list[shards.ShardResult] = []
        with get_client(sync_client=True) as client:
            while live:
                time.sleep(_poll_s())
                for i, (attempt, run_id) in list(live.items()):
                    run = client.read_flow_run(run_id)
                    state = run.state.type.value if run.state else "PENDING"
                    if state == "RUNNING" and shards.lease_expired(
                            self.plan.run_uri, self.plan.run_id, phase, i, str(run_id)):
                        client.set_flow_run_state(run_id, Crashed(
                            message="its shard lease expired: the worker or machine died"),
                            force=True)
                        state = "CRASHED"
                    if state not in FINAL_BAD and state != "COMPLETED":
                        continue
                    result = shards.read_result(self.plan.run_uri, phase, i, attempt)
                    if state == "COMPLETED" and result is None:
                        state = "FAILED"  # finished without its result: treat as a crash
                    row = (result.to_dict() if result else shards.ShardResult(
                        phase=phase, shard=i, attempt=attempt, flow_run_id=str(run_id)).to_dict())
                    row.update({"flow_run_id": str(run_id), "state": state,
                                "worker": run.labels.get("prefect.worker.name")
                                or row.get("worker", "")})
                    self.rows.append(row)
                    if result is not None:
                        results.append(result)
                    del live[i]
                    if state != "COMPLETED" and attempt < RETRIES:
                        log.warning("%s shard %d ended %s; re-dispatching its unfinished jobs",
                                    phase, i, state)
                        live[i] = (attempt + 1, self._start(uri, phase, i, attempt + 1))
        return results

    # ---------------------------------------------------------------- the two phases
    def stages(self) -> dict[str, StageReport]:
        """Concepts and contents of the whole plan, sharded; one report per kind."""
        jobs = self.plan.concept_jobs + self.plan.content_jobs
        results = self.run_phase("stage", jobs)
        return shards.stage_reports(("concept", "content"),
                                    {"concept": self.plan.concept_jobs,
                                     "content": self.plan.content_jobs}, results)

    def fusion_runner(self):
        """A runner for the engine's fusion stage that runs its jobs as fusion shards. It
        claims nothing itself (``claims_its_own_keys``): each shard claims the keys it runs,
        and a parent holding them would make its own children wait for it."""
        fleet = self

        class _Runner:
            claims_its_own_keys = True
            report: StageReport | None = None

            def __call__(self, jobs: list[Job], executor, on_progress=None,
                         progress=None) -> list[JobOutcome]:
                results = fleet.run_phase("fusion", jobs)
                self.report = shards.stage_reports(("fusion",), {"fusion": jobs},
                                                   results)["fusion"]
                failed = self.report.failed
                return [JobOutcome("fusion", j.key, ok=j.key not in failed, rank=0,
                                   seconds=0.0, error=failed.get(j.key)) for j in jobs]

        return _Runner()
