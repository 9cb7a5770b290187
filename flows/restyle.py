"""Prefect flows: `restyle` (one manifest) and `restyle-incoming` (each new manifest once).

Orchestration only: plan -> concepts -> contents -> fusion -> report. The library (`vct`) does
the math, the storage and the bookkeeping; this module decides what runs when, retries
transient storage errors, and publishes progress and the summary as Prefect artifacts.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from vct import report, storage
from vct.cache import StageCache
from vct.config import to_dict
from vct.executor import ExecutorSettings, Job, fusion_job_config, run_jobs
from vct.images import png_bytes
from vct.manifest import parse_manifest, raise_if_bad_rows, read_manifest_bytes
from vct.models import local_model_folder, model_identity
from vct.plan import (
    BaseSettings,
    PairPlan,
    Plan,
    branch_keys,
    default_run_id,
    fusion_groups,
    hash_inputs,
)
from vct.plan import plan_run as make_plan
from vct.sidecar import build_sidecar, sidecar_bytes
from vct.stages import LOADERS, fusion_key, load_fusion
from vct.tiny_model import build_tiny_model


def _transient(task, task_run, state) -> bool:
    """Retry only what may succeed on a second try: throttling, timeouts, 5xx, resets."""
    try:
        state.result()
    except Exception as exc:  # noqa: BLE001 - classifying, not handling
        return storage.is_transient(exc)
    return False


STORAGE_TASK = {"retries": 3, "retry_delay_seconds": [1, 4, 10],
                "retry_condition_fn": _transient, "cache_policy": NO_CACHE}


def default_model() -> str:
    """The offline tiny model, built once into VCT_HOME (or ~/.cache/vct)."""
    home = Path(os.environ.get("VCT_HOME", Path.home() / ".cache" / "vct"))
    return str(build_tiny_model(home / "tiny-model-seed0", seed=0))


@task(name="plan", **STORAGE_TASK)
def plan_task(manifest_uri: str, output_uri: str, model: str, overrides: dict | None,
              strict: bool, run_id: str | None) -> Plan:
    """Read and validate the manifest, hash every input, dedupe the stage work."""
    logger = get_run_logger()
    base = BaseSettings.from_overrides(overrides)
    manifest_bytes = read_manifest_bytes(manifest_uri)
    manifest = parse_manifest(manifest_bytes, manifest_uri)
    if strict:
        manifest.raise_if_errors()
    identity = model_identity(local_model_folder(model))
    hashes = hash_inputs([u for row in manifest.rows for u in (row.source, row.reference)],
                         storage.read_bytes)
    run_id = run_id or default_run_id(manifest_uri, manifest_bytes,
                                      {"model": identity, "settings": base.to_dict()})
    plan = make_plan(manifest, hashes, identity, base, storage.join(output_uri, run_id), run_id)
    if strict:  # rows whose inputs are missing or not images
        raise_if_bad_rows(manifest_uri, plan.errors)
    for err in plan.errors:
        logger.warning("skipping %s", err)
    logger.info("plan: %d pairs, %d bad rows, %d distinct references, %d distinct sources -> %s",
                len(plan.pairs), len(plan.errors), len(plan.concept_jobs),
                len(plan.content_jobs), plan.run_uri)
    return plan


@task(name="stage-jobs", **STORAGE_TASK)
def stage_task(kind: str, jobs: list[Job], settings: ExecutorSettings,
               progress: dict | None = None) -> dict[str, Any]:
    """Run the jobs of one stage that the cache cannot answer; a bad entry is recomputed.

    `progress` = {"id", "start", "span"}: this stage moves the run's progress artifact from
    start to start + span percent as its jobs finish (cached ones count at once)."""
    logger = get_run_logger()
    cache = StageCache(settings.cache_uri)
    cached, todo = [], []
    for job in jobs:
        if cache.get(kind, job.key, lambda data, k=job.key: LOADERS[kind](data, k)) is not None:
            cached.append(job.key)
            continue
        if cache.contains(kind, job.key):  # present but failed verification: never trusted
            storage.delete(cache.uri(kind, job.key))
        todo.append(job)
    logger.info("%s: %d cached, %d to compute", kind, len(cached), len(todo))
    finished = [len(cached)]

    def report_progress(event: dict) -> None:
        logger.info("%s rank %s: %s/%s %s", kind, event.get("rank"), event.get("done"),
                    event.get("total"), "ok" if event.get("ok") else "FAILED")
        finished[0] += 1
        _move(progress, finished[0] / max(1, len(jobs)))

    _move(progress, finished[0] / max(1, len(jobs)))
    outcomes = run_jobs(todo, settings, on_progress=report_progress) if todo else []
    _move(progress, 1.0)
    failed = {o.key: o.error or "failed" for o in outcomes if not o.ok}
    for key, error in failed.items():
        logger.error("%s job %s failed: %s", kind, key[:12], error)
    return {"cached": cached, "computed": [o.key for o in outcomes if o.ok and not o.skipped],
            "failed": failed, "ranks": sorted({o.rank for o in outcomes}),
            "unet_evals": dict(sum((Counter(o.unet_evals) for o in outcomes), Counter()))}


def _move(progress: dict | None, fraction: float) -> None:
    if progress:
        update_progress_artifact(progress["id"], progress=min(
            100.0, progress["start"] + progress["span"] * fraction))


def stage_spans(plan: Plan) -> dict[str, tuple[float, float]]:
    """Each stage's share of the progress bar, by its UNet cost (fusion ~ 4T per pair)."""
    costs = {"concept": sum(j.cost for j in plan.concept_jobs),
             "content": sum(j.cost for j in plan.content_jobs),
             "fusion": sum(4.0 * p.content.num_inference_steps for p in plan.pairs)}
    total = sum(costs.values()) or 1.0
    spans, start = {}, 0.0
    for kind, cost in costs.items():
        spans[kind] = (start, 99.0 * cost / total)
        start += spans[kind][1]
    return spans


