"""The batch engine: one manifest in, outputs, run.json, the report and one typed summary out.

Both entry points run it: the Prefect flow (each step below wrapped in a task, for retries and
the UI) and ``vct translate`` (one reference, an in-memory manifest). The steps:

1. :func:`prepare`: check the request (a model named explicitly, safe run id, settings, the
   device and precision, a writable output location: :mod:`vct.batch.preflight`) before
   anything is read or written.
2. :func:`plan`: read the manifest and every input once, refuse bad rows with their line, key
   every job (:mod:`vct.batch.keys`); a reference list, folder or prefix is expanded into
   its images (one concept learns from all of them); a reference that is a concept file is checked against
   the model and its concept put in the stage cache (:mod:`vct.batch.library`), no job.
3. :func:`run_pool`: every concept, content and fusion job of the run in one job pool
   (:mod:`vct.batch.pool`) on the executor's workers, launched once; each pair's PNG and
   sidecar are written as soon as its fusion is done, and a pair whose verified output exists
   is skipped (the resume rule). A failed job fails only the pairs that need it. It ends by
   writing the run's concept library, ``concepts/`` (:func:`write_library`). A sharded run
   (:mod:`vct.batch.shards`) runs this same step in each shard, over the shard's slice.
4. :func:`finish`: run.json, the report, and ``_SUCCESS`` only when the run is complete.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

from vct import report, storage
from vct.batch import library, outputs, pool, preflight
from vct.batch.jobs import ProgressFactory
from vct.batch.plan import Plan, default_run_id, expand_references, hash_inputs, plan_run
from vct.batch.settings import MINI_MODEL, TINY_MODEL, RunSettings, require_model
from vct.batch.workers import ExecutorSettings, Runner
from vct.config import ConfigError
from vct.faults import checkpoint
from vct.inversion import Progress
from vct.manifest import (
    SAFE_NAME_RE,
    Manifest,
    parse_manifest,
    raise_if_bad_rows,
    read_manifest_bytes,
)
from vct.models import local_model_folder, model_geometry, model_identity, precision_identity
from vct.report.run_record import PairResult, RunSummary, StageReport, counts, run_status

log = logging.getLogger("vct.batch")



@dataclass(frozen=True)
class RunRequest:
    """A checked request: where the manifest is, where outputs go, which model, the settings."""

    manifest_uri: str
    output_uri: str
    model: str
    settings: RunSettings
    run_id: str | None = None

    @property
    def cache_uri(self) -> str:
        return self.settings.cache_uri or storage.join(self.output_uri, "_cache")

    def executor(self) -> ExecutorSettings:
        s = self.settings
        return ExecutorSettings(model=self.model, cache_uri=self.cache_uri,
                                model_config=s.checkpoint_config, device=s.device,
                                dtype=s.dtype, mode=s.executor, num_processes=s.num_processes,
                                content_batch=s.content_batch, threads=s.threads)


def tiny_model_folder() -> str:
    """The offline random-weight model, built once into VCT_HOME (or ~/.cache/vct)."""
    from vct.tiny_model import build_tiny_model

    home = Path(os.environ.get("VCT_HOME", Path.home() / ".cache" / "vct"))
    return str(build_tiny_model(home / "tiny-model-seed0", seed=0))


def named_model_folder(spec: str) -> str:
    """The folder of a model asked for by name ('tiny': built here; 'mini': copied from the
    package), or `spec` itself (a folder or s3:// prefix)."""
    if spec == TINY_MODEL:
        return tiny_model_folder()
    if spec == MINI_MODEL:
        from vct.mini.shipped import mini_model_folder

        return str(mini_model_folder())
    return spec


def check_run_id(run_id: str) -> str:
    """A run id names a folder under the output prefix: the same rules as a pair id, so it can
    never climb out of it (no '..', no '/', no absolute path)."""
    if not SAFE_NAME_RE.match(run_id) or outputs.is_reserved(run_id):
        raise ConfigError("run_id", f"{run_id!r} is not a safe folder name (letters, digits, "
                          "'.', '_', '-'; not starting with '.')")
    return run_id


def prepare(manifest_uri: str, output_uri: str, model: str | None,
            settings: RunSettings | dict | None = None, run_id: str | None = None) -> RunRequest:
    """Check everything that needs no reading of the manifest or the model (settings, run id,
    device and dtype, output and cache locations): refused here, nothing has been claimed or
    written. The tiny and mini models are used only when asked for by name."""
    spec = named_model_folder(require_model(model))
    if not isinstance(settings, RunSettings):
        settings = RunSettings.build(settings)
    if not manifest_uri:
        raise ConfigError("manifest_uri", "a manifest is required")
    if not output_uri:
        raise ConfigError("output_uri", "an output location is required")
    request = RunRequest(manifest_uri=manifest_uri, output_uri=output_uri, model=spec,
                         settings=settings, run_id=check_run_id(run_id) if run_id else None)
    preflight.check_request(request.output_uri, request.cache_uri, settings)
    return request


# ---------------------------------------------------------------- planning
@dataclass(frozen=True)
class Inputs:
    """A request's manifest, parsed and checked, and its model as a checked local folder."""

    manifest: Manifest
    manifest_bytes: bytes
    model_folder: Path


def read_inputs(request: RunRequest, manifest: Manifest | None = None) -> Inputs:
    """The one check of a request's manifest and model: the manifest read and parsed (its
    rows' errors refuse it with ``strict``) unless given in memory, the model synced or
    converted to a local folder and checked. Planning starts with it; ``vct run`` calls it
    before Prefect starts, so a wrong path is one line, not a flow run's traceback."""
    if manifest is None:
        manifest_bytes = read_manifest_bytes(request.manifest_uri)
        manifest = parse_manifest(manifest_bytes, request.manifest_uri)
    else:
        manifest_bytes = request.manifest_uri.encode()
    if request.settings.strict:
        manifest.raise_if_errors()
    folder = local_model_folder(request.model, config=request.settings.checkpoint_config)
    preflight.check_model(folder, request.settings)
    return Inputs(manifest, manifest_bytes, Path(folder))


def plan(request: RunRequest, manifest: Manifest | None = None,
         run_uri: str | None = None) -> Plan:
    """Check the manifest and model (:func:`read_inputs`), hash every input, key every job.
    With `strict`, any bad row refuses the whole manifest before any model work."""
    settings = request.settings
    inputs = read_inputs(request, manifest)
    manifest, manifest_bytes, folder = inputs.manifest, inputs.manifest_bytes, inputs.model_folder
    # the keys' model: the files, and the UNet precision unless fp32 (unchanged fp32 keys)
    identity = precision_identity(model_identity(folder), settings.dtype)
    files = library.read_concept_files(
        [row.reference for row in manifest.rows if library.is_concept_uri(row.reference)],
        identity, model_geometry(folder).text_width, threads=settings.plan_threads)
    references = expand_references(
        [row.reference for row in manifest.rows if row.reference not in files],
        settings.max_reference_images, threads=settings.plan_threads)
    images = [u for found in references.values() if isinstance(found, list) for u in found]
    hashes = hash_inputs([row.source for row in manifest.rows] + images,
                         threads=settings.plan_threads)
    hashes.update({u: f.sha256 if isinstance(f, library.ConceptFile) else f
                   for u, f in files.items()})
    good = {u: f for u, f in files.items() if isinstance(f, library.ConceptFile)}
    run_id = request.run_id or default_run_id(
        request.manifest_uri, manifest_bytes,
        {"model": identity, "settings": settings.stage_dict()})
    the_plan = plan_run(manifest, hashes, identity, settings,
                        run_uri or storage.join(request.output_uri, run_id), run_id, good,
                        references)
    used = {p.concept_key for p in the_plan.pairs}
    library.seed_cache(request.cache_uri, [f for f in good.values() if f.key in used])
    if settings.strict:  # rows whose inputs are missing or not images
        raise_if_bad_rows(request.manifest_uri, the_plan.errors)
    for prefix in (the_plan.run_uri, request.cache_uri):  # what killed writers left behind
        storage.sweep_temp_files(prefix)
    return the_plan


# ---------------------------------------------------------------- the jobs
def write_library(the_plan: Plan, results: dict[str, PairResult], cache_uri: str
                  ) -> dict[str, str]:
    """The jobs step's last act: the run's ``concepts/`` (:mod:`vct.batch.library`), a file
    for every concept a written or kept pair used; {concept key: its file in the run}."""
    used = {p.concept_key: p.concept_file for p in the_plan.pairs
            if (r := results.get(p.row.pair_id)) is not None and r.status in ("ok", "skipped")}
    return library.write_concepts(the_plan.run_uri, the_plan.model_identity, used, cache_uri)


def _backend(the_plan: Plan, executor: ExecutorSettings, runner: Runner | None,
             progress: ProgressFactory | None):
    if executor.mode == "accelerate" and runner is None:
        from vct.batch.workers.accelerate import AccelerateBackend

        units = len(the_plan.concept_jobs) + len(the_plan.content_jobs) + len(the_plan.pairs)
        return AccelerateBackend(executor, world=units)
    from vct.batch.workers.local import LocalBackend

    return LocalBackend(executor, runner, progress)


def run_pool(the_plan: Plan, executor: ExecutorSettings, run_info: dict | None = None,
             on_progress: Progress | None = None, progress: ProgressFactory | None = None,
             runner: Runner | None = None) -> pool.PoolOutcome:
    """Step 3: the run's jobs in one pool on the executor's workers (in process, or one
    accelerate launch for the whole run); ``runner`` replaces the in-process worker (tests).
    Returns every pair's result, the three stage reports and per-rank utilization; ends by
    writing the run's concept library (:func:`write_library`)."""
    outcome = pool.run_pool(the_plan, _backend(the_plan, executor, runner, progress),
                            executor.cache_uri, content_batch=executor.content_batch,
                            run_info=run_info, on_progress=on_progress)
    write_library(the_plan, outcome.pairs, executor.cache_uri)
    return outcome


# ---------------------------------------------------------------- the end of a run
def summarize(the_plan: Plan, results: dict[str, PairResult],
              stages: dict[str, StageReport], details: dict | None = None) -> RunSummary:
    pairs = [results[p.row.pair_id] for p in the_plan.pairs]
    pairs += [PairResult(pair_id=e.pair_id or "", line=e.line, status="bad", source_uri="",
                         reference_uri="", reason=e.reason) for e in the_plan.errors]
    pairs.sort(key=lambda p: p.line)
    return RunSummary(run_id=the_plan.run_id, run_uri=the_plan.run_uri,
                      manifest_uri=the_plan.manifest_uri, status=run_status(pairs),
                      counts=counts(pairs, stages), pairs=pairs, stages=stages,
                      details=dict(details or {}))


def _read_optional(uri: str) -> bytes | None:
    """Image bytes for a thumbnail, or None: one unreadable image never fails the report."""
    try:
        return storage.read_input(uri)
    except storage.StorageError:
        return None


def finish(summary: RunSummary, started_at: str, flow_run_id: str = "",
           write_report: bool = True) -> RunSummary:
    """run.json, the report pages, thumbnails and contact sheets; `_SUCCESS` last and only for
    a complete run. Returns the summary with its flow run and times, as run.json has it."""
    summary = replace(summary, flow_run_id=flow_run_id, started_at=started_at,
                      finished_at=datetime.now(UTC).isoformat())
    run = summary.run_uri
    checkpoint("run.json")
    storage.write_bytes(storage.join(run, outputs.RUN_JSON), report.run_json_bytes(summary),
                        "application/json")
    if write_report:
        for name, blob, content_type in report.report_files(summary, _read_optional):
            storage.write_bytes(storage.join(run, name), blob, content_type)
            if name.endswith(".html"):
                checkpoint("report.page")
    success = storage.join(run, outputs.SUCCESS)
    if summary.status == "complete":
        checkpoint("success")
        storage.write_bytes(success, (f'{{"run_id": "{summary.run_id}", '
                                      f'"status": "complete"}}\n').encode())
    else:
        storage.delete(success)
    return summary


# ---------------------------------------------------------------- all of it
def run(request: RunRequest, *, manifest: Manifest | None = None, run_uri: str | None = None,
        progress: ProgressFactory | None = None, write_report: bool = True,
        run_info: dict | None = None, runner: Runner | None = None) -> RunSummary:
    """Every step in order, without Prefect: what `vct translate` and the tests call."""
    started = datetime.now(UTC).isoformat()
    the_plan = plan(request, manifest, run_uri)
    outcome = run_pool(the_plan, request.executor(), run_info, progress=progress, runner=runner)
    summary = summarize(the_plan, outcome.pairs, outcome.stages,
                        details={"model": request.model, **outcome.details()})
    return finish(summary, started, write_report=write_report)
