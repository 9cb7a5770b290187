"""Planning a run: from manifest rows to deduplicated stage jobs and per-pair outputs.

Pure bookkeeping, no model: every row's effective configs, the keys of the concept and content
it needs (by input bytes, so the same image under two names is one job), where its outputs go
and the key that decides whether an existing output can be kept. The engine executes a plan;
tests can inspect one without running anything.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from vct import storage
from vct.batch import keys
from vct.batch.jobs import Job
from vct.batch.library import ConceptFile
from vct.batch.outputs import concept_file, is_reserved, output_names
from vct.batch.settings import RunSettings
from vct.config import ConceptConfig, ConfigError, ContentConfig, FusionConfig, to_dict
from vct.config import from_dict as config_from_dict
from vct.config import with_overrides as override
from vct.errors import UserError
from vct.images import ImageError, ImageTooLarge, probe_image
from vct.manifest import Manifest, PairRow, RowError, reference_parts
from vct.storage.fanout import bounded_map


@dataclass(frozen=True)
class PairPlan:
    """One row, planned: its effective configs, its keys and its output locations."""

    row: PairRow
    concept: ConceptConfig
    content: ContentConfig
    fusion: FusionConfig
    source_sha256: str
    reference_sha256: str
    concept_key: str
    content_key: str
    output_key: str
    png_name: str
    sidecar_name: str
    png_uri: str
    sidecar_uri: str
    concept_file: str
    """Where the run keeps its concept, relative to the run (``outputs.concept_file``)."""
    reference_images: tuple[tuple[str, str], ...] = ()
    """(URI, sha256) of every image the concept learns from, by hash: one for a single image,
    each distinct image of a list, folder or prefix, or those a concept file records."""

    def to_dict(self) -> dict[str, Any]:
        """JSON, so a shard on another machine gets its pairs from the stored plan."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out.update(row=self.row.to_dict(), concept=to_dict(self.concept),
                   content=to_dict(self.content), fusion=to_dict(self.fusion),
                   reference_images=[list(ref) for ref in self.reference_images])
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PairPlan:
        return cls(**{**d, "row": PairRow(**d["row"]),
                      "concept": config_from_dict(ConceptConfig, d["concept"]),
                      "content": config_from_dict(ContentConfig, d["content"]),
                      "fusion": config_from_dict(FusionConfig, d["fusion"]),
                      "reference_images": tuple(tuple(r) for r in d["reference_images"])})


DEFAULT_PLAN_THREADS = 8
"""Storage reads at once when nothing says otherwise (``RunSettings.plan_threads``)."""


@dataclass
class Plan:
    run_id: str
    run_uri: str
    manifest_uri: str
    model_identity: str
    pairs: list[PairPlan]
    errors: list[RowError]
    concept_jobs: list[Job] = field(default_factory=list)
    content_jobs: list[Job] = field(default_factory=list)
    plan_threads: int = DEFAULT_PLAN_THREADS
    """Storage reads at once when the run checks what it already wrote (``plan_threads``)."""
    given_concepts: list[str] = field(default_factory=list)
    """Concept keys that come from concept files named as references: no job computes them;
    planning put them in the stage cache (:func:`vct.batch.library.seed_cache`)."""

    def jobs(self, kind: str) -> list[Job]:
        return {"concept": self.concept_jobs, "content": self.content_jobs}[kind]


def default_run_id(manifest_uri: str, manifest_bytes: bytes, settings_blob: dict) -> str:
    """Stable per (manifest bytes, settings): a rerun lands in the same folder and skips what
    it already wrote; an edited manifest or other settings get a new folder."""
    stem = manifest_uri.rstrip("/").rsplit("/", 1)[-1].rsplit(".", 1)[0] or "run"
    safe = "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in stem)[:48]
    digest = hashlib.sha256(manifest_bytes + json.dumps(settings_blob, sort_keys=True)
                            .encode()).hexdigest()[:10]
    return f"{safe}-{digest}"


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")
"""The files a reference folder or prefix contributes (anything else in it is ignored)."""


