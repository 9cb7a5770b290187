"""Prefect flows: `restyle` (one manifest) and `restyle-incoming` (each new manifest once).

Thin wrappers: every decision lives in the library's batch engine (`vct.batch.engine`); this
module turns its steps into tasks (retries of transient storage errors, the run graph in the
UI), publishes progress, the summary and a link to report.html as Prefect artifacts, and ends a run that failed any
pair in a Failed state whose message gives the counts.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from prefect.states import Failed

from flows.fleet import Fleet, cancel_dispatched, cancel_grandchildren
from vct import report, storage
from vct.batch import engine, incoming, shards
from vct.batch.settings import RunSettings
from vct.report.names import page_name
from vct.report.run_record import RunSummary


class RunFailed(RuntimeError):
    """A run that did not complete: `summary` is the engine's summary of a `restyle` run;
    `manifests`, what each manifest of a `restyle-incoming` run came to."""

    def __init__(self, message: str, summary: RunSummary | None = None,
                 manifests: list[dict] | None = None):
        super().__init__(message)
        self.summary = summary
        self.manifests = manifests or []


def _transient(task, task_run, state) -> bool:
    """Retry only what may succeed on a second try: throttling, timeouts, 5xx, resets."""
    try:
        state.result()
    except Exception as exc:  # noqa: BLE001 - classifying, not handling
        return storage.is_transient(exc)
    return False


TASK = {"retries": 3, "retry_delay_seconds": [1, 4, 10], "retry_condition_fn": _transient,
        "cache_policy": NO_CACHE}


def _mover(progress_id):
    """Moves the run's progress artifact (to 99 %: the report is the last step) as the run's
    jobs finish, and logs each move."""
    logger = get_run_logger()

    def moved(done: int, total: int) -> None:
        fraction = done / max(1, total)
        if done > 0:
            logger.info("jobs: %.0f%% done", 100 * fraction)
        update_progress_artifact(progress_id, progress=min(99.0, 99.0 * fraction))

    return moved


plan_task = task(name="plan", **TASK)(engine.plan)
pool_task = task(name="jobs", **TASK)(engine.run_pool)
report_task = task(name="report", **TASK)(engine.finish)


def _sharded(flow_run) -> bool:
    """Whether a flow run's `settings` parameter asks for shards (an unsharded run dispatched
    none: nothing to ask the API)."""
    settings = (getattr(flow_run, "parameters", None) or {}).get("settings") or {}
    sharded = (settings.get("shards", 1) if isinstance(settings, dict)
               else getattr(settings, "shards", 1))
    try:
        return int(sharded) > 1
    except (TypeError, ValueError):
        return False


def _cancel_from_hook(flow, flow_run, state, cancel) -> None:
    """Run ``cancel(client, flow run id, reason)`` from a state hook, which may run in the
    worker's process (no run context): log what it cancelled, never raise."""
    from prefect.client.orchestration import get_client
    from prefect.logging.loggers import flow_run_logger

    logger = flow_run_logger(flow_run, flow)
    try:
        with get_client(sync_client=True) as client:
            cancelled = cancel(client, str(flow_run.id), f"parent flow run {state.name}")
    except Exception as exc:  # noqa: BLE001 - a hook reports, it cannot fail the run again
        logger.warning("could not cancel the shard flow runs of %s: %s", flow_run.id, exc)
        return
    if cancelled:
        logger.warning("cancelled %d shard flow run(s) with the parent: %s", len(cancelled),
                       ", ".join(cancelled))


def _cancel_shards(flow, flow_run, state) -> None:
    """State hook of restyle: a cancelled, crashed or failed parent cancels every shard flow
    run it dispatched that is still waiting or running (any of its attempts). It may run in
    the worker's process, not the flow's: it finds them through the run's dispatch record
    (`<run>/_plan/dispatched/`, located by the flow run's `vct.run_uri` label) and the server's
    subflow runs of the parent."""
    if _sharded(flow_run):
        _cancel_from_hook(flow, flow_run, state, cancel_dispatched)


@flow(name="restyle", log_prints=True, on_cancellation=[_cancel_shards],
      on_crashed=[_cancel_shards], on_failure=[_cancel_shards])