def finished_sidecar(pair: PairPlan) -> dict | None:
    """The sidecar of an output that can be kept: same output key (inputs + settings) and its
    PNG present. Its timings still describe how the kept output was made."""
    try:
        sidecar = json.loads(storage.read_bytes(pair.sidecar_uri))
    except (storage.StorageNotFound, ValueError):
        return None
    if sidecar.get("output_key") == pair.output_key and storage.exists(pair.png_uri):
        return sidecar
    return None


@task(name="write-outputs", **STORAGE_TASK)
def write_outputs_task(group: list[PairPlan], fusion_key: str, cache_uri: str,
                       stage_info: dict[str, set], run_info: dict) -> list[dict]:
    """Write each pair's PNG, then its sidecar (the sidecar's output key marks it finished)."""
    fused = StageCache(cache_uri).get("fusion", fusion_key,
                                      lambda d: load_fusion(d, fusion_key))
    if fused is None:
        raise RuntimeError(f"fusion result {fusion_key[:12]} vanished from the cache")
    written = []
    branches = branch_keys(group)
    for pair in group:
        i = branches.index(pair.concept_key)  # identical pairs share one branch
        sidecar = build_sidecar(
            source=pair.row.source, source_sha256=pair.source_sha256,
            reference=pair.row.reference, reference_sha256=pair.reference_sha256,
            model=fused.meta["model"],
            config={"concept": to_dict(pair.concept), "content": to_dict(pair.content),
                    "fusion": to_dict(pair.fusion)},
            seed=pair.concept.seed,
            stage_meta={"concept": fused.meta["concepts"][i], "content": fused.meta["content"],
                        "fusion": fused.meta["fusion"]},
            extra={"pair_id": pair.row.pair_id, "line": pair.row.line,
                   "output_key": pair.output_key,
                   "cache": {kind: {"key": key, "hit": key in stage_info[kind]}
                             for kind, key in (("concept", pair.concept_key),
                                               ("content", pair.content_key),
                                               ("fusion", fusion_key))},
                   "shared_branch_with": [p.row.pair_id for p in group if p is not pair],
                   **run_info})
        storage.write_bytes(pair.png_uri, png_bytes(fused.images[i].numpy()), "image/png")
        storage.write_bytes(pair.sidecar_uri, sidecar_bytes(sidecar), "application/json")
        written.append({"pair_id": pair.row.pair_id, "timings": sidecar["timings"]})
    return written


def _read_optional(uri: str) -> bytes | None:
    try:
        return storage.read_bytes(uri)
    except storage.StorageError:
        return None


