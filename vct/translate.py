"""`vct translate`: the batch engine on a one-reference manifest held in memory.

One reference and several sources become one in-memory manifest (one row per source, the
output named after the source's file stem); the engine learns the concept once, inverts each
source once and fuses every pair, exactly as `vct run` does, so both write bit-identical PNGs
for the same inputs, seed and thread count (`vct run` leaves a core to its embedded Prefect
server by default: give both the same ``--threads`` to compare them). With `--cache` stage results are kept and reused; without it they
live in a temporary folder for the duration of the call.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from vct import storage
from vct.batch import engine
from vct.batch.jobs import ProgressFactory
from vct.batch.outputs import concept_file
from vct.batch.settings import RunSettings
from vct.errors import UserError
from vct.manifest import Manifest, ManifestError, PairRow
from vct.report.run_record import RunSummary


class InputError(UserError, ValueError):
    """A missing, unreadable or conflicting input file; the message names it."""


CONCEPT_FILE = "concept.safetensors"


def one_reference_manifest(reference: Path, sources: list[Path]) -> Manifest:
    """One row per source against the reference; outputs named after the source stems."""
    stems: dict[str, Path] = {}
    for src in sources:
        if src.stem in stems:
            raise InputError(f"{src}: same output name '{src.stem}' as {stems[src.stem]}; "
                             "rename one of them")
        stems[src.stem] = src
    for path in [reference, *sources]:
        if not path.is_file():
            raise InputError(f"{path}: no such file")
    ref = str(reference.expanduser().resolve())
    rows = [PairRow(line=i, pair_id=src.stem, source=str(src.expanduser().resolve()),
                    reference=ref, output_name=src.stem)
            for i, src in enumerate(sources, start=1)]
    return Manifest(manifest_uri=f"translate:{reference.name}", rows=rows, errors=[],
                    columns=["source", "reference"])


def translate(model: str, reference: Path, sources: list[Path], out_dir: Path,
              settings: RunSettings, cache: str | None = None,
              progress: ProgressFactory | None = None) -> RunSummary:
    """Restyle every source after the reference into `out_dir`; also exports the concept in
    the diffusers textual-inversion format, as `concept.safetensors` (a copy of the run's
    `concepts/` file). Bad input fails before any model work."""
    manifest = one_reference_manifest(reference, sources)
    settings = settings.model_copy(update={"strict": True})
    scratch = None if cache else tempfile.mkdtemp(prefix="vct-translate-cache-")
    cache_uri = cache or scratch
    try:
        request = engine.prepare(manifest.manifest_uri, str(out_dir), model,
                                 settings.model_copy(update={"cache_uri": cache_uri}))
        try:
            summary = engine.run(request, manifest=manifest, run_uri=str(out_dir),
                                 progress=progress, write_report=False)
        except ManifestError as exc:  # an unreadable input: one line naming the file
            if not exc.errors:
                raise
            raise InputError("; ".join(e.reason for e in exc.errors)) from None
        stage = summary.stages["concept"]
        for key in stage.computed + stage.cached:  # the run's library file, under a fixed name
            kept = out_dir / concept_file(manifest.rows[0].reference, key)
            if kept.is_file():
                storage.write_bytes(str(out_dir / CONCEPT_FILE), kept.read_bytes())
        return summary
    finally:
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)