def restyle(manifest_uri: str, output_uri: str, model: str,
            settings: RunSettings = RunSettings(), run_id: str | None = None) -> RunSummary:
    """Restyle every (source, reference) pair of a CSV manifest.

    Args:
        manifest_uri: the CSV manifest, a local path or s3:// URI (see manifests/README.md).
        output_uri: output prefix; the run writes under `<output_uri>/<run_id>/`.
        model: a diffusers SD 1.x folder or s3:// prefix holding one, or a single-file
            .safetensors/.ckpt checkpoint (local or s3://; settings.checkpoint_config names
            its config folder when it is not SD 1.5-sized); `mini` = the shipped
            mini model (trained on procedural shapes), `tiny` = the offline random-weight test
            model (noise, for trying the pipeline). Required.
        settings: cache, executor, device and precision, and every stage hyperparameter.
        run_id: output folder name; empty = derived from the manifest bytes and settings, so a
            rerun of the same manifest lands in the same folder and skips finished pairs.
    """
    logger = get_run_logger()
    request = engine.prepare(manifest_uri, output_uri, model, settings, run_id)
    started = datetime.now(UTC).isoformat()
    plan = plan_task(request)
    for err in plan.errors:
        logger.warning("skipping %s", err)
    logger.info("plan: %d pairs, %d bad rows, %d references, %d sources -> %s",
                len(plan.pairs), len(plan.errors), len(plan.concept_jobs),
                len(plan.content_jobs), plan.run_uri)
    progress = create_progress_artifact(progress=0.0, key="restyle-progress",
                                        description=f"run {plan.run_id}")
    run_info = {"flow_run_id": str(flow_run.get_id() or ""), "run_id": plan.run_id}
    details: dict = {"model": request.model, "executor": request.settings.executor}
    mover = _mover(progress)
    if request.settings.shards > 1:  # the same pool in each shard, on any workers of the pool
        fleet = Fleet(plan, request, run_info["flow_run_id"], flow_run.get_run_count())
        outcome = shards.run_sharded(plan, request.cache_uri, request.settings, run_info,
                                     fleet.run_phase, mover)
    else:  # one job pool: every job on this machine's workers, outputs as fusions finish
        outcome = pool_task(plan, request.executor(), run_info, mover)
    results, stages = outcome.pairs, outcome.stages
    details.update(outcome.details())
    summary: RunSummary = report_task(engine.summarize(plan, results, stages, details), started,
                                      run_info["flow_run_id"])
    update_progress_artifact(progress, progress=100.0)
    create_markdown_artifact(key="restyle-report", markdown=report.markdown_summary(summary),
                             description=f"summary of {plan.run_id}")
    create_table_artifact(key="restyle-pairs", table=report.table_rows(summary.planned) or [{}],
                          description=f"pairs of {plan.run_id}")
    index = storage.join(plan.run_uri, page_name(1))
    create_link_artifact(key="restyle-report-link", link_text=f"report of {plan.run_id}",
                         link=storage.share_link(index, request.settings.report_link_expiry_s),
                         description=f"{index}; on S3 a presigned URL, valid "
                         f"{request.settings.report_link_expiry_s} s")
    logger.info("%s: %s", summary.message, json.dumps(summary.counts))
    if summary.status != "complete":
        return Failed(message=summary.message, data=RunFailed(summary.message, summary))
    return summary


@flow(name="restyle-shard", log_prints=True)
def restyle_shard(plan_uri: str, shard: int, phase: str, model: str,
                  settings: RunSettings = RunSettings(), attempt: int = 0) -> dict:
    """One shard of a sharded `restyle` run (started by it through `run_deployment`).

    Args:
        plan_uri: the run's stored plan, `<run>/_plan/plan.json`.
        shard: which of the phase's shards to run.
        phase: `stage` (concepts and contents) or `fusion`.
        model: the parent's model (a folder, s3:// prefix or single file as this worker sees
            it; `tiny` or `mini`).
        settings: the parent's run settings (executor, device, cache), so this shard uses
            every GPU of its machine the way the parent was configured to.
        attempt: 0, or 1 when the parent re-dispatches a crashed shard.
    """
    executor = shards.shard_executor(plan_uri, settings, model)
    result = shards.run_shard(plan_uri, shard, phase, executor, attempt,
                              worker=os.environ.get("PREFECT__WORKER_NAME", ""),
                              flow_run_id=str(flow_run.get_id() or ""))
    get_run_logger().info("%s shard %d: %d computed, %d awaited, %d cached, %d failed, "
                          "%d pairs written in %.1f s", phase, shard,
                          *(len(result.keys(s)) for s in ("computed", "awaited", "cached",
                                                          "failed")),
                          sum(p["status"] == "ok" for p in result.pairs), result.busy_s)
    return result.to_dict()


