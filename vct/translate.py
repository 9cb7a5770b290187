"""`vct translate`: one reference, several sources, everything local, no orchestration.

The concept is learned once, each source inverted once, and every source fused against the
concept. Outputs are written atomically (storage.write_bytes: temp + rename) so a killed run never leaves a
half-written PNG.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vct.artifacts import ConceptResult, textual_inversion_bytes
from vct.config import ConceptConfig, ContentConfig, FusionConfig, ModelConfig, to_dict
from vct.fusion import fuse
from vct.images import decode_image, png_bytes
from vct.inversion import Progress
from vct.models import VCTModels
from vct.sidecar import build_sidecar, model_info, sidecar_bytes
from vct.stages import run_concept, run_content, sha256_bytes
from vct.storage import write_bytes

ProgressFactory = Callable[[str, int], Progress | None]


class InputError(ValueError):
    """A missing, unreadable or conflicting input file; the message names it."""


@dataclass(frozen=True)
class Settings:
    """Everything that decides an output: the three stage configs and the model."""

    model: ModelConfig
    concept: ConceptConfig
    content: ContentConfig
    fusion: FusionConfig

    def to_dict(self) -> dict:
        return {"model": to_dict(self.model), "concept": to_dict(self.concept),
                "content": to_dict(self.content), "fusion": to_dict(self.fusion)}


def read_inputs(reference: Path, sources: list[Path]) -> tuple[bytes, list[bytes]]:
    """Read and decode every input before any model work, so bad input fails in a second."""
    stems: dict[str, Path] = {}
    for src in sources:
        if src.stem in stems:
            raise InputError(f"{src}: same output name '{src.stem}' as {stems[src.stem]}; "
                             "rename one of them")
        stems[src.stem] = src
    blobs = []
    for path in [reference, *sources]:
        if not path.is_file():
            raise InputError(f"{path}: no such file")
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise InputError(f"{path}: cannot read ({exc.strerror})") from None
        decode_image(data, str(path))
        blobs.append(data)
    return blobs[0], blobs[1:]


def translate(models: VCTModels, reference: Path, sources: list[Path], out_dir: Path,
              settings: Settings, progress: ProgressFactory | None = None) -> list[Path]:
    """Run the whole method for one reference and many sources; returns the PNG paths."""
    ref_bytes, src_blobs = read_inputs(reference, sources)
    bar = progress or (lambda desc, total: None)
    concept: ConceptResult = run_concept(models, ref_bytes, str(reference), settings.concept,
                                         progress=bar("concept", settings.concept.max_train_steps))
    write_bytes(str(out_dir / "concept.safetensors"), textual_inversion_bytes(concept))
    written = []
    for path, data in zip(sources, src_blobs):
        steps = settings.content.num_inference_steps
        content = run_content(models, data, str(path), settings.content,
                              progress=bar(f"content {path.name}", 2 * steps))
        started = time.perf_counter()
        result = fuse(models, content, [concept], settings.fusion,
                      expected_content=settings.content, progress=bar(f"fusion {path.name}", steps))
        result.meta["seconds"]["fusion_total"] = time.perf_counter() - started
        out_png = out_dir / f"{path.stem}.png"
        write_bytes(str(out_png), png_bytes(result.images[0]))
        sidecar = build_sidecar(source=str(path), source_sha256=sha256_bytes(data),
                                reference=str(reference), reference_sha256=sha256_bytes(ref_bytes),
                                model=model_info(models), config=settings.to_dict(),
                                seed=settings.concept.seed,
                                stage_meta={"concept": concept.meta, "content": content.meta,
                                            "fusion": result.meta})
        write_bytes(str(out_dir / f"{path.stem}.json"), sidecar_bytes(sidecar))
        written.append(out_png)
    return written
