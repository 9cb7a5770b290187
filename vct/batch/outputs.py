"""Everything a run writes beside its report: the one place that names output files, the
resume rule, and writing a pair's PNG and sidecar.

Writing order is the contract that makes a killed run safe to rerun: the PNG first, then the
sidecar that records the PNG's sha256 and the pair's output key. A pair counts as finished only
when its sidecar has the same output key and the PNG on storage matches the recorded hash.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass

from vct import report, storage
from vct.faults import checkpoint

SUCCESS = "_SUCCESS"
RUN_JSON = "run.json"
CONCEPTS = "concepts"
"""The run's concept library: every concept its pairs used, as a textual-inversion file."""
CONCEPT_SUFFIX = ".safetensors"


@dataclass(frozen=True)
class OutputNames:
    """A pair's files, relative to the run folder."""

    png: str
    sidecar: str


def output_names(output_name: str) -> OutputNames:
    """The names of a pair's output files: every writer and every link uses this."""
    return OutputNames(png=f"{output_name}.png", sidecar=f"{output_name}.json")


def concept_file(reference_uri: str, concept_key: str) -> str:
    """Where a run keeps a concept, relative to the run folder: ``concepts/<stem>-<key12>``,
    the reference's file stem (made a safe name) and the concept key's first 12 digits, so
    one reference under other settings gets its own file. A reference that is itself a
    concept file of that key keeps its name (no second key suffix)."""
    tail = f"-{concept_key[:12]}"
    stem = reference_uri.rstrip("/").rsplit("/", 1)[-1]
    stem = stem.rsplit(".", 1)[0] if "." in stem else stem
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).lstrip(".")[:100] or "concept"
    if not stem.endswith(tail):
        stem += tail
    return f"{CONCEPTS}/{stem}{CONCEPT_SUFFIX}"


_RESERVED_STEMS = re.compile(r"(?:run|report(?:-\d+)?|contact_sheet(?:-\d+)?|_success|thumbs"
                             r"|_cache|concepts)", re.IGNORECASE)


def is_reserved(output_name: str) -> bool:
    """Names the run itself writes (run.json, the report pages, the contact sheets, _SUCCESS,
    thumbnails, the default cache, the concept library), and their stems in any case: a pair named like one would
    be overwritten by the report (or overwrite it), or sit beside it under a confusable name
    (``report.png`` next to ``report.html``), so it is refused. Case is ignored because a run
    folder copied to a case-insensitive file system would fold the names together."""
    names = output_names(output_name)
    return (report.is_reserved(names.png) or report.is_reserved(names.sidecar)
            or report.is_reserved(output_name)
            or _RESERVED_STEMS.fullmatch(output_name.strip()) is not None)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def finished_sidecar(sidecar_uri: str, png_uri: str, output_key: str) -> dict | None:
    """The sidecar of an output that can be kept: same output key (inputs + settings) and the
    PNG present with the recorded sha256 (a truncated or swapped PNG is redone). Its timings
    still describe how the kept output was made."""
    try:
        sidecar = json.loads(storage.read_bytes(sidecar_uri))
        if sidecar.get("output_key") != output_key:
            return None
        png = storage.read_bytes(png_uri)
    except (storage.StorageNotFound, ValueError, AttributeError):
        return None
    return sidecar if sidecar.get("png_sha256") == sha256_hex(png) else None


def write_pair(png_uri: str, png: bytes, sidecar_uri: str, sidecar: dict) -> None:
    """PNG first, then the sidecar with the PNG's hash: the sidecar marks the pair finished."""
    storage.write_bytes(png_uri, png, "image/png")
    checkpoint("output.png")
    sidecar = {**sidecar, "png_sha256": sha256_hex(png)}
    storage.write_bytes(sidecar_uri, (json.dumps(sidecar, indent=2, sort_keys=True, default=str)
                                      + "\n").encode(), "application/json")
    checkpoint("output.pair")
