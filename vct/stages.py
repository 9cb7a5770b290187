"""The three jobs every entry point runs (CLI, Prefect tasks, accelerate ranks), from bytes.

A job takes input bytes and a config and returns a stage result; what it depends on is exactly
its cache key (spec §1): concept = (reference bytes, model, concept config incl. seed, format),
content = (source bytes, model, content config, format). Names never enter a key, so the same
image under two names is computed once.
"""

from __future__ import annotations

import hashlib

from vct.artifacts import FORMAT_VERSION, ConceptResult, ContentResult
from vct.cache import cache_key
from vct.concept import learn_concept
from vct.config import ConceptConfig, ContentConfig, to_dict
from vct.content import invert_content
from vct.images import decode_image
from vct.inversion import Progress
from vct.models import VCTModels


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def concept_key(reference_sha256: str, model_identity: str, cfg: ConceptConfig) -> str:
    """The seed is part of cfg, so it is part of the key."""
    return cache_key("concept", {"reference": reference_sha256, "model": model_identity,
                                 "config": to_dict(cfg), "format_version": FORMAT_VERSION})


def content_key(source_sha256: str, model_identity: str, cfg: ContentConfig) -> str:
    return cache_key("content", {"source": source_sha256, "model": model_identity,
                                 "config": to_dict(cfg), "format_version": FORMAT_VERSION})


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
    image = decode_image(source, name)
    sha = sha256_bytes(source)
    result = invert_content(models, image, cfg, source_sha256=sha, progress=progress)
    result.meta["cache_key"] = content_key(sha, models.identity, cfg)
    return result


def load_concept(data: bytes, key: str) -> ConceptResult:
    """Parse and verify a cached concept; the recorded key must be the one asked for."""
    return ConceptResult.from_bytes(data, expect={"cache_key": key})


def load_content(data: bytes, key: str) -> ContentResult:
    return ContentResult.from_bytes(data, expect={"cache_key": key})
