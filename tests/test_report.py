"""Tests for the run report artifacts (vct.report): pure functions, no storage, no Prefect."""

from __future__ import annotations

import io
import json
import re

import pytest
from PIL import Image, ImageFont

from vct import report
from vct.report import (
    REQUIRED_COUNTS,
    PairOutcome,
    build_run_summary,
    contact_sheet,
    markdown_summary,
    report_html,
    run_json_bytes,
    table_rows,
)

HOSTILE = "<script>alert(1)</script>"


def _png(size: tuple[int, int], colour: tuple[int, int, int], fmt: str = "PNG") -> bytes:
    """A small generated image, so tests need no fixture files."""
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format=fmt)
    return buf.getvalue()


def _ok(pair_id: str, line: int, status: str = "ok") -> PairOutcome:
    return PairOutcome(
        pair_id=pair_id,
        line=line,
        status=status,
        source_uri=f"s3://bucket/in/{pair_id}-src.jpg",
        reference_uri=f"s3://bucket/in/{pair_id}-ref.png",
        output_uri=f"s3://bucket/out/run1/{pair_id}.png",
        sidecar={"timings": {"concept_s": 12.345, "generate_s": 3.0}},
        source_png=_png((64, 32), (200, 10, 10), "JPEG"),
        reference_png=_png((20, 60), (10, 200, 10)),
        output_png=_png((48, 48), (10, 10, 200)),
    )


def _failed(pair_id: str, line: int, reason: str = HOSTILE) -> PairOutcome:
    return PairOutcome(
        pair_id=pair_id,
        line=line,
        status="failed",
        source_uri=f"s3://bucket/in/{pair_id}-src.jpg",
        reference_uri=f"s3://bucket/in/{pair_id}-ref.png",
        output_uri=None,
        reason=reason,
        source_png=b"not an image at all",
    )


@pytest.fixture
def outcomes() -> list[PairOutcome]:
    return [_ok("p1", 2), _ok("p2", 3, status="skipped"), _failed("bad", 5)]


@pytest.fixture
def summary(outcomes: list[PairOutcome]) -> dict:
    return build_run_summary(
        run_id="run1",
        flow_run_id="fr-123",
        manifest_uri="s3://bucket/manifest.csv",
        output_uri="s3://bucket/out/run1/",
        counts={"pairs_ok": 1, "pairs_failed": 1, "pairs_skipped": 1, "concepts_computed": 1},
        outcomes=outcomes,
        row_errors=[{"line": 4, "pair_id": "dup", "reason": "duplicate pair_id"}],
        started_at="2024-01-01T00:00:00+00:00",
        finished_at="2024-01-01T00:01:30+00:00",
        extra={"device": "cpu"},
    )


