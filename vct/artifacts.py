"""Stage results and their files: safetensors tensors plus a JSON header that says what made them.

A result file is a fact that can be checked: the header holds the format version, the kind, the
stage config, the input hashes, the library versions and a sha256 of the tensor payload, and a
reader verifies all of it before trusting the tensors. No pickle anywhere.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, fields
from importlib import metadata
from typing import Any, ClassVar, TypeVar

import torch
from safetensors.torch import load, save

FORMAT_VERSION = 1
HEADER_KEY = "vct"


class ArtifactError(ValueError):
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


def _payload_digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous().cpu()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@dataclass
class StageResult:
    """Base: tensor fields go to safetensors, `meta` goes to the JSON header."""

    KIND: ClassVar[str] = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)
                if isinstance(getattr(self, f.name), torch.Tensor)}

    def to_bytes(self) -> bytes:
        # clone: results may hold views of one another (x_T is the last inversion latent)
        tensors = {k: v.detach().cpu().clone() for k, v in self.tensors().items()}
        header = {"format_version": FORMAT_VERSION, "kind": self.KIND, "meta": self.meta,
                  "payload_sha256": _payload_digest(tensors)}
        return save(tensors, metadata={HEADER_KEY: json.dumps(header, sort_keys=True)})

    @classmethod
    def from_bytes(cls: type[R], data: bytes, expect: dict[str, Any] | None = None) -> R:
        """Parse and verify; `expect` maps meta keys to values the caller requires."""
        try:
            tensors = load(data)
            raw = _read_metadata(data)
            header = json.loads(raw[HEADER_KEY])
        except Exception as exc:  # safetensors raises several types for corrupt bytes
            raise ArtifactError(f"not a vct result file ({type(exc).__name__}: {exc})") from None
        if header.get("kind") != cls.KIND:
            raise ArtifactError(f"expected a {cls.KIND} result, found {header.get('kind')!r}")
        if header.get("format_version") != FORMAT_VERSION:
            raise ArtifactError(f"format version {header.get('format_version')} is not "
                                f"{FORMAT_VERSION}; recompute it")
        if header.get("payload_sha256") != _payload_digest(tensors):
            raise ArtifactError("tensor payload does not match its checksum")
        meta = header.get("meta", {})
        for key, value in (expect or {}).items():
            if meta.get(key) != value:
                raise ArtifactError(f"{key} is {meta.get(key)!r}, expected {value!r}")
        names = {f.name for f in fields(cls)} - {"meta"}
        if set(tensors) != names:
            raise ArtifactError(f"tensors {sorted(tensors)} do not match {sorted(names)}")
        return cls(meta=meta, **tensors)


R = TypeVar("R", bound=StageResult)


def _read_metadata(data: bytes) -> dict[str, str]:
    """The safetensors header's __metadata__ (the format: 8-byte length, then JSON)."""
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]).get("__metadata__", {})


@dataclass
class ContentResult(StageResult):
    """Stages 1-2 for one source: x_T and one content embedding per sampling step.

    meta holds the config, the timestep grid, T, w and the inversion prompt (fusion refuses a
    result made with other values), the source hash, the model identity and the fit statistics.
    """

    KIND: ClassVar[str] = "content"
    x_T: torch.Tensor = None  # (1, 4, h, w)
    embeddings: torch.Tensor = None  # (T, L, D), c_0..c_{T-1}
    inversion_latents: torch.Tensor = None  # (T+1, 4, h, w): z_0, z*_0..z*_{T-1}
    reconstruction: torch.Tensor = None  # (T+1, 4, h, w): x_T, then z-bar after each step


@dataclass
class ConceptResult(StageResult):
    """Stage 3 for one reference: the n learned token vectors."""

    KIND: ClassVar[str] = "concept"
    vectors: torch.Tensor = None  # (n, D)


@dataclass
class FusionImages(StageResult):
    """Stage 4 for one source and K concepts sharing its B* branch: the K output images.

    Cached like the other stages, so a run killed between fusing and writing its PNGs resumes
    without fusing again, and fusion can run on accelerate ranks like the other jobs. meta holds
    what each output's sidecar reports: the per-branch concept and content provenance.
    """

    KIND: ClassVar[str] = "fusion"
    images: torch.Tensor = None  # (K, H, W, 3) uint8


def textual_inversion_bytes(concept: ConceptResult, token: str = "<s2>") -> bytes:
    """The diffusers textual-inversion format: {token: (n, D)}; `load_textual_inversion` reads it
    and names the tokens token, token_1, ..., token_{n-1}."""
    provenance = {k: concept.meta.get(k) for k in ("config", "reference_sha256",
                                                   "model_identity")}
    return save({token: concept.vectors.detach().cpu().float().contiguous()},
                metadata={HEADER_KEY: json.dumps(  # one key: safetensors orders keys randomly
                    {"kind": "textual_inversion", "meta": provenance}, sort_keys=True)})