@task(name="report", **STORAGE_TASK)
def report_task(plan: Plan, manifest_uri: str, outcomes: dict[str, dict], counts: dict,
                started_at: str, details: dict) -> dict:
    """run.json, contact sheet, report.html, Prefect artifacts; `_SUCCESS` strictly last."""
    pairs = []
    for pair in plan.pairs:
        info = outcomes[pair.row.pair_id]
        ok = info["status"] != "failed"
        pairs.append(report.PairOutcome(
            pair_id=pair.row.pair_id, line=pair.row.line, status=info["status"],
            source_uri=pair.row.source, reference_uri=pair.row.reference,
            output_uri=pair.png_uri if ok else None, reason=info.get("reason"),
            sidecar={"timings": info.get("timings", {})},
            source_png=_read_optional(pair.row.source),
            reference_png=_read_optional(pair.row.reference),
            output_png=_read_optional(pair.png_uri) if ok else None))
    summary = report.build_run_summary(
        run_id=plan.run_id, flow_run_id=str(flow_run.get_id() or ""), manifest_uri=manifest_uri,
        output_uri=plan.run_uri, counts=counts, outcomes=pairs,
        row_errors=[{"line": e.line, "pair_id": e.pair_id, "reason": e.reason}
                    for e in plan.errors],
        started_at=started_at, finished_at=datetime.now(UTC).isoformat(), extra=details)
    run = plan.run_uri
    storage.write_bytes(storage.join(run, "run.json"), report.run_json_bytes(summary),
                        "application/json")
    storage.write_bytes(storage.join(run, "contact_sheet.png"), report.contact_sheet(pairs),
                        "image/png")
    storage.write_bytes(storage.join(run, "report.html"),
                        report.report_html(summary, pairs).encode(), "text/html")
    create_table_artifact(key="restyle-pairs", table=report.table_rows(pairs) or [{}],
                          description=f"pairs of {plan.run_id}")
    create_markdown_artifact(key="restyle-report", markdown=report.markdown_summary(summary),
                             description=f"summary of {plan.run_id}")
    storage.write_bytes(storage.join(run, "_SUCCESS"),
                        json.dumps({"run_id": plan.run_id, "counts": summary["counts"]}).encode())
    return summary


@flow(name="restyle", log_prints=True)
def restyle(manifest_uri: str, output_uri: str, model: str | None = None,
            cache_uri: str | None = None, strict: bool = False,
            overrides: dict[str, dict[str, Any]] | None = None,
            executor: Literal["local", "accelerate"] = "local",
            num_processes: int | None = None, device: str = "auto",
            dtype: Literal["fp32", "fp16", "bf16"] = "fp32",
            run_id: str | None = None, content_batch: int = 1) -> dict:
    """Restyle every (source, reference) pair of a CSV manifest.

    Args:
        manifest_uri: the CSV manifest, a local path or s3:// URI (see manifests/README.md).
        output_uri: output prefix; the run writes under `<output_uri>/<run_id>/`.
        model: a diffusers SD 1.x folder or s3:// prefix; empty = the offline tiny model.
        cache_uri: stage cache prefix; empty = `<output_uri>/_cache`.
        strict: fail before any model work if any row is bad (else bad rows are skipped).
        overrides: stage settings, e.g. {"concept": {"max_train_steps": 100}}.
        executor: run stage jobs in this process, or across all GPUs with accelerate.
        num_processes: accelerate processes (default one per GPU).
        device: auto (CUDA when present), cpu, cuda.
        dtype: UNet precision; fp16/bf16 need CUDA.
        run_id: output folder name; empty = derived from the manifest bytes and settings, so a
            rerun of the same manifest lands in the same folder and skips finished pairs.
        content_batch: sources fitted together in one batch (each with its own early stop);
            >1 keeps a large GPU busy, 1 is bit-for-bit the one-source computation.
    """
    logger = get_run_logger()
    started_at = datetime.now(UTC).isoformat()
    model = model or default_model()
    cache_uri = cache_uri or storage.join(output_uri, "_cache")
    plan = plan_task(manifest_uri, output_uri, model, overrides, strict, run_id)
    settings = ExecutorSettings(model=model, cache_uri=cache_uri, device=device, dtype=dtype,
                                mode=executor, num_processes=num_processes,
                                content_batch=content_batch)
    progress_id = create_progress_artifact(progress=0.0, key="restyle-progress",
                                           description=f"run {plan.run_id}")
    spans = {kind: {"id": progress_id, "start": a, "span": b}
             for kind, (a, b) in stage_spans(plan).items()}
    t0 = time.perf_counter()
    concepts = stage_task.with_options(name="concepts")("concept", plan.concept_jobs, settings,
                                                         spans["concept"])
    contents = stage_task.with_options(name="contents")("content", plan.content_jobs, settings,
                                                        spans["content"])
    stage_seconds = time.perf_counter() - t0
    stage_info = {"concept": set(concepts["cached"]), "content": set(contents["cached"])}
    outcomes: dict[str, dict] = {}
    todo: list[PairPlan] = []
    for pair in plan.pairs:
        failed = concepts["failed"].get(pair.concept_key) or contents["failed"].get(
            pair.content_key)
        if failed:
            outcomes[pair.row.pair_id] = {"status": "failed", "reason": failed}
        elif (kept := finished_sidecar(pair)) is not None:
            outcomes[pair.row.pair_id] = {"status": "skipped", "timings": kept.get("timings", {})}
        else:
            todo.append(pair)
    groups = fusion_groups(todo)
    fusion_jobs = []
    for group in groups:
        branches = branch_keys(group)
        key = fusion_key(group[0].content_key, branches, group[0].fusion)
        fusion_jobs.append(Job(
            kind="fusion", key=key, input_uri=group[0].row.source,
            config=fusion_job_config(group[0].content_key, branches, to_dict(group[0].fusion)),
            cost=float(2 * (1 + len(branches)) * group[0].content.num_inference_steps)))
    fused = stage_task.with_options(name="fusion")("fusion", fusion_jobs, settings,
                                                   spans["fusion"]) \
        if fusion_jobs else {"cached": [], "computed": [], "failed": {}, "ranks": [],
                             "unet_evals": {}}
    stage_info["fusion"] = set(fused["cached"])
    run_info = {"flow_run_id": str(flow_run.get_id() or ""), "run_id": plan.run_id}
    for group, job in zip(groups, fusion_jobs):
        failure = fused["failed"].get(job.key)
        try:
            if failure:
                raise RuntimeError(failure)
            for item in write_outputs_task(group, job.key, cache_uri, stage_info, run_info):
                outcomes[item["pair_id"]] = {"status": "ok", "timings": item["timings"]}
        except Exception as exc:  # noqa: BLE001 - one group's failure must not stop the run
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            logger.error("fusion failed for %s: %s", [p.row.pair_id for p in group], reason)
            for pair in group:
                outcomes[pair.row.pair_id] = {"status": "failed", "reason": f"fusion: {reason}"}
    statuses = [o["status"] for o in outcomes.values()]
    counts = {
        "pairs_ok": statuses.count("ok"), "pairs_skipped": statuses.count("skipped"),
        "pairs_failed": statuses.count("failed") + len(plan.errors),
        "concepts_computed": len(concepts["computed"]), "concepts_cached": len(concepts["cached"]),
        "concepts_failed": len(concepts["failed"]),
        "contents_computed": len(contents["computed"]), "contents_cached": len(contents["cached"]),
        "contents_failed": len(contents["failed"]),
        "fusions_computed": len(fused["computed"]), "fusions_cached": len(fused["cached"]),
    }
    details = {"model": model, "cache_uri": cache_uri, "executor": executor,
               "stage_seconds": stage_seconds,
               "ranks": {"concept": concepts["ranks"], "content": contents["ranks"],
                         "fusion": fused["ranks"]},
               "unet_evals": {"concept": concepts["unet_evals"], "content": contents["unet_evals"],
                              "fusion": fused["unet_evals"]},
               "settings": BaseSettings.from_overrides(overrides).to_dict()}
    summary = report_task(plan, manifest_uri, outcomes, counts, started_at, details)
    update_progress_artifact(progress_id, progress=100.0)
    logger.info("run %s: %s", plan.run_id, json.dumps(counts))
    return summary


