"""Stage results on disk: safetensors tensors plus one JSON header that says what made them.

The paper modules return plain typed results (tensors, the config, typed stats). This module
turns one into bytes together with its *provenance* (the cache key, the model identity, the input
hashes, UNet evaluation counts: what the job layer knows and the math does not), and back.

A result file is a fact that can be checked: the header holds the format version, the kind, the
config, the stats, the provenance, the library versions, and one sha256 over the tensor payload
*and* every header field that drives computation or is reported. A reader verifies all of it
before trusting the file, so an edited guidance scale in a header is a rejected entry, not a
silently different fusion. No pickle anywhere.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import torch
from safetensors.torch import load, save

from vct.concept import ConceptResult, ConceptStats
from vct.config import ConceptConfig, ContentConfig, from_dict, to_dict
from vct.content import ContentResult, ContentStats
from vct.errors import UserError

FORMAT_VERSION = 3  # 3: content entries always hold the reconstruction fusion replays
HEADER_KEY = "vct"


class ArtifactError(UserError, ValueError):
    """A result file is corrupt, of another kind or format version, or fails its checksum."""


def package_versions() -> dict[str, str]:
    """Versions that can change numbers; recorded in every header and sidecar."""
    out = {}
    for name in ("vct", "torch", "diffusers", "transformers", "accelerate", "safetensors"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "unknown"
    return out


def _digest(tensors: dict[str, torch.Tensor], fields: dict[str, Any]) -> str:
    """One sha256 over every tensor (name, dtype, shape, bytes) and the canonical JSON of the
    header fields, so neither can change without the reader noticing."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous().cpu()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    h.update(json.dumps(fields, sort_keys=True, separators=(",", ":"), allow_nan=True,
                        default=str).encode())
    return h.hexdigest()


def encode(kind: str, tensors: dict[str, torch.Tensor], fields: dict[str, Any]) -> bytes:
    """Bytes of one result file: `tensors` in safetensors, `fields` in the checked header."""
    # clone: results may hold views of one another (x_T is the last inversion latent)
    tensors = {k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()}
    fields = json.loads(json.dumps(fields, default=str))  # exactly what a reader will see
    header = {"format_version": FORMAT_VERSION, "kind": kind, "fields": fields,
              "sha256": _digest(tensors, fields)}
    return save(tensors, metadata={HEADER_KEY: json.dumps(header, sort_keys=True)})


def decode(kind: str, data: bytes) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Parse and verify a result file of `kind`; raises ArtifactError on anything wrong."""
    try:
        tensors = load(data)
        header = json.loads(_read_metadata(data)[HEADER_KEY])
    except Exception as exc:  # safetensors raises several types for corrupt bytes
        raise ArtifactError(f"not a vct result file ({type(exc).__name__}: {exc})") from None
    if header.get("kind") != kind:
        raise ArtifactError(f"expected a {kind} result, found {header.get('kind')!r}")
    if header.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"format version {header.get('format_version')} is not "
                            f"{FORMAT_VERSION}; recompute it")
    fields = header.get("fields")
    if not isinstance(fields, dict) or header.get("sha256") != _digest(tensors, fields):
        raise ArtifactError("tensors or header do not match the file's checksum")
    return tensors, fields


def _read_metadata(data: bytes) -> dict[str, str]:
    """The safetensors header's __metadata__ (the format: 8-byte length, then JSON)."""
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]).get("__metadata__", {})


@dataclass
class Stored:
    """A stage result as the cache holds it: the result and what the job layer knows of it."""

    result: Any
    provenance: dict[str, Any] = field(default_factory=dict)


@dataclass
class FusedImages:
    """Stage 4 for one source and K concepts sharing its B* branch: the K output images.

    Cached like the other stages, so a run killed between fusing and writing its PNGs resumes
    without fusing again, and fusion runs on accelerate ranks like the other jobs.
    """

    images: torch.Tensor  # (K, H, W, 3) uint8


_TENSORS = {
    "content": ("x_T", "embeddings", "inversion_latents", "reconstruction"),
    "concept": ("vectors",),
    "fusion": ("images",),
}
# Tensors an entry may lack (stored as None: a lean content entry, the default).
_OPTIONAL = {"content": ("inversion_latents",)}


def stored_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """What a cache entry holds: every floating tensor in fp32 (a no-op for the fp32 results
    the stages return on every precision), integer tensors (the images, uint8) as they are.
    One dtype on disk whatever the UNet ran in, so an entry never depends on how it is read:
    a bf16 embedding would lose 16 of its 24 mantissa bits of a fit made in fp32."""
    return tensor.float() if tensor.is_floating_point() else tensor