def _open(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


# ---------------------------------------------------------------- run.json


def test_summary_has_required_counts_and_fills_missing(summary: dict) -> None:
    for key in REQUIRED_COUNTS:
        assert key in summary["counts"]
    assert summary["counts"]["pairs_ok"] == 1
    assert summary["counts"]["concepts_cached"] == 0
    assert summary["counts"]["contents_computed"] == 0


def test_summary_lists_every_failure_with_line(summary: dict) -> None:
    failures = summary["failures"]
    assert [(f["line"], f["pair_id"]) for f in failures] == [(4, "dup"), (5, "bad")]
    assert failures[0]["reason"] == "duplicate pair_id"
    assert failures[1]["reason"] == HOSTILE
    assert all(isinstance(f["line"], int) for f in failures)


def test_summary_fields_and_no_image_bytes(summary: dict) -> None:
    assert summary["run_id"] == "run1"
    assert summary["flow_run_id"] == "fr-123"
    assert summary["manifest_uri"] == "s3://bucket/manifest.csv"
    assert summary["output_uri"] == "s3://bucket/out/run1/"
    assert summary["started_at"] == "2024-01-01T00:00:00+00:00"
    assert summary["finished_at"] == "2024-01-01T00:01:30+00:00"
    assert summary["duration_s"] == 90.0
    assert summary["details"] == {"device": "cpu"}
    assert [p["pair_id"] for p in summary["pairs"]] == ["p1", "p2", "bad"]
    for entry in summary["pairs"]:
        assert not any(k.endswith("_png") for k in entry)
    # Serialises to JSON as-is (nothing bytes-like slipped in).
    decoded = json.loads(run_json_bytes(summary))
    assert decoded["counts"] == summary["counts"]


def test_summary_tolerates_unparseable_timestamps() -> None:
    s = build_run_summary("r", None, "m.csv", "out/", {}, [], [], "start", "end")
    assert s["duration_s"] is None
    assert s["failures"] == []
    assert s["details"] == {}
    assert set(REQUIRED_COUNTS) <= set(s["counts"])


# ---------------------------------------------------------------- contact sheet


def test_contact_sheet_is_png_and_grows_with_pairs(outcomes: list[PairOutcome]) -> None:
    one = contact_sheet(outcomes[:1])
    three = contact_sheet(outcomes)
    assert one.startswith(b"\x89PNG\r\n\x1a\n")
    img1, img3 = _open(one), _open(three)
    assert img1.format == "PNG"
    assert img3.height > img1.height
    assert img3.width >= 3 * 128


def test_contact_sheet_tolerates_failed_and_missing_images() -> None:
    broken = PairOutcome("x", 1, "failed", "a", "b", None, reason="boom",
                         source_png=b"garbage", reference_png=None, output_png=None)
    img = _open(contact_sheet([broken], thumb=32))
    assert img.height > 32


def test_contact_sheet_thumbnail_is_letterboxed() -> None:
    # A wide red source: the tile centre is red, its top edge is the neutral letterbox colour.
    o = _ok("wide", 1)
    o.source_png = _png((200, 50), (255, 0, 0))
    img = _open(contact_sheet([o], thumb=64)).convert("RGB")
    # Find the red tile by scanning the row's centre line.
    reds = [x for x in range(img.width) if img.getpixel((x, img.height - 6 - 32))[0] > 200
            and img.getpixel((x, img.height - 6 - 32))[1] < 60]
    assert reds, "source thumbnail not drawn"
    x = reds[len(reds) // 2]
    top = img.getpixel((x, img.height - 6 - 62))
    assert top[1] > 150, "expected letterbox background above a wide image"


def test_contact_sheet_empty() -> None:
    img = _open(contact_sheet([]))
    assert img.format == "PNG"
    assert img.width < 400 and img.height < 200


def test_contact_sheet_caps_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    many = [PairOutcome(f"p{i}", i, "ok", "s", "r", None) for i in range(5)]
    three = _open(contact_sheet(many[:3], thumb=64))  # uncapped reference
    monkeypatch.setattr(report, "MAX_SHEET_ROWS", 2)
    capped = _open(contact_sheet(many, thumb=64))
    two = _open(contact_sheet(many[:2], thumb=64))
    # Same number of rows drawn as for two pairs; only the truncation note line is added.
    assert two.height < capped.height < three.height


@pytest.mark.parametrize("bitmap_font", [False, True])
def test_contact_sheet_unicode_ids(monkeypatch: pytest.MonkeyPatch, bitmap_font: bool) -> None:
    # Without FreeType Pillow falls back to a latin-1 bitmap font; labels must still render.
    if bitmap_font:
        monkeypatch.setattr(report, "_font", lambda: ImageFont.load_default_imagefont())
    o = _ok("猫-スタイル-€-" + "x" * 60, 1)
    assert _open(contact_sheet([o], thumb=32)).format == "PNG"


def test_contact_sheet_rejects_tiny_thumb(outcomes: list[PairOutcome]) -> None:
    with pytest.raises(ValueError):
        contact_sheet(outcomes, thumb=4)


# ---------------------------------------------------------------- report.html


def test_report_html_content(summary: dict, outcomes: list[PairOutcome]) -> None:
    page = report_html(summary, outcomes)
    assert page.lstrip().lower().startswith("<!doctype html>")
    assert "run1" in page
    for o in outcomes:
        assert o.pair_id in page
    assert 'href="p1.png"' in page and 'href="p1.json"' in page
    assert 'href="p2.png"' in page  # skipped pairs still have their output
    assert 'href="bad.png"' not in page  # failed pair has no output to link
    assert page.count("data:image/png;base64,") >= 6
    assert "http://" not in page and "https://" not in page
    assert "<link" not in page and "<script" not in page
    assert "Failures" in page
    assert "duplicate pair_id" in page
    assert "line 4" in page and "line 5" in page
    assert "concept_s" in page and "12.35 s" in page
    for key in REQUIRED_COUNTS:
        assert key in page


def test_report_html_escapes_hostile_input() -> None:
    evil_id = '"><img src=x onerror=alert(1)>'
    hostile = _failed(evil_id, 7)
    ok = _ok("javascript:alert(1)", 8)
    s = build_run_summary("<b>run</b>", None, "m.csv", "out/", {}, [hostile, ok],
                          [{"line": 9, "pair_id": "z", "reason": HOSTILE}], "a", "b")
    page = report_html(s, [hostile, ok])
    assert HOSTILE not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<img src=x" not in page
    assert "<b>run</b>" not in page
    assert 'href="javascript:' not in page
    assert 'href="javascript%3Aalert%281%29.png"' in page
    # Hostile text survives only as inert text: no tag carries an event handler attribute.
    assert not re.search(r"<script|<[^>]*\son\w+=", page)


def test_report_html_empty_run() -> None:
    s = build_run_summary("r", None, "m.csv", "out/", {}, [], [], "a", "b")
    page = report_html(s, [])
    assert "no pairs" in page
    assert "No failures." in page


# ---------------------------------------------------------------- Prefect payloads


def test_markdown_summary_contains_counts_and_failures(summary: dict) -> None:
    md = markdown_summary(summary)
    for key in REQUIRED_COUNTS:
        assert key.replace("_", r"\_") in md
    assert "| 1 |" in md
    assert "line 4" in md and "line 5" in md
    assert "<script>" not in md


def test_table_rows(outcomes: list[PairOutcome]) -> None:
    rows = table_rows(outcomes)
    assert [r["pair_id"] for r in rows] == ["p1", "p2", "bad"]
    assert set(rows[0]) == {"pair_id", "line", "status", "output_uri", "reason"}
    assert rows[2]["status"] == "failed" and rows[2]["reason"] == HOSTILE
    assert rows[2]["output_uri"] == ""
