"""The CSV manifest of (source, reference) pairs that a batch run restyles.

Manifests are written by people, often in spreadsheets, so parsing is tolerant of what
spreadsheets emit (UTF-8 BOM, CRLF, quoted cells with commas or newlines, blank lines, padded
cells) and strict about meaning: an unknown column is an error (a typo'd override column must not
be silently ignored), and every bad row is reported at once with its physical line number, so a
1000-row manifest is fixed in one round trip. Bad rows are set aside in ``Manifest.errors``; good
rows run (``--strict`` turns any error into a failure via :meth:`Manifest.raise_if_errors`).

The schema is documented for users in ``manifests/README.md``.
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import hashlib
import io
import json
import re
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from vct import storage
from vct.config import ConceptConfig, ConfigError, FusionConfig, with_overrides
from vct.errors import UserError

REQUIRED_COLUMNS = ("source", "reference")
OPTIONAL_COLUMNS = ("pair_id", "output_name", "concept_word", "seed")
OVERRIDE_COLUMNS = tuple(FusionConfig.model_fields)
# What the original tunes per concept (its training steps, its vector count, its learning
# rate); the initializer word is `concept_word`. They go into the concept's key.
CONCEPT_OVERRIDE_COLUMNS = ("max_train_steps", "num_vectors", "learning_rate")
ALLOWED_COLUMNS = (REQUIRED_COLUMNS + OPTIONAL_COLUMNS + OVERRIDE_COLUMNS
                   + CONCEPT_OVERRIDE_COLUMNS)

SAFE_NAME_RE = re.compile(r"^(?!\.)[A-Za-z0-9._-]{1,128}$")
MAX_SEED = 2**63 - 1
_UNNAMED = "__unnamed_{}"


class ManifestError(UserError):
    """The manifest as a whole cannot be used (or, from raise_if_errors, has bad rows)."""

    def __init__(self, message: str, errors: list[RowError] | None = None):
        self.errors = list(errors or [])
        super().__init__(message)


@dataclass(frozen=True)
class RowError:
    """One bad row: its physical line in the file (header = 1), its id if known, and why."""

    line: int
    pair_id: str | None
    reason: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.reason}"


@dataclass(frozen=True)
class PairRow:
    """One validated pair. ``source``/``reference`` are resolved URIs; ``fusion_overrides`` and
    ``concept_overrides`` hold only the override cells the row filled in, already typed and
    range-checked."""

    line: int
    pair_id: str
    source: str
    reference: str
    output_name: str
    concept_word: str | None = None
    seed: int | None = None
    fusion_overrides: dict[str, Any] = field(default_factory=dict)
    concept_overrides: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready view (for task parameters, logs and sidecars)."""
        return dataclasses.asdict(self)


@dataclass
class Manifest:
    """Parsed manifest: the good rows in file order and every row error, sorted by line."""

    manifest_uri: str
    rows: list[PairRow]
    errors: list[RowError]
    columns: list[str] = field(default_factory=list)

    def raise_if_errors(self) -> None:
        """For ``--strict``: fail listing every bad row, not only the first."""
        raise_if_bad_rows(self.manifest_uri, self.errors)


def raise_if_bad_rows(manifest_uri: str, errors: list[RowError]) -> None:
    """A ManifestError listing every bad row (also those found after parsing: missing inputs)."""
    if errors:
        listing = "\n".join(f"  {e}" for e in errors)
        raise ManifestError(f"{manifest_uri}: {len(errors)} bad row(s):\n{listing}", errors)


# ---------------------------------------------------------------- entry points
def read_manifest_bytes(uri: str) -> bytes:
    """The manifest's bytes (they also name the run); a missing file is a ManifestError."""
    try:
        return storage.read_input(uri)
    except storage.StorageNotFound as exc:
        raise ManifestError(f"manifest not found: {uri}") from exc


