"""The concept library: every concept a run used, kept as a portable file under its output,
and such a file standing in for a reference image in a later manifest.

Why: learning a concept is the run's most expensive stage per reference, and teams reuse a
look across many batches. A concept file is the diffusers textual-inversion format
(``load_textual_inversion`` reads it) with vct's provenance in its header: the model identity
the concept was learned on, the reference image(s) with their sha256, the concept settings
and statistics, and the concept key. A checksum covers the vectors and the header
(:func:`vct.artifacts.read_textual_inversion`), so an edited file is refused.

One read path: planning checks a named concept file and stores its concept in the stage
cache under its key when absent (:func:`seed_cache`); from there the pool and fusion read it
like any concept, and no concept job is made. Its key is the concept key the run that learned
it computed, recomputed from the file's provenance (reference hash, model, settings): a row
naming the image and a row naming its concept file share one concept and one output key.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass

from vct import storage
from vct.artifacts import ArtifactError, Stored, read_textual_inversion, textual_inversion_bytes
from vct.batch import keys, outputs
from vct.batch.jobs import load, store
from vct.cache import StageCache
from vct.concept import ConceptResult, ConceptStats
from vct.config import ConceptConfig, ConfigError, from_dict
from vct.errors import UserError
from vct.manifest import REFERENCE_SEPARATOR
from vct.storage.fanout import bounded_map

log = logging.getLogger("vct.batch")

LIBRARY_VERSION = 1
"""``meta["vct_concept"]`` of a concept file: what marks it as one vct can read back."""
TOKEN = "<s2>"
"""The placeholder the files are written with (the original's), a suggestion for users."""


class ConceptFileError(UserError, ValueError):
    """A reference that is not a usable concept file for this run; the message names it."""


def is_concept_uri(uri: str) -> bool:
    """A reference naming one concept file rather than images (by its suffix)."""
    return REFERENCE_SEPARATOR not in uri and uri.lower().endswith(outputs.CONCEPT_SUFFIX)


@dataclass(frozen=True)
class ConceptFile:
    """A checked concept file: its sha256, its concept key, the model it was learned on, and
    the entry the stage cache holds for that key."""

    uri: str
    sha256: str
    key: str
    model_identity: str
    stored: Stored

    @property
    def references(self) -> tuple[tuple[str, str], ...]:
        """(URI, sha256) of the images the concept was learned from, as recorded."""
        return tuple((r["uri"], r["sha256"]) for r in self.stored.provenance["references"])


def references_of(provenance: dict) -> list[dict]:
    """The reference images a concept entry records: every one ({uri, sha256}), or, for an
    entry of one image, its input and hash."""
    return provenance.get("references") or [{"uri": provenance.get("input_uri"),
                                             "sha256": provenance.get("reference_sha256")}]


def concept_file_bytes(stored: Stored, key: str, model_identity: str) -> bytes:
    """A concept cache entry as a portable file with its provenance: the model identity the
    keys use, the reference(s) with their sha256, settings (``config``), statistics, the key
    and the UNet work that learned it. No timings: the same concept is the same bytes."""
    prov = stored.provenance
    stats = {k: v for k, v in dataclasses.asdict(stored.result.stats).items() if k != "seconds"}
    return textual_inversion_bytes(stored.result, {
        "vct_concept": LIBRARY_VERSION, "concept_key": key, "model_identity": model_identity,
        "model": prov.get("model"),
        "references": references_of(prov),
        "stats": stats, "learned": {"unet_evals": prov.get("unet_evals", {})}}, token=TOKEN)


def read_concept_file(uri: str, model_identity: str, text_width: int | None = None,
                      read: Callable[[str], bytes] | None = None) -> ConceptFile:
    """Read and check a concept file against the run's model: a vct concept file, intact,
    learned on this model identity (else both identities are named), vectors as wide as the
    text encoder (``text_width``). Raises ConceptFileError naming the file."""
    data = (read or storage.read_input)(uri)
    try:
        vectors, meta = read_textual_inversion(data)
    except ArtifactError as exc:
        raise ConceptFileError(f"{uri}: {exc}") from None
    if meta.get("vct_concept") != LIBRARY_VERSION:
        raise ConceptFileError(f"{uri}: a textual-inversion file without vct's provenance; only "
                               "concept files a vct run wrote (its concepts/) can be a reference")
    try:
        cfg = from_dict(ConceptConfig, meta["config"])
        stats = ConceptStats(**meta["stats"])
        references = [{"uri": str(r["uri"]), "sha256": str(r["sha256"])}
                      for r in meta["references"]]
        if not references:
            raise ValueError("no reference images recorded")
        learned_on = str(meta["model_identity"])
        ref_sha = keys.references_digest([r["sha256"] for r in references])
    except (KeyError, IndexError, TypeError, ValueError, ConfigError) as exc:
        raise ConceptFileError(f"{uri}: unreadable provenance ({type(exc).__name__}: {exc})"
                               ) from None
    if learned_on != model_identity:
        raise ConceptFileError(f"{uri}: learned on model {learned_on}, but this run's model is "
                               f"{model_identity}; learn it again on this model (name its "
                               "reference image)")
    if vectors.shape[0] != cfg.num_vectors:
        raise ConceptFileError(f"{uri}: {vectors.shape[0]} vectors, its settings say "
                               f"{cfg.num_vectors}")
    if text_width is not None and vectors.shape[1] != text_width:
        raise ConceptFileError(f"{uri}: vectors {vectors.shape[1]} wide, this model's text "
                               f"encoder is {text_width}")
    key = keys.concept_key(ref_sha, learned_on, cfg)
    learned = meta.get("learned") or {}
    provenance = {"cache_key": key, "model": meta.get("model"),
                  "input_uri": references[0]["uri"], "reference_sha256": ref_sha,
                  "references": references, "unet_evals": learned.get("unet_evals", {}),
                  "seconds": 0.0,
                  "concept_file": {"uri": uri, "sha256": keys.sha256_bytes(data)}}
    return ConceptFile(uri=uri, sha256=keys.sha256_bytes(data), key=key,
                       model_identity=learned_on,
                       stored=Stored(ConceptResult(vectors, cfg, stats), provenance))


def read_concept_files(uris: list[str], model_identity: str, text_width: int | None = None, *,
                       threads: int = 8) -> dict[str, ConceptFile | Exception]:
    """Each distinct concept file checked (``threads`` reads at once), or the error that makes
    it unusable; one file's error never stops the others."""
    distinct = list(dict.fromkeys(uris))

    def one(uri: str) -> ConceptFile | Exception:
        try:
            return read_concept_file(uri, model_identity, text_width)
        except (UserError, OSError) as exc:
            return exc
    return dict(zip(distinct, bounded_map(one, distinct, threads, "vct-concepts")))


def seed_cache(cache_uri: str, files: list[ConceptFile]) -> None:
    """Store each file's concept in the stage cache under its key, unless an entry is there:
    from then on fusion reads it as it reads a learned concept (no other read path)."""
    cache = StageCache(cache_uri)
    for file in {f.key: f for f in files}.values():
        if not cache.contains("concept", file.key):
            store(cache, "concept", file.key, file.stored)


def write_concepts(run_uri: str, model_identity: str, used: dict[str, str],
                   cache_uri: str) -> dict[str, str]:
    """Write ``concepts/<name>.safetensors`` under the run for each used concept, {key: the
    file's path relative to the run}, unless it is there already (one listing): a rerun
    writes nothing. A concept missing from the cache (pruned meanwhile) is logged, not
    fatal: its pairs' images are written."""
    present = set(storage.list_uris(storage.join(run_uri, outputs.CONCEPTS)))
    cache = StageCache(cache_uri)
    written = {}
    for key, name in used.items():
        uri = storage.join(run_uri, name)
        if uri in present:
            written[key] = name
            continue
        stored = load(cache, "concept", key)
        if stored is None:
            log.warning("concept %s is not in the cache: %s not written", key[:12], name)
            continue
        storage.write_bytes(uri, concept_file_bytes(stored, key, model_identity),
                            "application/octet-stream")
        written[key] = name
    return written