class ReferenceSetError(UserError, ValueError):
    """A reference list, folder or prefix that gives no usable set of images."""


def _is_folder(uri: str) -> bool:
    """A part naming a folder: ends in '/' (an S3 prefix, a folder), or is a local folder."""
    if uri.endswith("/"):
        return True
    local = uri[len(storage.FILE_SCHEME):] if uri.startswith(storage.FILE_SCHEME) else uri
    return not storage.is_s3(uri) and Path(local).is_dir()


def reference_images(reference: str, max_images: int,
                     listing: Callable[[str], list[str]] | None = None) -> list[str]:
    """The images of one ``reference``: each ';' part, a folder or prefix replaced by the
    images under it (by suffix, sorted), each image once. Refused when a folder holds none or
    there are more than ``max_images`` (``RunSettings.max_reference_images``)."""
    images: list[str] = []
    for part in reference_parts(reference):
        if _is_folder(part):
            found = [u for u in (listing or storage.list_uris)(part)
                     if u.lower().endswith(IMAGE_SUFFIXES)]
            if not found:
                raise ReferenceSetError(f"{part}: no images ({', '.join(IMAGE_SUFFIXES)}) "
                                        "under it")
            images += found
        else:
            images.append(part)
    images = list(dict.fromkeys(images))
    if len(images) > max_images:
        raise ReferenceSetError(f"{reference}: {len(images)} images, more than "
                                f"max_reference_images ({max_images})")
    return images


def expand_references(references: list[str], max_images: int, *,
                      threads: int = DEFAULT_PLAN_THREADS) -> dict[str, list[str] | Exception]:
    """:func:`reference_images` of each distinct reference (folders listed ``threads`` at
    once), or the error that makes it unusable; one reference's error never stops the
    others."""
    distinct = list(dict.fromkeys(references))

    def one(reference: str) -> list[str] | Exception:
        try:
            return reference_images(reference, max_images)
        except (UserError, OSError) as exc:
            return exc
    return dict(zip(distinct, bounded_map(one, distinct, threads, "vct-refs")))


Digest = Callable[[str], tuple[str, bytes, int]]
"""uri -> (sha256 hex, head bytes, size): :func:`vct.storage.digest_input`'s shape."""


def check_input(uri: str, digest: Digest | None = None,
                read: Callable[[str], bytes] | None = None,
                max_pixels: int | None = None) -> str:
    """The sha256 of one input that passed the header probe (format, size, the pixel cap), or
    the error that makes it unusable. The bytes are hashed while streaming; only the head is
    kept for the probe. If the head was cut short and is not enough for the probe (a TIFF whose
    directory follows its pixels, a JPEG with huge metadata segments), the whole input is read
    (capped like every input read) and probed and hashed instead. A header over the pixel cap
    is refused from the head alone: no bomb is ever read whole or decoded. ``digest`` and
    ``read`` default to :func:`vct.storage.digest_input` and :func:`vct.storage.read_input`;
    ``max_pixels`` to :func:`vct.images.max_pixels` (``VCT_MAX_PIXELS``)."""
    sha, head, size = (digest or storage.digest_input)(uri)
    try:
        probe_image(head, uri, max_pixels=max_pixels)
        return sha
    except ImageTooLarge:
        raise
    except ImageError:
        if len(head) >= size:  # the head was the whole input: nothing more to read
            raise
    data = (read or storage.read_input)(uri)
    probe_image(data, uri, max_pixels=max_pixels)
    return hashlib.sha256(data).hexdigest()