def parse_manifest(data: bytes, manifest_uri: str) -> Manifest:
    """Parse and validate manifest bytes; relative paths resolve against ``manifest_uri``."""
    text = _decode(data, manifest_uri)
    records = _csv_records(text, manifest_uri)
    header_index = next((i for i, (_, cells) in enumerate(records) if not _blank(cells)), None)
    if header_index is None:
        raise ManifestError(f"{manifest_uri}: the manifest is empty")
    header_line, header = records[header_index]
    columns = _normalize_header(header, header_line, manifest_uri)
    data_records = records[header_index + 1:]
    columns = _pad_columns(columns, data_records)
    raw_rows, errors = _check_unnamed(_cells_by_column(data_records, columns))
    if not raw_rows and not errors:
        raise ManifestError(f"{manifest_uri}: no data rows below the header (line {header_line})")
    rows, row_errors = _build_rows(raw_rows, manifest_uri)
    errors = sorted(errors + row_errors, key=lambda e: e.line)
    used = [c for c in columns if not c.startswith("__unnamed_")]
    return Manifest(manifest_uri=manifest_uri, rows=rows, errors=errors, columns=used)


# ---------------------------------------------------------------- file level
def _decode(data: bytes, uri: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ManifestError(f"{uri}: not UTF-8 text ({exc}); save it as 'CSV UTF-8'") from None


def _blank(cells: list[str]) -> bool:
    return all(not str(c).strip() for c in cells)


def _csv_records(text: str, uri: str) -> list[tuple[int, list[str]]]:
    """Each CSV record with the physical line it starts on (header = 1): the one parse of the
    file. A quoted cell may span lines, so record index + 2 is not the line number; the csv
    module tracks it exactly."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    records, previous_end = [], 0
    try:
        for cells in reader:
            records.append((previous_end + 1, cells))
            previous_end = reader.line_num
    except csv.Error as exc:
        raise ManifestError(f"{uri}: cannot parse CSV near line {reader.line_num}: {exc}") from None
    return records


def _normalize_column(name: str) -> str:
    """Case-insensitive, stripped; '-' and spaces read as '_' so CLI-style names also work."""
    return re.sub(r"[\s-]+", "_", name.strip().lower())


def _normalize_header(header: list[str], line: int, uri: str) -> list[str]:
    if len(header) == 1 and any(sep in header[0] for sep in (";", "\t")):
        raise ManifestError(f"{uri}: header line {line} is one column {header[0]!r}: the file "
                            "seems to use ';' or tabs as separator; save it with commas")
    columns: list[str] = []
    for position, raw in enumerate(header, start=1):
        name = _normalize_column(raw)
        columns.append(name or _UNNAMED.format(position))
    duplicates = sorted({c for c in columns if columns.count(c) > 1})
    if duplicates:
        raise ManifestError(f"{uri}: duplicate column(s) on line {line}: {', '.join(duplicates)}")
    unknown = [c for c in columns if c not in ALLOWED_COLUMNS and not c.startswith("__unnamed_")]
    if unknown:
        raise ManifestError(f"{uri}: {_unknown_message(unknown, line)}")
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise ManifestError(f"{uri}: missing required column(s) {', '.join(missing)} on header "
                            f"line {line} (found: {', '.join(header)})")
    return columns


def _unknown_message(unknown: list[str], line: int) -> str:
    parts = []
    for name in unknown:
        close = difflib.get_close_matches(name, ALLOWED_COLUMNS, n=1)
        parts.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return (f"unknown column(s) {', '.join(parts)} on header line {line}; allowed columns: "
            f"{', '.join(ALLOWED_COLUMNS)}")


def _pad_columns(columns: list[str], records: list[tuple[int, list[str]]]) -> list[str]:
    width = max([len(columns)] + [len(cells) for _, cells in records])
    return columns + [_UNNAMED.format(i) for i in range(len(columns) + 1, width + 1)]


def _cells_by_column(records: list[tuple[int, list[str]]],
                     columns: list[str]) -> list[tuple[int, dict[str, str]]]:
    """Each record's cells under their column names (stripped; a short record's missing cells
    empty), with its physical line; blank rows dropped."""
    rows = []
    for line, cells in records:
        named = {name: (cells[i] if i < len(cells) else "").strip()
                 for i, name in enumerate(columns)}
        if any(named.values()):
            rows.append((line, named))
    return rows


def _check_unnamed(rows: list[tuple[int, dict[str, str]]]) -> tuple[
        list[tuple[int, dict[str, str]]], list[RowError]]:
    """Cells under no header: empty ones are fine (spreadsheets add them), data is a row error,
    usually an unquoted comma inside a path."""
    good, errors = [], []
    for line, cells in rows:
        stray = [name.rsplit("_", 1)[1] for name, value in cells.items()
                 if name.startswith("__unnamed_") and value]
        if stray:
            errors.append(RowError(line, cells.get("pair_id") or None,
                                   f"data in column(s) {', '.join(stray)} which have no header "
                                   "(quote cells that contain commas)"))
        else:
            good.append((line, cells))
    return good, errors


# ---------------------------------------------------------------- row level
@dataclass
class _Draft:
    """A row being validated; collects every reason it is bad instead of stopping at one."""

    line: int
    source_cell: str
    reference_cell: str
    pair_id_cell: str
    output_name_cell: str
    concept_word: str | None
    seed: int | None = None
    source: str = ""
    reference: str = ""
    overrides: dict[str, Any] = field(default_factory=dict)
    concept_overrides: dict[str, Any] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)
    pair_id: str | None = None
    output_name: str | None = None


def _build_rows(raw_rows: list[tuple[int, dict[str, str]]],
                uri: str) -> tuple[list[PairRow], list[RowError]]:
    drafts = [_draft(line, cells, uri) for line, cells in raw_rows]
    _assign_pair_ids(drafts)
    _assign_output_names(drafts)
    rows, errors = [], []
    for d in drafts:
        if d.reasons:
            errors.append(RowError(d.line, d.pair_id, "; ".join(d.reasons)))
            continue
        assert d.pair_id is not None and d.output_name is not None
        rows.append(PairRow(line=d.line, pair_id=d.pair_id, source=d.source,
                            reference=d.reference, output_name=d.output_name,
                            concept_word=d.concept_word, seed=d.seed,
                            fusion_overrides=dict(d.overrides),
                            concept_overrides=dict(d.concept_overrides)))
    return rows, errors


def _draft(line: int, cells: dict[str, str], uri: str) -> _Draft:
    d = _Draft(line=line, source_cell=cells.get("source", ""),
               reference_cell=cells.get("reference", ""),
               pair_id_cell=cells.get("pair_id", ""),
               output_name_cell=cells.get("output_name", ""),
               concept_word=cells.get("concept_word") or None)
    d.source = _resolve_cell(d, "source", d.source_cell, uri)
    d.reference = _resolve_references(d, d.reference_cell, uri)
    d.seed = _parse_seed(d, cells.get("seed", ""))
    d.overrides = _parse_overrides(d, cells, OVERRIDE_COLUMNS, FusionConfig())
    d.concept_overrides = _parse_overrides(d, cells, CONCEPT_OVERRIDE_COLUMNS, ConceptConfig())
    return d


def _resolve_cell(d: _Draft, name: str, cell: str, uri: str) -> str:
    if not cell:
        d.reasons.append(f"{name} is empty")
        return ""
    if re.search(r"[\x00-\x1f\x7f]", cell):
        d.reasons.append(f"{name} {cell!r} contains a line break or control character")
        return ""
    try:
        return storage.resolve(cell, uri)
    except storage.StorageError as exc:
        d.reasons.append(f"{name} {cell!r}: {exc}")
        return ""


REFERENCE_SEPARATOR = ";"
"""Between the images of one concept in a ``reference`` cell (and in ``PairRow.reference``)."""


def _resolve_references(d: _Draft, cell: str, uri: str) -> str:
    """One reference, or several separated by ';' (images, folders, prefixes): each resolved
    like a path cell; a part ending in '/' keeps it (an S3 prefix, a folder)."""
    parts = [p.strip() for p in cell.split(REFERENCE_SEPARATOR)]
    if len(parts) > 1 and not all(parts):
        d.reasons.append(f"reference {cell!r} has an empty part between ';'")
        return ""
    resolved = []
    for part in parts:
        one = _resolve_cell(d, "reference", part, uri)
        if not one:
            return ""
        resolved.append(one + "/" if part.endswith("/") and not one.endswith("/") else one)
    return REFERENCE_SEPARATOR.join(resolved)


def reference_parts(reference: str) -> list[str]:
    """The resolved parts of a row's ``reference`` (one for a single image or file)."""
    return reference.split(REFERENCE_SEPARATOR)