@flow(name="restyle-incoming", log_prints=True)
def restyle_incoming(incoming_uri: str, output_uri: str, model: str | None = None,
                     cache_uri: str | None = None,
                     overrides: dict[str, dict[str, Any]] | None = None,
                     executor: Literal["local", "accelerate"] = "local",
                     num_processes: int | None = None, content_batch: int = 1) -> list[dict]:
    """Process each CSV manifest under `incoming_uri` exactly once.

    A manifest is claimed by creating `<manifest>.processed` with an atomic create-if-absent, so
    two schedules or two workers never run the same manifest; the marker then records the
    outcome. A failed manifest keeps its marker (status "failed"): delete it to retry.
    """
    logger = get_run_logger()
    manifests = [u for u in storage.list_uris(incoming_uri) if u.lower().endswith(".csv")]
    results = []
    for manifest_uri in manifests:
        marker = manifest_uri + ".processed"
        claim = {"status": "running", "flow_run_id": str(flow_run.get_id() or ""),
                 "claimed_at": datetime.now(UTC).isoformat()}
        if not storage.create_if_absent(marker, json.dumps(claim).encode()):
            logger.info("already processed: %s", manifest_uri)
            continue
        try:
            summary = restyle(manifest_uri=manifest_uri, output_uri=output_uri, model=model,
                              cache_uri=cache_uri, overrides=overrides, executor=executor,
                              num_processes=num_processes, content_batch=content_batch)
            state = {**claim, "status": "done", "run_uri": summary["output_uri"],
                     "counts": summary["counts"]}
            results.append({"manifest_uri": manifest_uri, "status": "done",
                            "run_uri": summary["output_uri"]})
        except Exception as exc:  # noqa: BLE001 - record it beside the manifest, go on
            state = {**claim, "status": "failed", "error": str(exc).splitlines()[0]}
            results.append({"manifest_uri": manifest_uri, "status": "failed"})
            logger.error("manifest %s failed: %s", manifest_uri, state["error"])
        storage.write_bytes(marker, json.dumps(state).encode(), "application/json")
    return results