def hash_inputs(uris: list[str], digest: Digest | None = None, *,
                threads: int = DEFAULT_PLAN_THREADS,
                read: Callable[[str], bytes] | None = None,
                max_pixels: int | None = None) -> dict[str, str | Exception]:
    """sha256 of each distinct input (in first-seen order), or the error that makes it unusable
    (missing, too large, not an image, over the pixel cap, unreadable for any reason).

    Inputs are read by at most ``threads`` threads at once (``RunSettings.plan_threads``): on
    S3 planning is latency-bound, so a manifest of thousands of inputs takes seconds, not
    minutes. Each input is checked by :func:`check_input` (streamed hash plus header probe),
    so a hostile file fails its rows at plan time, not mid-run, without being decoded; pixels
    are decoded once, by the job that uses them. One input's error never stops the others."""
    distinct = list(dict.fromkeys(uris))

    def one(uri: str) -> str | Exception:
        try:
            return check_input(uri, digest, read, max_pixels)
        except (UserError, OSError) as exc:
            return exc
    return dict(zip(distinct, bounded_map(one, distinct, threads, "vct-plan")))


def _row_configs(row: PairRow, settings: RunSettings, concept: ConceptConfig | None = None
                 ) -> tuple[ConceptConfig, FusionConfig]:
    """The row's concept and fusion settings: its cells over the run's (or over ``concept``,
    a concept file's own settings)."""
    concept_overrides: dict[str, Any] = dict(row.concept_overrides)
    if row.concept_word:
        concept_overrides["initializer_word"] = row.concept_word
    if row.seed is not None:
        concept_overrides["seed"] = row.seed
    return (override(concept or settings.concept, concept_overrides),
            override(settings.fusion, row.fusion_overrides))


def _file_configs(row: PairRow, settings: RunSettings, file: ConceptFile
                  ) -> tuple[ConceptConfig, FusionConfig]:
    """A concept file's settings are its own: a row's concept cells (concept_word, seed, the
    concept columns) may only repeat them."""
    own = file.stored.result.config
    asked, fusion = _row_configs(row, settings, own)
    differ = [f"{name} {getattr(asked, name)!r}" for name in type(own).model_fields
              if getattr(asked, name) != getattr(own, name)]
    if differ:
        raise ConfigError("reference", f"{file.uri} is a concept file learned with its own "
                          f"settings; the row asks for {', '.join(differ)} (leave those cells "
                          "empty)")
    return own, fusion


def _by_hash(images: list[str], hashes: dict[str, str | Exception]
             ) -> tuple[tuple[str, str], ...]:
    """(URI, sha256) of each distinct image, by hash: the order a concept learns them in."""
    first: dict[str, str] = {}
    for uri in images:
        first.setdefault(str(hashes[uri]), uri)
    return tuple((first[sha], sha) for sha in sorted(first))


