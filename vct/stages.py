"""The jobs every entry point runs (CLI, Prefect tasks, accelerate ranks), and their keys.

A job returns a stage result whose cache key is exactly what it depends on (spec §1):
concept = (reference bytes, model, concept config incl. seed, format), content = (source bytes,
model, content config, format), fusion = (content key, concept keys in branch order, fusion
config, format). Names never enter a key, so the same image under two names is computed once.
"""

from __future__ import annotations

import hashlib

import torch

from vct.artifacts import FORMAT_VERSION, ConceptResult, ContentResult, FusionImages
from vct.cache import cache_key
from vct.concept import learn_concept
from vct.config import ConceptConfig, ContentConfig, FusionConfig, to_dict
from vct.content import invert_contents
from vct.fusion import fuse
from vct.images import decode_image
from vct.inversion import Progress
from vct.models import VCTModels
from vct.sidecar import model_info


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def concept_key(reference_sha256: str, model_identity: str, cfg: ConceptConfig) -> str:
    """The seed is part of cfg, so it is part of the key."""
    return cache_key("concept", {"reference": reference_sha256, "model": model_identity,
                                 "config": to_dict(cfg), "format_version": FORMAT_VERSION})


def content_key(source_sha256: str, model_identity: str, cfg: ContentConfig) -> str:
    return cache_key("content", {"source": source_sha256, "model": model_identity,
                                 "config": to_dict(cfg), "format_version": FORMAT_VERSION})


def fusion_key(content_k: str, concept_keys: list[str], fusion: FusionConfig) -> str:
    """One fused batch: a source's content, its concepts in branch order, the fusion settings."""
    return cache_key("fusion", {"content": content_k, "concepts": list(concept_keys),
                                "fusion": to_dict(fusion), "format_version": FORMAT_VERSION})


def _provenance(meta: dict) -> dict:
    """What a sidecar reports of a stage result: its costs, not its tensors or curves."""
    keep = ("seconds", "unet_evals", "total_iterations", "cache_key", "config")
    return {k: meta[k] for k in keep if k in meta}


def run_fusion(models: VCTModels, content: ContentResult, concepts: list[ConceptResult],
               fusion: FusionConfig, key: str, *,
               progress: Progress | None = None) -> FusionImages:
    """Fuse one source with its concepts in one batched sampler (they share B*)."""
    result = fuse(models, content, concepts, fusion, progress=progress)
    meta = {"cache_key": key, "model": model_info(models), "fusion": result.meta,
            "content": _provenance(content.meta),
            "concepts": [_provenance(c.meta) for c in concepts]}
    return FusionImages(meta=meta, images=torch.from_numpy(result.images.copy()))


def run_concept(models: VCTModels, reference: bytes, name: str, cfg: ConceptConfig, *,
                num_processes: int = 1, progress: Progress | None = None) -> ConceptResult:
    """Decode the reference (errors name the file) and learn its concept."""
    image = decode_image(reference, name)
    sha = sha256_bytes(reference)
    result = learn_concept(models, image, cfg, reference_sha256=sha,
                           num_processes=num_processes, progress=progress)
    result.meta["cache_key"] = concept_key(sha, models.identity, cfg)
    return result


def run_content(models: VCTModels, source: bytes, name: str, cfg: ContentConfig, *,
                progress: Progress | None = None) -> ContentResult:
    """Decode the source (errors name the file) and invert it."""
    return run_contents(models, [source], [name], cfg, progress=progress)[0]


def run_contents(models: VCTModels, sources: list[bytes], names: list[str],
                 cfg: ContentConfig, *, progress: Progress | None = None) -> list[ContentResult]:
    """Invert several sources in one batch (each keeps its own fit and early stop)."""
    images = [decode_image(data, name) for data, name in zip(sources, names)]
    shas = [sha256_bytes(data) for data in sources]
    results = invert_contents(models, images, cfg, source_sha256s=shas, progress=progress)
    for result, sha in zip(results, shas):
        result.meta["cache_key"] = content_key(sha, models.identity, cfg)
    return results


def load_concept(data: bytes, key: str) -> ConceptResult:
    """Parse and verify a cached concept; the recorded key must be the one asked for."""
    return ConceptResult.from_bytes(data, expect={"cache_key": key})


def load_content(data: bytes, key: str) -> ContentResult:
    return ContentResult.from_bytes(data, expect={"cache_key": key})


def load_fusion(data: bytes, key: str) -> FusionImages:
    return FusionImages.from_bytes(data, expect={"cache_key": key})


LOADERS = {"concept": load_concept, "content": load_content, "fusion": load_fusion}
