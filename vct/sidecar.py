"""The metadata sidecar written beside every output image: what made it, and what it cost."""

from __future__ import annotations

import json
import platform
from typing import Any

from vct.artifacts import package_versions
from vct.models import VCTModels


def model_info(models: VCTModels) -> dict:
    """Which model, where and in what precision: enough to reproduce or to distrust a result."""
    return {"source": models.source, "identity": models.identity, "device": str(models.device),
            "dtype": str(models.dtype).replace("torch.", "")}


def build_sidecar(*, source: str, source_sha256: str, reference: str, reference_sha256: str,
                  model: dict, config: dict, seed: int, stage_meta: dict[str, dict],
                  extra: dict[str, Any] | None = None,
                  references: list[dict] | None = None) -> dict:
    """Inputs with their hashes, the model, the full effective config, the seed, per-stage
    timings and UNet evaluation counts, package versions, plus caller extras (cache keys...).
    ``references``: every image the concept learned from ({uri, sha256}), when known."""
    return {
        "source": {"uri": source, "sha256": source_sha256},
        "reference": {"uri": reference, "sha256": reference_sha256},
        "references": references or [{"uri": reference, "sha256": reference_sha256}],
        "model": model,
        "config": config,
        "seed": seed,
        "timings": {k: v for meta in stage_meta.values()
                    for k, v in meta.get("seconds", {}).items()},
        "unet_evals": {k: v for meta in stage_meta.values()
                       for k, v in meta.get("unet_evals", {}).items()},
        "content_iterations": stage_meta.get("content", {}).get("total_iterations"),
        "versions": {**package_versions(), "python": platform.python_version()},
        **(extra or {}),
    }


def sidecar_bytes(sidecar: dict) -> bytes:
    return (json.dumps(sidecar, indent=2, sort_keys=True, default=str) + "\n").encode()