def plan_run(manifest: Manifest, hashes: dict[str, str | Exception], model_identity: str,
             settings: RunSettings, run_uri: str, run_id: str,
             concept_files: dict[str, ConceptFile] | None = None,
             references: dict[str, list[str] | Exception] | None = None) -> Plan:
    """Effective configs and keys for every good row; inputs that failed become row errors.
    A reference in ``concept_files`` (checked concept files, :mod:`vct.batch.library`) gives
    its row that file's concept and key and makes no concept job. ``references``: each
    reference's images (:func:`expand_references`; a reference not in it is one image)."""
    files = concept_files or {}
    refs = references or {}
    given: dict[str, None] = {}
    pairs: list[PairPlan] = []
    errors = list(manifest.errors)
    concept_jobs: dict[str, Job] = {}
    content_jobs: dict[str, Job] = {}
    content = settings.content
    for row in manifest.rows:
        file = files.get(row.reference)
        images = [row.reference] if file else refs.get(row.reference, [row.reference])
        if isinstance(images, Exception):
            errors.append(RowError(row.line, row.pair_id, f"reference {images}"))
            continue
        bad = [(name, hashes[uri]) for name, uri in (("source", row.source),
                                                     *(("reference", u) for u in images))
               if isinstance(hashes[uri], Exception)]
        if bad:
            reason = "; ".join(f"{name} {exc}" for name, exc in bad)
            errors.append(RowError(row.line, row.pair_id, reason))
            continue
        if is_reserved(row.output_name):
            errors.append(RowError(row.line, row.pair_id, f"output_name {row.output_name!r} "
                                   "is a name the run itself writes; choose another"))
            continue
        try:
            concept, fusion = (_file_configs(row, settings, file) if file
                               else _row_configs(row, settings))
        except ConfigError as exc:
            errors.append(RowError(row.line, row.pair_id, str(exc)))
            continue
        src_sha = str(hashes[row.source])
        if file:
            ref_sha, ref_images = file.sha256, file.references
        else:
            ref_images = _by_hash(images, hashes)
            ref_sha = keys.references_digest([sha for _, sha in ref_images])
        k_concept = file.key if file else keys.concept_key(ref_sha, model_identity, concept)
        k_content = keys.content_key(src_sha, model_identity, content,
                                     keep_trajectories=settings.keep_trajectories)
        if file:
            given[k_concept] = None
        else:
            concept_jobs.setdefault(k_concept, Job(
                kind="concept", key=k_concept, input_uri=ref_images[0][0],
                config=to_dict(concept),
                cost=float(concept.max_train_steps * concept.gradient_accumulation_steps),
                inputs=[u for u, _ in ref_images] if len(ref_images) > 1 else []))
        content_jobs.setdefault(k_content, Job(
            kind="content", key=k_content, input_uri=row.source, config=to_dict(content),
            cost=float(content.num_inference_steps * (content.num_inner_steps + 2)),
            store={"keep_trajectories": True} if settings.keep_trajectories else {}))
        names = output_names(row.output_name)
        pairs.append(PairPlan(
            row=row, concept=concept, content=content, fusion=fusion,
            source_sha256=src_sha, reference_sha256=ref_sha, concept_key=k_concept,
            content_key=k_content, output_key=keys.output_key(k_content, k_concept, fusion),
            png_name=names.png, sidecar_name=names.sidecar,
            png_uri=storage.join(run_uri, names.png),
            sidecar_uri=storage.join(run_uri, names.sidecar),
            concept_file=concept_file(reference_parts(row.reference)[0], k_concept),
            reference_images=ref_images))
    errors.sort(key=lambda e: e.line)
    return Plan(run_id=run_id, run_uri=run_uri, manifest_uri=manifest.manifest_uri,
                model_identity=model_identity, pairs=pairs, errors=errors,
                concept_jobs=list(concept_jobs.values()),
                content_jobs=list(content_jobs.values()), plan_threads=settings.plan_threads,
                given_concepts=[k for k in given if k not in concept_jobs])


def fusion_groups(pairs: list[PairPlan], max_edits: int = 4) -> list[list[PairPlan]]:
    """Pairs that share a source and fusion settings share one B* branch (one UNet batch of
    2 (1 + K) passes), and identical pairs share one B branch; K distinct concepts per group
    at most, so a batch stays within memory."""
    groups: dict[tuple, list[PairPlan]] = {}
    for pair in pairs:
        key = (pair.content_key, json.dumps(to_dict(pair.fusion), sort_keys=True))
        groups.setdefault(key, []).append(pair)
    out = []
    for members in groups.values():
        concepts = list(dict.fromkeys(p.concept_key for p in members))
        for i in range(0, len(concepts), max_edits):
            chunk = set(concepts[i:i + max_edits])
            out.append([p for p in members if p.concept_key in chunk])
    return out


def branch_keys(group: list[PairPlan]) -> list[str]:
    """The distinct concepts of a fusion group, in branch order."""
    return list(dict.fromkeys(p.concept_key for p in group))


def fusion_job(group: list[PairPlan]) -> Job:
    """The job that fuses one group: its content, its concepts in branch order, its settings."""
    first = group[0]
    branches = branch_keys(group)
    return Job(kind="fusion", key=keys.fusion_key(first.content_key, branches, first.fusion),
               input_uri=first.row.source,
               config={"content_key": first.content_key, "concept_keys": branches,
                       "fusion": to_dict(first.fusion),
                       "num_inference_steps": first.content.num_inference_steps},
               cost=float(2 * (1 + len(branches)) * first.content.num_inference_steps))