def result_bytes(kind: str, stored: Stored) -> bytes:
    """Serialise a stage result with its provenance (the config and stats go in the header)."""
    result = stored.result
    tensors = {name: getattr(result, name) for name in _TENSORS[kind]}
    tensors = {name: stored_tensor(t) for name, t in tensors.items()
               if not (t is None and name in _OPTIONAL.get(kind, ()))}
    fields: dict[str, Any] = {"provenance": stored.provenance}
    if kind in ("content", "concept"):
        fields["config"] = to_dict(result.config)
        fields["stats"] = dataclasses.asdict(result.stats)
    return encode(kind, tensors, fields)


def load_result(kind: str, data: bytes, *, key: str | None = None) -> Stored:
    """Parse and verify a stored result; with `key`, the recorded cache key must match."""
    tensors, fields = decode(kind, data)
    optional = set(_OPTIONAL.get(kind, ()))
    if set(tensors) not in (set(_TENSORS[kind]), set(_TENSORS[kind]) - optional):
        raise ArtifactError(f"tensors {sorted(tensors)} do not match {sorted(_TENSORS[kind])}")
    if optional and not optional & set(tensors):
        tensors = {**tensors, **dict.fromkeys(optional)}
    provenance = fields.get("provenance") or {}
    if key is not None and provenance.get("cache_key") != key:
        raise ArtifactError(f"cache_key is {provenance.get('cache_key')!r}, expected {key!r}")
    try:
        if kind == "content":
            result = ContentResult(**tensors, config=from_dict(ContentConfig, fields["config"]),
                                   stats=ContentStats(**fields["stats"]))
        elif kind == "concept":
            result = ConceptResult(**tensors, config=from_dict(ConceptConfig, fields["config"]),
                                   stats=ConceptStats(**fields["stats"]))
        else:
            result = FusedImages(**tensors)
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"unreadable {kind} header ({type(exc).__name__}: {exc})") from None
    return Stored(result=result, provenance=provenance)


TEXTUAL_INVERSION = "textual_inversion"
"""The ``kind`` of a concept file's header (``vct translate``'s concept.safetensors and a run's
``concepts/``)."""


def textual_inversion_bytes(concept: ConceptResult, provenance: dict | None = None,
                            token: str = "<s2>") -> bytes:
    """The diffusers textual-inversion format: {token: (n, D)}; `load_textual_inversion` reads it
    and names the tokens token, token_1, ..., token_{n-1}. The header's ``sha256`` covers the
    vectors and every header field, so :func:`read_textual_inversion` refuses an edited file."""
    tensors = {token: concept.vectors.detach().cpu().float().contiguous()}
    meta = json.loads(json.dumps({"config": to_dict(concept.config), **(provenance or {})},
                                 default=str))  # exactly what a reader will see
    header = {"kind": TEXTUAL_INVERSION, "meta": meta, "sha256": _digest(tensors, meta)}
    return save(tensors, metadata={HEADER_KEY: json.dumps(  # one key: safetensors orders keys
        header, sort_keys=True)})  # randomly


def read_textual_inversion(data: bytes) -> tuple[torch.Tensor, dict[str, Any]]:
    """The vectors (n, D) and header ``meta`` of a file written by
    :func:`textual_inversion_bytes`, verified; ArtifactError on anything else."""
    try:
        tensors = load(data)
        metadata = _read_metadata(data)
    except Exception as exc:  # safetensors raises several types for corrupt bytes
        raise ArtifactError(f"not a safetensors file ({type(exc).__name__}: {exc})") from None
    if HEADER_KEY not in metadata:
        raise ArtifactError("a textual-inversion file without vct's header (made elsewhere); "
                            "only concept files vct wrote can be read back")
    try:
        header = json.loads(metadata[HEADER_KEY])
    except ValueError as exc:
        raise ArtifactError(f"unreadable vct header ({exc})") from None
    if not isinstance(header, dict) or header.get("kind") != TEXTUAL_INVERSION:
        kind = header.get("kind") if isinstance(header, dict) else None
        raise ArtifactError(f"not a vct concept file (its header's kind is {kind!r})")
    meta = header.get("meta")
    if not isinstance(meta, dict) or header.get("sha256") != _digest(tensors, meta):
        raise ArtifactError("vectors or header do not match the file's checksum (edited, or "
                            "written before vct recorded one)")
    if len(tensors) != 1:
        raise ArtifactError(f"expected one token's vectors, found {sorted(tensors)}")
    (vectors,) = tensors.values()
    if vectors.ndim != 2 or not vectors.is_floating_point():
        raise ArtifactError(f"vectors must be a float (n, D) matrix, got {vectors.dtype} "
                            f"{tuple(vectors.shape)}")
    return vectors, meta
