"""Every cache key of a run, computed here and nowhere else (spec §1).

A key hashes exactly what its result depends on, by content, never by name: concept =
(reference bytes (the set of them, sorted), model, concept config incl. seed, format), content = (source bytes, model,
content config, format), fusion = (content key, concept keys in branch order, fusion config,
format), output = (content key, concept key, fusion config, format). So the same image under two
names is computed once, and a changed byte, setting or seed is a different key.
"""

from __future__ import annotations

import hashlib

from vct.artifacts import FORMAT_VERSION
from vct.cache import cache_key
from vct.config import ConceptConfig, ContentConfig, FusionConfig, to_dict


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def references_digest(shas: list[str]) -> str:
    """What a concept key says of its reference images: one image's sha256 as it is (the key
    of a one-image concept never changed), several images' sha256 over their sorted distinct
    hashes, so the same set in another order, or an image named twice, is the same concept."""
    distinct = sorted(set(shas))
    if len(distinct) == 1:
        return distinct[0]
    return sha256_bytes(("references\n" + "\n".join(distinct)).encode())


def concept_key(reference_sha256: str, model_identity: str, cfg: ConceptConfig) -> str:
    """The seed is part of cfg, so it is part of the key. ``reference_sha256`` is
    :func:`references_digest` of the reference images."""
    return cache_key("concept", {"reference": reference_sha256, "model": model_identity,
                                 "config": to_dict(cfg), "format_version": FORMAT_VERSION})


def content_key(source_sha256: str, model_identity: str, cfg: ContentConfig, *,
                keep_trajectories: bool = False) -> str:
    """``keep_trajectories`` (RunSettings) changes what the entry holds, so it is in the key,
    but only when on: a default (lean) entry keeps the key it has always had."""
    parts = {"source": source_sha256, "model": model_identity, "config": to_dict(cfg),
             "format_version": FORMAT_VERSION}
    if keep_trajectories:
        parts["trajectories"] = True
    return cache_key("content", parts)


def fusion_key(content_k: str, concept_keys: list[str], fusion: FusionConfig) -> str:
    """One fused batch: a source's content, its concepts in branch order, the fusion settings."""
    return cache_key("fusion", {"content": content_k, "concepts": list(concept_keys),
                                "fusion": to_dict(fusion), "format_version": FORMAT_VERSION})


def output_key(content_k: str, concept_k: str, fusion: FusionConfig) -> str:
    """An output is a fact of (content, concept, fusion settings): same key, same image."""
    return cache_key("output", {"content": content_k, "concept": concept_k,
                                "fusion": to_dict(fusion), "format_version": FORMAT_VERSION})
