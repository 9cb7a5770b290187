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
- Still SCHEDULED or PENDING (no worker took it: none polls the pool, or all are busy, or the
  parent holds the only slot) for ``VCT_SHARD_START_TIMEOUT_S`` seconds (900) while no shard of
  the phase runs or moves on: cancelled, not retried, and its jobs fail with one line naming
  the deployment and the pool. The run ends partial or failed; what was computed is kept.

Every dispatched shard flow run is recorded in ``<run>/_plan/dispatched/<parent>.json`` and
the parent flow run gets the label ``vct.run_uri``: the parent's state hooks (cancelled,
crashed, failed), which may run in another process (the worker's), read both to cancel every
shard flow run that has not finished (:func:`cancel_dispatched`).
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from dataclasses import replace
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId
from prefect.client.schemas.objects import StateType
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound
from prefect.states import Crashed, State

from vct.batch import shards
from vct.batch.claims import env_seconds
from vct.batch.engine import RunRequest
from vct.batch.judge import FINAL, gives_up, judge
from vct.batch.plan import Plan
from vct.batch.settings import RunSettings

log = logging.getLogger("vct.flows")

SHARD_DEPLOYMENT = "restyle-shard/shard"
ENV_SHARD_DEPLOYMENT = "VCT_SHARD_DEPLOYMENT"
ENV_POLL = "VCT_SHARD_POLL_S"
ENV_START_TIMEOUT = "VCT_SHARD_START_TIMEOUT_S"
DEFAULT_START_TIMEOUT_S = 900.0
RUN_URI_LABEL = "vct.run_uri"


def _poll_s() -> float:
    return float(os.environ.get(ENV_POLL, "2"))


def start_timeout_s() -> float:
    """How long a shard flow run may wait for a worker while its phase makes no progress."""
    return env_seconds(ENV_START_TIMEOUT, DEFAULT_START_TIMEOUT_S)


def idempotency_key(run_id: str, parent: str, parent_run_count: int, phase: str, shard: int,
                    attempt: int) -> str:
    """The key of one dispatch: the same within one attempt of the parent flow run (a repeated
    ``run_deployment`` returns the same shard flow run), new for each parent retry
    (``run_count``) and each re-dispatch of a crashed shard (``attempt``)."""
    return f"{run_id}:{parent}:r{parent_run_count}:{phase}:{shard}:a{attempt}"


def _state_type(run) -> str:
    return run.state.type.value if run.state else "PENDING"


def cancel_run(client, run, message: str) -> str:
    """Cancel one flow run (as read): a Scheduled one, that no worker has taken, is set
    Cancelled; any other is set Cancelling, as `prefect flow-run cancel` does, so the worker
    that took it stops its process (or the server, if it has none, makes it Cancelled).
    Returns the state type it is in now."""
    kind = StateType.CANCELLED if _state_type(run) == "SCHEDULED" else StateType.CANCELLING
    result = client.set_flow_run_state(run.id, State(type=kind, message=message))
    if result.state is not None:
        return result.state.type.value
    return _state_type(client.read_flow_run(run.id))


def subflow_runs(client, parent: str) -> list[str]:
    """The ids of the flow runs the server lists as subflows of flow run ``parent`` (in-process
    subflows and ``run_deployment`` runs alike); none for an id that is not a flow run's."""
    try:
        children = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[UUID(parent)])))
    except ValueError:  # not a flow run id: nothing on the server
        return []
    return [str(r.id) for r in children]


def cancel_grandchildren(client, parent: str, reason: str) -> list[str]:
    """Cancel the unfinished shard runs of every ``restyle`` run that flow run ``parent`` (a
    ``restyle-incoming`` run) started as an in-process subflow. Why here: when the incoming
    run's process is stopped (cancelled, crashed), its restyle subflow dies with it and no
    hook of the subflow runs, so the subflow's shards would go on for nothing. Returns the ids
    it cancelled; never raises for one run."""
    cancelled: list[str] = []
    for child in subflow_runs(client, parent):
        try:
            cancelled += cancel_dispatched(client, child, reason)
        except Exception as exc:  # noqa: BLE001 - one child must not stop the others
            log.warning("could not cancel the shard runs of flow run %s: %s", child, exc)
    return cancelled