def _incoming_ended(flow, flow_run, state) -> None:
    """State hook of restyle-incoming: a cancelled, crashed or failed run gives back every
    manifest it still holds (the library's leases), so the next poll takes them over at once
    instead of waiting for the lease to expire; with shards, it also cancels the shard runs of
    the restyle subflows it started (they died with its process, and their own hooks with
    them)."""
    incoming.release_held(str(flow_run.id), f"flow run {state.name}: {state.message or ''}")
    if _sharded(flow_run):
        _cancel_from_hook(flow, flow_run, state, cancel_grandchildren)


@flow(name="restyle-incoming", log_prints=True, on_cancellation=[_incoming_ended],
      on_crashed=[_incoming_ended], on_failure=[_incoming_ended])
def restyle_incoming(incoming_uri: str, output_uri: str, model: str,
                     settings: RunSettings = RunSettings(), lease_seconds: float = 900.0,
                     renew_seconds: float = 60.0) -> list[dict]:
    """Process each CSV manifest under `incoming_uri` once per version of its bytes.

    Args:
        incoming_uri: the prefix (folder or s3:// URI) that art teams drop manifests into.
        output_uri: output prefix; each manifest's run writes under `<output_uri>/<run_id>/`.
        model: a diffusers SD 1.x folder, s3:// prefix or single-file checkpoint; `mini` for
            the shipped mini model, `tiny` for the test model. Required.
        settings: the same run settings as the `restyle` flow, for every manifest.
        lease_seconds: how long a claim on a manifest lives without renewal; a run killed
            outright is taken over by a later poll once this has passed.
        renew_seconds: how often a working run renews its claim (at most half the lease).

    Each manifest's claim is a lease in `<manifest>.processed` (vct.batch.incoming): created
    or taken over with a compare-and-swap, renewed while the run works, released if this run
    is cancelled or crashes, and tied to the manifest's ETag and sha256 so a changed manifest
    runs again. This run ends Failed when any manifest did not complete. Delete a marker to
    run an unchanged manifest again.
    """
    logger = get_run_logger()
    engine.prepare(incoming_uri, output_uri, model, settings)  # refuse before any claim
    policy = incoming.LeasePolicy(lease_seconds, renew_seconds)
    key = str(flow_run.get_id() or "")
    found = incoming.poll(incoming_uri)
    logger.info(found.summary)
    results = []
    for candidate in found.candidates:
        lease = incoming.claim(candidate, incoming.owner_id(key), policy, key)
        if lease is None:  # another poller claimed it between our listing and now
            continue
        with lease.renewing():
            state = restyle(manifest_uri=lease.manifest_uri, output_uri=output_uri, model=model,
                            settings=settings, return_state=True)
        outcome = state.result(raise_on_failure=False)
        summary = outcome.summary if isinstance(outcome, RunFailed) else outcome
        status = incoming.outcome_status(summary)
        if isinstance(summary, RunSummary):
            fields = {"run_uri": summary.run_uri, "counts": summary.counts}
        else:  # the child failed before it had a summary (a bad manifest, say)
            fields = {"error": state.message or "failed"}
        lease.finish(status, **fields)
        if status != "done":
            logger.error("manifest %s: %s", lease.manifest_uri, state.message)
        results.append({"manifest_uri": lease.manifest_uri, "status": status,
                        "run_uri": fields.get("run_uri")})
    failed = [r for r in results if r["status"] != "done"]
    if failed:
        message = f"{len(failed)} of {len(results)} manifest(s) did not complete"
        return Failed(message=message, data=RunFailed(message, manifests=results))
    return results