def _parse_seed(d: _Draft, cell: str) -> int | None:
    """Integer >= 0; '7.0' is accepted because spreadsheets like to write numbers that way."""
    if not cell:
        return None
    match = re.fullmatch(r"([+-]?\d+)(?:\.0*)?", cell)
    if not match:
        d.reasons.append(f"seed must be a whole number >= 0, got {cell!r}")
        return None
    seed = int(match.group(1))
    if not 0 <= seed <= MAX_SEED:
        d.reasons.append(f"seed must be between 0 and {MAX_SEED}, got {cell}")
        return None
    return seed


def _parse_overrides(d: _Draft, cells: dict[str, str], columns: tuple[str, ...],
                     base: BaseModel) -> dict[str, Any]:
    """Validate each filled override cell on its own (so every bad field is named), then all
    together; typed values come back from the validated config (`base`'s class)."""
    raw = {name: cells[name] for name in columns if cells.get(name)}
    bad = False
    for name, value in raw.items():
        try:
            with_overrides(base, {name: value})
        except ConfigError as exc:
            d.reasons.append(f"bad override {exc}")
            bad = True
    if bad:
        return {}
    try:
        cfg = with_overrides(base, raw)
    except ConfigError as exc:
        d.reasons.append(f"bad override {exc}")
        return {}
    return {name: getattr(cfg, name) for name in raw}