def cancel_dispatched(client, parent: str, reason: str, run_uri: str | None = None) -> list[str]:
    """Cancel every shard flow run of parent flow run ``parent`` that has not finished: the
    ones recorded under its run folder (found through the parent's ``vct.run_uri`` label when
    ``run_uri`` is not given) and, in case a dispatch was not recorded yet, the server's
    subflow runs of the parent. Returns the ids it cancelled. Never raises for one run."""
    if run_uri is None:
        try:
            run_uri = (client.read_flow_run(UUID(parent)).labels or {}).get(RUN_URI_LABEL)
        except (ObjectNotFound, ValueError):
            run_uri = None
    ids = dict.fromkeys(r["flow_run_id"] for r in (
        shards.read_dispatched(run_uri, parent) if run_uri else []))
    ids.update(dict.fromkeys(subflow_runs(client, parent)))
    cancelled = []
    for run_id in ids:
        try:
            run = client.read_flow_run(UUID(run_id))
            if _state_type(run) in FINAL:
                continue
            state = cancel_run(client, run, f"{reason}: cancelled with its parent flow "
                               f"run {parent}")
        except Exception as exc:  # noqa: BLE001 - one run must not stop the others
            log.warning("could not cancel shard flow run %s: %s", run_id, exc)
            continue
        log.info("shard flow run %s (%s): %s", run_id, run.name, state)
        cancelled.append(run_id)
    return cancelled


