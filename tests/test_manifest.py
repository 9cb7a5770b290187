"""vct.manifest: tolerant CSV parsing, strict validation, line numbers, ids, path resolution."""

from __future__ import annotations

from pathlib import Path

import pytest

from vct import storage
from vct.manifest import (
    ALLOWED_COLUMNS,
    OVERRIDE_COLUMNS,
    Manifest,
    ManifestError,
    PairRow,
    derive_pair_id,
    parse_manifest,
    read_manifest_bytes,
)

URI = "/data/runs/manifest.csv"


def _load(uri: str) -> Manifest:
    """A manifest as the engine reads it: its bytes (a missing file refused), then parsed."""
    return parse_manifest(read_manifest_bytes(uri), uri)


def _parse(text: str, uri: str = URI):
    return parse_manifest(text.encode("utf-8"), uri)


def test_spreadsheet_export_parses() -> None:
    data = ("\ufeffSource , REFERENCE,pair_id,seed\r\n"
            '"imgs/a, b.png", refs/r.png ,one, 7 \r\n'
            'imgs/c.png,"refs/r2.png",two,\r\n'
            "\r\n\r\n,,,\r\n").encode("utf-8")
    m = parse_manifest(data, URI)
    assert m.errors == []
    assert [r.pair_id for r in m.rows] == ["one", "two"]
    first = m.rows[0]
    assert first.source == "/data/runs/imgs/a, b.png"
    assert first.reference == "/data/runs/refs/r.png"
    assert first.seed == 7 and first.line == 2 and first.output_name == "one"
    assert m.rows[1].seed is None and m.rows[1].concept_word is None
    assert m.columns == ["source", "reference", "pair_id", "seed"]


def test_every_bad_row_reported_with_its_line() -> None:
    text = "\n".join([
        "source,reference,pair_id,seed,cross_attention_injection_ratio",  # 1
        "a.png,r.png,ok1,1,",                                              # 2
        "a.png,,empty_ref,,",                                              # 3
        "",                                                                # 4 blank
        '"multi',                                                          # 5 quoted cell
        'line.png",r.png,two_lines,,',                                     # 6  spans 5-6
        "a.png,r.png,bad_seed,-3,",                                        # 7
        "",                                                                # 8 blank
        "a.png,r.png,bad_override,,2",                                     # 9
        "a.png,r.png,ok1,,",                                               # 10 duplicate
        "a.png,r.png,../evil,,",                                           # 11 unsafe id
        "a.png,r.png,x,abc,0.5",                                           # 12
        ",r.png,,,",                                                       # 13 empty source
        "a.png,r.png,ok2,,0.5",                                            # 14
        "",
    ])
    m = _parse(text)
    assert [(r.line, r.pair_id) for r in m.rows] == [(2, "ok1"), (14, "ok2")]
    lines = {e.line: e for e in m.errors}
    assert sorted(lines) == [3, 5, 7, 9, 10, 11, 12, 13]
    assert "line break" in lines[5].reason
    assert str(lines[3]) == "line 3: reference is empty"
    assert "seed" in lines[7].reason
    assert "cross_attention_injection_ratio" in lines[9].reason
    assert "duplicate pair_id 'ok1'" in lines[10].reason and "line 2" in lines[10].reason
    assert "not a safe file name" in lines[11].reason
    assert "seed" in lines[12].reason
    assert lines[13].reason == "source is empty"
    assert lines[10].pair_id == "ok1"


def test_raise_if_errors_lists_all() -> None:
    m = _parse("source,reference\na.png,\n,b.png\nc.png,d.png\n")
    assert len(m.rows) == 1
    with pytest.raises(ManifestError) as info:
        m.raise_if_errors()
    assert "line 2: reference is empty" in str(info.value)
    assert "line 3: source is empty" in str(info.value)
    assert len(info.value.errors) == 2
    _parse("source,reference\nc.png,d.png\n").raise_if_errors()  # no errors: no raise


def test_unknown_column_is_named_with_allowed_list() -> None:
    with pytest.raises(ManifestError) as info:
        _parse("source,reference,cross_atention_injection_ratio\na,b,0.1\n")
    message = str(info.value)
    assert "'cross_atention_injection_ratio'" in message
    assert "did you mean 'cross_attention_injection_ratio'" in message
    for name in ALLOWED_COLUMNS:
        assert name in message


