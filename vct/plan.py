"""Planning a run: from manifest rows to deduplicated stage jobs and per-pair outputs.

Pure bookkeeping, no model: every row's effective configs, the cache keys of the concept and
content it needs (by input bytes, so the same image under two names is one job), where its output
goes and the key that decides whether an existing output can be kept. The flow executes a plan;
tests can inspect one without running anything.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from vct import storage
from vct.artifacts import FORMAT_VERSION
from vct.cache import cache_key
from vct.config import (
    ConceptConfig,
    ConfigError,
    ContentConfig,
    FusionConfig,
    to_dict,
    with_overrides,
)
from vct.executor import Job
from vct.images import ImageError, decode_image
from vct.manifest import Manifest, PairRow, RowError
from vct.stages import concept_key, content_key

STAGES = {"concept": ConceptConfig, "content": ContentConfig, "fusion": FusionConfig}


@dataclass(frozen=True)
class BaseSettings:
    """Run-wide stage configs; rows may override the concept word, the seed and fusion fields."""

    concept: ConceptConfig = ConceptConfig()
    content: ContentConfig = ContentConfig()
    fusion: FusionConfig = FusionConfig()

    @classmethod
    def from_overrides(cls, overrides: dict[str, dict[str, Any]] | None) -> BaseSettings:
        """{"concept": {"max_train_steps": 100}, ...}; errors name stage.field."""
        parts: dict[str, Any] = {}
        for stage, values in (overrides or {}).items():
            if stage not in STAGES:
                raise ConfigError(stage, f"unknown stage; use one of {', '.join(STAGES)}")
            if not isinstance(values, dict):
                raise ConfigError(stage, "overrides must map field names to values")
            parts[stage] = with_overrides(STAGES[stage](), values)
        return cls(**parts)

    def to_dict(self) -> dict:
        return {"concept": to_dict(self.concept), "content": to_dict(self.content),
                "fusion": to_dict(self.fusion)}


@dataclass(frozen=True)
class PairPlan:
    """One row, planned: its effective configs, its keys and its output locations."""

    row: PairRow
    concept: ConceptConfig
    content: ContentConfig
    fusion: FusionConfig
    source_sha256: str
    reference_sha256: str
    concept_key: str
    content_key: str
    output_key: str
    png_uri: str
    sidecar_uri: str


@dataclass
class Plan:
    run_id: str
    run_uri: str
    pairs: list[PairPlan]
    errors: list[RowError]
    concept_jobs: list[Job] = field(default_factory=list)
    content_jobs: list[Job] = field(default_factory=list)


def output_key(content_k: str, concept_k: str, fusion: FusionConfig) -> str:
    """An output is a fact of (content, concept, fusion settings): same key, same image."""
    return cache_key("output", {"content": content_k, "concept": concept_k,
                                "fusion": to_dict(fusion), "format_version": FORMAT_VERSION})


def default_run_id(manifest_uri: str, manifest_bytes: bytes, settings_blob: dict) -> str:
    """Stable per (manifest bytes, settings): a rerun lands in the same folder and skips what
    it already wrote; an edited manifest or other settings get a new folder."""
    stem = manifest_uri.rstrip("/").rsplit("/", 1)[-1].rsplit(".", 1)[0] or "run"
    safe = "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in stem)[:48]
    digest = hashlib.sha256(manifest_bytes + json.dumps(settings_blob, sort_keys=True)
                            .encode()).hexdigest()[:10]
    return f"{safe}-{digest}"


def hash_inputs(uris: list[str], read: Callable[[str], bytes]) -> dict[str, str | Exception]:
    """sha256 of each distinct input, or the error that makes it unusable (missing, not an
    image). Decoding here means a hostile file fails its rows at plan time, not mid-run."""
    out: dict[str, str | Exception] = {}
    for uri in dict.fromkeys(uris):
        try:
            data = read(uri)
            decode_image(data, uri)
            out[uri] = hashlib.sha256(data).hexdigest()
        except (storage.StorageError, ImageError, OSError) as exc:
            out[uri] = exc
    return out


def plan_run(manifest: Manifest, hashes: dict[str, str | Exception], model_identity: str,
             base: BaseSettings, run_uri: str, run_id: str) -> Plan:
    """Effective configs and keys for every good row; inputs that failed become row errors."""
    pairs: list[PairPlan] = []
    errors = list(manifest.errors)
    concept_jobs: dict[str, Job] = {}
    content_jobs: dict[str, Job] = {}
    for row in manifest.rows:
        bad = [(name, hashes[uri]) for name, uri in (("source", row.source),
                                                     ("reference", row.reference))
               if isinstance(hashes[uri], Exception)]
        if bad:
            reason = "; ".join(f"{name} {exc}" for name, exc in bad)
            errors.append(RowError(row.line, row.pair_id, reason))
            continue
        concept_overrides: dict[str, Any] = {}
        if row.concept_word:
            concept_overrides["initializer_word"] = row.concept_word
        if row.seed is not None:
            concept_overrides["seed"] = row.seed
        try:
            concept = with_overrides(base.concept, concept_overrides)
            fusion = with_overrides(base.fusion, row.fusion_overrides)
        except ConfigError as exc:
            errors.append(RowError(row.line, row.pair_id, str(exc)))
            continue
        src_sha, ref_sha = hashes[row.source], hashes[row.reference]
        k_concept = concept_key(ref_sha, model_identity, concept)
        k_content = content_key(src_sha, model_identity, base.content)
        concept_jobs.setdefault(k_concept, Job(
            kind="concept", key=k_concept, input_uri=row.reference, config=to_dict(concept),
            cost=float(concept.max_train_steps * concept.gradient_accumulation_steps)))
        content_jobs.setdefault(k_content, Job(
            kind="content", key=k_content, input_uri=row.source, config=to_dict(base.content),
            cost=float(base.content.num_inference_steps * (base.content.num_inner_steps + 2))))
        pairs.append(PairPlan(
            row=row, concept=concept, content=base.content, fusion=fusion,
            source_sha256=src_sha, reference_sha256=ref_sha, concept_key=k_concept,
            content_key=k_content, output_key=output_key(k_content, k_concept, fusion),
            png_uri=storage.join(run_uri, f"{row.output_name}.png"),
            sidecar_uri=storage.join(run_uri, f"{row.output_name}.json")))
    errors.sort(key=lambda e: e.line)
    return Plan(run_id=run_id, run_uri=run_uri, pairs=pairs, errors=errors,
                concept_jobs=list(concept_jobs.values()),
                content_jobs=list(content_jobs.values()))


def fusion_groups(pairs: list[PairPlan], max_edits: int = 4) -> list[list[PairPlan]]:
    """Pairs that share a source and fusion settings share one B* branch (one UNet batch of
    2 (1 + K) passes), and identical pairs share one B branch; K distinct concepts per group
    at most, so a batch stays within memory."""
    groups: dict[tuple, list[PairPlan]] = {}
    for pair in pairs:
        key = (pair.content_key, json.dumps(to_dict(pair.fusion), sort_keys=True))
        groups.setdefault(key, []).append(pair)
    out = []
    for members in groups.values():
        concepts = list(dict.fromkeys(p.concept_key for p in members))
        for i in range(0, len(concepts), max_edits):
            chunk = set(concepts[i:i + max_edits])
            out.append([p for p in members if p.concept_key in chunk])
    return out


def branch_keys(group: list[PairPlan]) -> list[str]:
    """The distinct concepts of a fusion group, in branch order."""
    return list(dict.fromkeys(p.concept_key for p in group))