class Fleet:
    """The shard flow runs of one parent flow run (one run of one manifest)."""

    def __init__(self, plan: Plan, request: RunRequest, parent_flow_run_id: str,
                 parent_run_count: int = 1):
        self.plan = plan
        self.request = request
        self.labelled = not parent_flow_run_id  # no flow run of ours to label
        self.parent = parent_flow_run_id or uuid.uuid4().hex
        self.run_count = parent_run_count
        self.deployment = os.environ.get(ENV_SHARD_DEPLOYMENT, SHARD_DEPLOYMENT)
        self.clock = time.monotonic

    def _client(self):
        return get_client(sync_client=True)

    def _label_parent(self, client) -> None:
        """Tell the parent's state hooks where its dispatch record is (once)."""
        if self.labelled:
            return
        self.labelled = True
        try:
            client.update_flow_run_labels(UUID(self.parent),
                                          {RUN_URI_LABEL: self.plan.run_uri})
        except Exception as exc:  # noqa: BLE001 - the hooks then find its subflow runs only
            log.warning("could not label flow run %s with %s: %s", self.parent,
                        RUN_URI_LABEL, exc)

    # ---------------------------------------------------------------- one phase
    def _settings(self) -> dict:
        s: RunSettings = self.request.settings
        return s.model_copy(update={"shards": 1, "cache_uri": self.request.cache_uri}).model_dump(
            mode="json")

    def _start(self, uri: str, phase: str, shard: int, attempt: int):
        key = idempotency_key(self.plan.run_id, self.parent, self.run_count, phase, shard,
                              attempt)
        try:
            run = self._run_deployment(key, uri, phase, shard, attempt)
        except ObjectNotFound:
            raise RuntimeError(
                f"settings.shards = {self.request.settings.shards} needs the deployment "
                f"{self.deployment!r} on this Prefect server (prefect deploy --all --prefect-file "
                "infra/prefect.yaml) and workers on its pool; an embedded run cannot shard: "
                "use shards = 1") from None
        shards.record_dispatch(self.plan.run_uri, self.parent, {
            "flow_run_id": str(run.id), "phase": phase, "shard": shard, "attempt": attempt,
            "parent_run_count": self.run_count, "idempotency_key": key})
        log.info("%s shard %d attempt %d: flow run %s", phase, shard, attempt, run.id)
        return run.id

    def _run_deployment(self, key: str, uri: str, phase: str, shard: int, attempt: int):
        return run_deployment(
            name=self.deployment, timeout=0, idempotency_key=key,
            flow_run_name=f"{self.plan.run_id}-{phase}-{shard}-a{attempt}"
            + (f"-r{self.run_count}" if self.run_count > 1 else ""),
            parameters={"plan_uri": uri, "shard": shard, "phase": phase,
                        "settings": self._settings(), "model": self.request.model,
                        "attempt": attempt})

    def run_phase(self, phase: str, uri: str, slices: list[shards.Slice]
                  ) -> list[shards.ShardResult]:
        """Dispatch one flow run per slice of the stored plan at ``uri``, wait for every one
        (re-dispatching a crashed one once, cancelling one no worker takes); the result of
        every attempt, each with the state it ended in (:func:`vct.batch.shards.Dispatch`)."""
        timeout = start_timeout_s()
        results: list[shards.ShardResult] = []
        with self._client() as client:
            self._label_parent(client)
            # shard -> (attempt, flow run id, when dispatched, last state seen)
            live = {i: (0, self._start(uri, phase, i, 0), self.clock(), "SCHEDULED")
                    for i in range(len(slices))}
            moved = self.clock()  # last time a shard of this phase started, moved or ended
            while live:
                time.sleep(_poll_s())
                seen = {}
                for i, (attempt, run_id, since, before) in list(live.items()):
                    run = client.read_flow_run(run_id)
                    state = _state_type(run)
                    if state != before:
                        moved = self.clock()
                        live[i] = (attempt, run_id, since, state)
                    expired = state == "RUNNING" and shards.lease_expired(
                        self.plan.run_uri, self.plan.run_id, phase, i, str(run_id))
                    result = (shards.read_result(self.plan.run_uri, phase, i, attempt)
                              if expired or state in FINAL else None)
                    verdict = judge(state, attempt, lease_expired=expired,
                                    has_result=result is not None)
                    if verdict.action == "wait":
                        seen[i] = (run, state)
                        continue
                    if verdict.mark_crashed:
                        client.set_flow_run_state(run_id, Crashed(
                            message="its shard lease expired: the worker or machine died"),
                            force=True)
                    moved = self.clock()
                    results.append(replace(
                        result or shards.ShardResult(phase=phase, shard=i, attempt=attempt),
                        flow_run_id=str(run_id), state=verdict.state,
                        worker=(run.labels.get("prefect.worker.name")
                                or (result.worker if result else ""))))
                    del live[i]
                    if verdict.action == "retry":
                        log.warning("%s shard %d ended %s; re-dispatching its unfinished jobs",
                                    phase, i, verdict.state)
                        live[i] = (attempt + 1, self._start(uri, phase, i, attempt + 1),
                                   self.clock(), "SCHEDULED")
                now = self.clock()
                waiting = [state for _, state in seen.values()]
                for i, (run, _state) in seen.items():
                    attempt, _run_id, since, _ = live[i]
                    if gives_up(waiting, now - since, now - moved, timeout):
                        results.append(self._not_started(client, run, phase, i, attempt,
                                                         slices[i], timeout))
                        del live[i]
        return results

    def _not_started(self, client, run, phase: str, shard: int, attempt: int,
                     part: shards.Slice, timeout: float) -> shards.ShardResult:
        """Cancel a shard flow run no worker took; its jobs and pairs fail with the reason, in
        one line."""
        pool = run.work_pool_name or "?"
        queue = f" (queue {run.work_queue_name!r})" if run.work_queue_name else ""
        stayed = run.state.name if run.state else "Pending"
        message = (f"no worker took {phase} shard {shard} of {self.deployment} within "
                   f"{timeout:g} s (flow run {run.name} stayed {stayed}): is a worker polling "
                   f"pool {pool!r}{queue} with a free slot?")
        log.error(message)
        try:
            state = cancel_run(client, run, message)
        except Exception as exc:  # noqa: BLE001 - its jobs fail either way
            log.warning("could not cancel flow run %s: %s", run.id, exc)
            state = _state_type(run)
        return shards.not_started(phase, shard, attempt, str(run.id), state, part, message)