@pytest.mark.parametrize("text, needle", [
    ("", "empty"),
    ("\n\n  \n", "empty"),
    ("source,reference\n\n\n", "no data rows"),
    ("source,pair_id\na,b\n", "missing required column(s) reference"),
    ("source;reference\na;b\n", "separator"),
    ("source,Source,reference\na,b,c\n", "duplicate column"),
    ('source,reference\n"a,b\n', "cannot parse"),
])
def test_manifest_level_errors(text: str, needle: str) -> None:
    with pytest.raises(ManifestError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        _parse(text)


def test_not_utf8_is_a_manifest_error() -> None:
    with pytest.raises(ManifestError, match="UTF-8"):
        parse_manifest("source,reference\ncafé.png,b\n".encode("latin-1"), URI)


def test_overrides_typed_and_validated() -> None:
    text = ("source,reference,Cross-Attention-Injection-Ratio,reweight_positions,"
            "self_replace_max_tokens,attention_impl\n"
            "a,b,0.3,concept_tokens,256,\n"
            "a,b,2,sideways,12.5,\n")
    m = _parse(text)
    assert m.rows[0].fusion_overrides == {"cross_attention_injection_ratio": 0.3,
                                          "reweight_positions": "concept_tokens",
                                          "self_replace_max_tokens": 256}
    (error,) = m.errors
    assert error.line == 3
    for name in ("cross_attention_injection_ratio", "reweight_positions",
                 "self_replace_max_tokens"):
        assert name in error.reason
    assert set(OVERRIDE_COLUMNS) <= set(ALLOWED_COLUMNS)


def test_derived_pair_id_is_stable_and_identical_rows_are_distinct() -> None:
    text = "source,reference,concept_word,seed\na.png,b.png,cat,3\na.png,b.png,cat,3\n" \
           "a.png,b.png,cat,3\na.png,b.png,dog,3\n"
    first, again = _parse(text), _parse(text)
    ids = [r.pair_id for r in first.rows]
    assert ids == [r.pair_id for r in again.rows]
    base = derive_pair_id("a.png", "b.png", {}, 3, "cat")
    assert ids[:3] == [base, f"{base}-2", f"{base}-3"]
    assert ids[3] != base and ids[3].startswith("p-") and len(ids[3]) == 14
    assert [r.output_name for r in first.rows] == ids
    assert first.rows[0].concept_word == "cat"
    # The id depends on the row's content, not its position.
    moved = _parse("source,reference,concept_word,seed\nx.png,y.png,,\na.png,b.png,cat,3\n")
    assert moved.rows[1].pair_id == base


def test_derived_id_avoids_explicit_ids_and_output_names_unique() -> None:
    base = derive_pair_id("a.png", "b.png", {}, None, None)
    text = f"source,reference,pair_id,output_name\na.png,b.png,,\nc,d,{base},\ne,f,z,OUT\ng,h,w,out\n"
    m = _parse(text)
    assert [r.pair_id for r in m.rows] == [f"{base}-2", base, "z"]
    (error,) = m.errors
    assert error.line == 5 and "duplicate output_name 'out'" in error.reason


def test_relative_paths_resolve_against_local_manifest(tmp_path: Path) -> None:
    manifest = tmp_path / "jobs" / "m.csv"
    storage.write_bytes(str(manifest), b"source,reference\nimg/a.png,../refs/r.png\n"
                                       b"/abs/a.png,s3://bkt/r.png\n")
    m = _load(str(manifest))
    assert m.rows[0].source == str(tmp_path / "jobs" / "img" / "a.png")
    assert m.rows[0].reference == str(tmp_path / "refs" / "r.png")
    assert (m.rows[1].source, m.rows[1].reference) == ("/abs/a.png", "s3://bkt/r.png")
    with pytest.raises(ManifestError, match="not found"):
        _load(str(tmp_path / "absent.csv"))


def test_relative_paths_resolve_against_s3_manifest(s3_bucket: str) -> None:
    uri = storage.join(s3_bucket, "jobs", "m.csv")
    storage.write_bytes(uri, b"source,reference\nimg/a.png,../refs/r.png\n")
    (row,) = _load(uri).rows
    assert row.source == f"{s3_bucket}/jobs/img/a.png"
    assert row.reference == f"{s3_bucket}/refs/r.png"


def test_extra_cells_without_header() -> None:
    m = _parse("source,reference,\na,b,\nc,d,,\ne,f,oops\n")
    assert [r.line for r in m.rows] == [2, 3]
    (error,) = m.errors
    assert error.line == 4 and "no header" in error.reason


def test_pair_row_to_dict_and_seed_forms() -> None:
    m = _parse("source,reference,seed\na,b,7.0\nc,d,+2\n")
    row = m.rows[0]
    assert isinstance(row, PairRow) and row.seed == 7 and m.rows[1].seed == 2
    d = row.to_dict()
    assert d["seed"] == 7 and d["source"] == "/data/runs/a" and d["fusion_overrides"] == {}
    with pytest.raises(AttributeError):
        row.seed = 3  # type: ignore[misc]


def test_per_row_concept_settings_typed_validated_and_in_the_id() -> None:
    """The concept settings the original tunes per concept: training steps, vector count,
    learning rate (the initializer word is concept_word), checked like the fusion overrides."""
    text = ("source,reference,Max-Train-Steps,num_vectors,learning_rate\n"
            "a,b,100,1,1e-3\n"
            "c,b,0,99,fast\n"
            "a,b,,,\n")
    m = _parse(text)
    assert m.rows[0].concept_overrides == {"max_train_steps": 100, "num_vectors": 1,
                                           "learning_rate": 1e-3}
    assert m.rows[0].fusion_overrides == {}
    (error,) = m.errors
    assert error.line == 3
    for name in ("max_train_steps", "num_vectors", "learning_rate"):
        assert name in error.reason
    assert m.rows[1].concept_overrides == {}
    # another concept, another derived id; a row without them keeps the id it always had
    assert m.rows[0].pair_id != m.rows[1].pair_id
    assert m.rows[1].pair_id == derive_pair_id("a", "b", {}, None, None)