def derive_pair_id(source: str, reference: str, overrides: dict[str, Any], seed: int | None,
                   concept_word: str | None) -> str:
    """A stable id for a row without pair_id: the same cells give the same id (and output name)
    on every run, which is what makes reruns resume instead of duplicating work. It hashes the
    cells as written (not the resolved paths), so moving the manifest with its images keeps ids.
    """
    blob = "\n".join([source, reference,
                      json.dumps(overrides, sort_keys=True, separators=(",", ":")),
                      "" if seed is None else str(seed), concept_word or ""])
    return "p-" + hashlib.sha256(blob.encode("utf-8")).hexdigest()[:12]


def _assign_pair_ids(drafts: list[_Draft]) -> None:
    """Explicit ids first (a repeated one is an error on the later row), then derived ids,
    suffixed -2, -3 ... in file order when identical rows derive the same id."""
    used: dict[str, int] = {}
    for d in drafts:
        cell = d.pair_id_cell
        if not cell:
            continue
        d.pair_id = cell
        if not SAFE_NAME_RE.match(cell):
            d.reasons.append(f"pair_id {cell!r} is not a safe file name "
                             "(1-128 of A-Z a-z 0-9 . _ -, not starting with '.')")
        elif cell in used:
            d.reasons.append(f"duplicate pair_id {cell!r} (first used on line {used[cell]})")
        else:
            used[cell] = d.line
    for d in drafts:
        if d.pair_id_cell:
            continue
        base = derive_pair_id(d.source_cell, d.reference_cell,
                              {**d.overrides, **d.concept_overrides}, d.seed, d.concept_word)
        candidate, n = base, 1
        while candidate in used:
            n += 1
            candidate = f"{base}-{n}"
        d.pair_id = candidate
        used[candidate] = d.line


def _assign_output_names(drafts: list[_Draft]) -> None:
    """Default output_name = pair_id; names must be safe and unique ignoring case (two rows
    writing 'A.png' and 'a.png' collide on macOS/Windows filesystems)."""
    used: dict[str, int] = {}
    for d in drafts:
        name = d.output_name_cell or d.pair_id or ""
        d.output_name = name
        if d.output_name_cell and not SAFE_NAME_RE.match(name):
            d.reasons.append(f"output_name {name!r} is not a safe file name "
                             "(1-128 of A-Z a-z 0-9 . _ -, not starting with '.')")
            continue
        if not SAFE_NAME_RE.match(name):
            continue  # an unsafe pair_id is already reported
        folded = name.lower()
        if folded in used:
            d.reasons.append(f"duplicate output_name {name!r} (first used on line "
                             f"{used[folded]})")
        else:
            used[folded] = d.line
