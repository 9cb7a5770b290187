"""A pair's outcome and its files: its result, its sidecar, a fused group's files, and which
outputs a run folder already holds (the resume rule's listing).

The job pool writes every pair through here, in an unsharded run and in each fusion shard; the
parent of a sharded run builds the results of the pairs it never hands to a shard (their input
failed, or they are all finished) with the same functions.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

from vct import storage
from vct.artifacts import Stored
from vct.batch import outputs
from vct.batch.library import is_concept_uri
from vct.batch.plan import DEFAULT_PLAN_THREADS, PairPlan, branch_keys
from vct.images import png_bytes
from vct.report import REFERENCES_SHOWN
from vct.report.run_record import PairResult
from vct.sidecar import build_sidecar
from vct.storage.fanout import bounded_map

log = logging.getLogger("vct.batch")

Hit = Callable[[str, str], bool]
"""(kind, key) -> whether that stage result came from the cache (or another run's claim)."""


def pair_result(pair: PairPlan, status: str, reason: str | None = None,
                timings: dict | None = None) -> PairResult:
    written = status in ("ok", "skipped")
    images = [u for u, _ in pair.reference_images]  # a folder's images, not the folder
    reference = (pair.row.reference if is_concept_uri(pair.row.reference) or not images
                 else REFERENCES_SHOWN.join(images))
    return PairResult(pair_id=pair.row.pair_id, line=pair.row.line, status=status,
                      source_uri=pair.row.source, reference_uri=reference,
                      png_name=pair.png_name if written else None,
                      sidecar_name=pair.sidecar_name if written else None,
                      reason=reason, timings=timings or {})


def input_failure(pair: PairPlan, failed: Callable[[str, str], str | None],
                  bad: Callable[[str, str], bool]) -> PairResult | None:
    """The result of a pair whose concept or content job failed, or None: ``bad`` (with its
    manifest line, not failing the run) when that job's input image did not decode,
    ``failed`` otherwise. ``failed(kind, key)`` is the job's error, ``bad(kind, key)`` whether
    it was a bad input."""
    for kind, key in (("concept", pair.concept_key), ("content", pair.content_key)):
        error = failed(kind, key)
        if error:
            return pair_result(pair, "bad" if bad(kind, key) else "failed", error)
    return None


def one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def write_group(group: list[PairPlan], fused: Stored, hit: Hit, fusion_key: str,
                run_info: dict, todo: set[str]) -> Iterator[tuple[PairPlan, dict]]:
    """Each unfinished pair of a fused group: PNG, then its sidecar (identical pairs share a
    branch; finished pairs of the group are left as they are). Yields (pair, timings)."""
    branches = branch_keys(group)
    prov = fused.provenance
    for pair in group:
        if pair.row.pair_id not in todo:
            continue
        i = branches.index(pair.concept_key)
        stage_meta = {"concept": prov["concepts"][i], "content": prov["content"],
                      "fusion": {"seconds": prov["fusion_seconds"],
                                 "unet_evals": prov["unet_evals"]}}
        sidecar = build_sidecar(
            source=pair.row.source, source_sha256=pair.source_sha256,
            reference=pair.row.reference, reference_sha256=pair.reference_sha256,
            model=prov["model"],
            config={"concept": pair.concept.model_dump(mode="json"),
                    "content": pair.content.model_dump(mode="json"),
                    "fusion": pair.fusion.model_dump(mode="json")},
            seed=pair.concept.seed, stage_meta=stage_meta,
            references=[{"uri": u, "sha256": s} for u, s in pair.reference_images],
            extra={"pair_id": pair.row.pair_id, "line": pair.row.line,
                   "output_key": pair.output_key, "png": pair.png_name,
                   "concept_file": pair.concept_file,
                   "cache": {kind: {"key": key, "hit": hit(kind, key)}
                             for kind, key in (("concept", pair.concept_key),
                                               ("content", pair.content_key),
                                               ("fusion", fusion_key))},
                   "shared_branch_with": [p.row.pair_id for p in group if p is not pair],
                   **run_info})
        outputs.write_pair(pair.png_uri, png_bytes(fused.result.images[i].numpy()),
                           pair.sidecar_uri, sidecar)
        yield pair, sidecar["timings"]


def write_fused(group: list[PairPlan], fused: Stored | None, error: str | None, hit: Hit,
                fusion_key: str, run_info: dict, todo: set[str],
                results: dict[str, PairResult]) -> None:
    """The files of one fused group into ``results``: ok for each pair written; a fusion that
    failed, a result that vanished or a write that failed fails the group's unfinished pairs
    only (one group's failure never stops the run)."""
    try:
        if error is not None:
            raise RuntimeError(error)
        if fused is None:
            raise RuntimeError(f"fusion result {fusion_key[:12]} vanished from the cache")
        for pair, timings in write_group(group, fused, hit, fusion_key, run_info, todo):
            results[pair.row.pair_id] = pair_result(pair, "ok", timings=timings)
    except Exception as exc:  # noqa: BLE001 - one group's failure must not stop the run
        reason = one_line(exc)
        unfinished = [p for p in group if p.row.pair_id in todo]
        log.error("fusion failed for %s: %s", [p.row.pair_id for p in unfinished], reason)
        for pair in unfinished:
            results.setdefault(pair.row.pair_id, pair_result(pair, "failed",
                                                             f"fusion: {reason}"))


def finished_outputs(planned: list[PairPlan], run_uri: str,
                     threads: int = DEFAULT_PLAN_THREADS) -> dict[str, dict]:
    """The sidecars of the planned pairs whose output can be kept (see
    :func:`vct.batch.outputs.finished_sidecar`), by pair id.

    Why a listing first: checking pair by pair costs a read per pair even in a fresh run folder
    (10 000 pairs on S3 were minutes of one thread before the first fusion). One listing of the
    run folder says which pairs have both files; only those are read and verified, ``threads``
    at a time (``RunSettings.plan_threads``)."""
    listed = set(storage.list_uris(run_uri))
    candidates = [p for p in planned if p.sidecar_uri in listed and p.png_uri in listed]
    if not candidates:
        return {}

    def check(pair: PairPlan) -> dict | None:
        return outputs.finished_sidecar(pair.sidecar_uri, pair.png_uri, pair.output_key)

    found = bounded_map(check, candidates, threads, "vct-resume")
    return {p.row.pair_id: s for p, s in zip(candidates, found) if s is not None}


def resume_state(pairs: list[PairPlan], finished: dict[str, dict]
                 ) -> tuple[dict[str, PairResult], set[str]]:
    """The resume rule over planned pairs, given :func:`finished_outputs`: the skipped results
    (a verified output with the same output key exists) and the ids of the pairs still to
    write."""
    results: dict[str, PairResult] = {}
    todo: set[str] = set()
    for pair in pairs:
        kept = finished.get(pair.row.pair_id)
        if kept is not None:
            results[pair.row.pair_id] = pair_result(pair, "skipped",
                                                    timings=kept.get("timings", {}))
        else:
            todo.add(pair.row.pair_id)
    return results, todo
