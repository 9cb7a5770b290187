"""Tests for the run report (vct.report): pure functions, no storage, no Prefect.

The report is built from generated images through a dict-backed ``read`` callback that counts
its calls, so tests can check what was read, how often, and that every link resolves.
"""

from __future__ import annotations

import fcntl
import gc
import io
import json
import math
import os
import re
import select
import shutil
import subprocess
import time
import weakref
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
from PIL import Image, ImageFont

from vct.report import (
    MAX_FAILURES_SHOWN,
    MAX_SHEET_ROWS,
    REQUIRED_COUNTS,
    RESERVED_NAMES,
    PairResult,
    RunSummary,
    contact_sheets,
    is_reserved,
    markdown_summary,
    report_files,
    run_json_bytes,
    table_rows,
    thumbnails,
)

HOSTILE = "<script>alert(1)</script>"
RUN = "s3://bucket/out/run1/"  # trailing slash on purpose: the join must not double it


def _img(size: tuple[int, int], colour: tuple[int, ...] | int = (200, 10, 10),
         fmt: str = "PNG", mode: str = "RGB", **save: object) -> bytes:
    """A small generated image, so tests need no fixture files."""
    buf = io.BytesIO()
    Image.new(mode, size, colour).save(buf, format=fmt, **save)
    return buf.getvalue()


def _gradient(seed: int, size: int = 32) -> bytes:
    """A small image that differs per seed (distinct bytes, so distinct thumbnails)."""
    img = Image.linear_gradient("L").resize((size, size)).convert("RGB")
    img.putpixel((0, 0), (seed % 256, (seed // 256) % 256, 7))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


class Store:
    """A ``read`` callback over a dict that records every URI it is asked for."""

    def __init__(self, data: dict[str, bytes] | None = None) -> None:
        self.data: dict[str, bytes] = dict(data or {})
        self.calls: Counter[str] = Counter()

    def __call__(self, uri: str) -> bytes | None:
        self.calls[uri] += 1
        return self.data.get(uri)


def _out(name: str, run: str = RUN) -> str:
    return run.rstrip("/") + "/" + name


def _pair(pair_id: str, line: int, store: Store, *, status: str = "ok",
          source: str | None = None, reference: str | None = None,
          output_name: str | None = None, reason: str | None = None,
          output: bytes | None = None, run: str = RUN) -> PairResult:
    """A pair whose images exist in ``store`` (unless it failed): outputs at ``<name>.png``."""
    source = source or f"s3://bucket/in/{pair_id}-src.png"
    reference = reference or f"s3://bucket/in/{pair_id}-ref.png"
    store.data.setdefault(source, _img((64, 32), (200, 10, 10), "JPEG"))
    store.data.setdefault(reference, _img((20, 60), (10, 200, 10)))
    name = output_name or pair_id
    has_output = status != "failed"
    if has_output:
        store.data[_out(f"{name}.png", run)] = output if output is not None else _gradient(line)
    return PairResult(
        pair_id=pair_id, line=line, status=status, source_uri=source, reference_uri=reference,
        png_name=f"{name}.png" if has_output else None,
        sidecar_name=f"{name}.json" if has_output else None,
        reason=reason, timings={"concept_s": 12.345, "fusion_s": 3.0} if has_output else None,
    )


def _bad_rows(row_errors: list[dict]) -> list[PairResult]:
    """Rows refused by the manifest check, as the engine lists them among the pairs."""
    return [PairResult(pair_id=e["pair_id"], line=e["line"], status="bad", source_uri="",
                       reference_uri="", reason=e["reason"]) for e in row_errors]


def _summary(outcomes: list[PairResult], *, status: str = "partial",
             row_errors: list[dict] | None = None, run_id: str = "run1",
             output_uri: str = RUN) -> RunSummary:
    return RunSummary(
        run_id=run_id, run_uri=output_uri, manifest_uri="s3://bucket/manifest.csv",
        status=status,
        counts={"pairs_ok": 1, "pairs_failed": 1, "pairs_skipped": 1, "concepts_computed": 1},
        pairs=[*outcomes, *_bad_rows(row_errors or [])], details={"device": "cpu"},
        flow_run_id="fr-123", started_at="2024-01-01T00:00:00+00:00",
        finished_at="2024-01-01T00:01:30+00:00")


def _build(summary: RunSummary, store: Store, **kw: int) -> dict[str, tuple[bytes, str]]:
    """All report files by name; fails if a name is yielded twice (a file written twice)."""
    files: dict[str, tuple[bytes, str]] = {}
    for name, data, ctype in report_files(summary, store, **kw):
        assert name not in files, f"{name} yielded twice"
        assert isinstance(data, bytes)
        files[name] = (data, ctype)
    return files


def _pages(files: dict[str, tuple[bytes, str]]) -> dict[str, str]:
    return {n: d.decode() for n, (d, _) in files.items() if n.endswith(".html")}


def _sheets(files: dict[str, tuple[bytes, str]]) -> dict[str, bytes]:
    return {n: d for n, (d, _) in files.items() if n.startswith("contact_sheet")}


def _thumbs(files: dict[str, tuple[bytes, str]]) -> dict[str, bytes]:
    return {n: d for n, (d, _) in files.items() if n.startswith("thumbs/")}


def _open(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


class _Links(HTMLParser):
    """Collects what a page points at and the pair ids of its pairs table."""

    def __init__(self) -> None:
        super().__init__()
        self.hrefs: list[str] = []
        self.srcs: list[str] = []
        self.ids: list[str] = []
        self._in_id = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "a" and a.get("href") is not None:
            self.hrefs.append(a["href"] or "")
        if a.get("src") is not None:
            self.srcs.append(a["src"] or "")
        self._in_id = tag == "td" and a.get("class") == "id"

    def handle_data(self, data: str) -> None:
        if self._in_id:
            self.ids.append(data)
            self._in_id = False


def _parse(page: str) -> _Links:
    parser = _Links()
    parser.feed(page)
    return parser


def _sheet_rows(data: bytes) -> int:
    """Rows drawn in a contact sheet, from its height (header + rows of equal height)."""
    store = Store()
    one = [_pair("a", 1, store)]
    two = one + [_pair("b", 2, store)]
    h1 = _open(_sheets(_build(_summary(one), store))["contact_sheet.png"]).height
    h2 = _open(_sheets(_build(_summary(two), store))["contact_sheet.png"]).height
    row_h = h2 - h1
    rows, rest = divmod(_open(data).height - (h1 - row_h), row_h)
    assert rest == 0
    return rows


@pytest.fixture
def store() -> Store:
    return Store()


@pytest.fixture
def outcomes(store: Store) -> list[PairResult]:
    return [
        _pair("p1", 2, store, output_name="house"),
        _pair("p2", 3, store, status="skipped"),
        _pair("bad", 5, store, status="failed", reason=HOSTILE),
    ]


@pytest.fixture
def summary(outcomes: list[PairResult]) -> RunSummary:
    return _summary(outcomes, row_errors=[{"line": 4, "pair_id": "dup",
                                           "reason": "duplicate pair_id"}])


# ---------------------------------------------------------------- run.json


def test_summary_has_required_counts_and_fills_missing(summary: RunSummary) -> None:
    counts = summary.to_json()["counts"]
    for key in REQUIRED_COUNTS:
        assert key in counts
    assert counts["pairs_ok"] == 1
    assert counts["concepts_cached"] == 0


def test_summary_lists_every_failure_with_line(summary: RunSummary) -> None:
    failures = summary.to_json()["failures"]
    assert [(f["line"], f["pair_id"], f["stage"]) for f in failures] == [
        (4, "dup", "manifest"), (5, "bad", "pair")]
    assert failures[0]["reason"] == "duplicate pair_id"
    assert failures[1]["reason"] == HOSTILE


def test_summary_fields_status_and_file_names(summary: RunSummary) -> None:
    typed, summary = summary, summary.to_json()
    assert summary["status"] == "partial"  # the engine's verdict, written as given
    assert summary["run_id"] == "run1" and summary["flow_run_id"] == "fr-123"
    assert summary["output_uri"] == RUN
    assert summary["duration_s"] == 90.0
    assert summary["details"] == {"device": "cpu", "stages": {}}
    pairs = {p["pair_id"]: p for p in summary["pairs"]}
    assert list(pairs) == ["p1", "p2", "bad"]
    # Files come from the engine's names (output_name), never derived from the pair id.
    assert pairs["p1"]["output_file"] == "house.png"
    assert pairs["p1"]["sidecar_file"] == "house.json"
    assert pairs["p1"]["output_uri"] == "s3://bucket/out/run1/house.png"
    assert pairs["p1"]["timings"] == {"concept_s": 12.345, "fusion_s": 3.0}
    assert pairs["bad"]["output_file"] is None and pairs["bad"]["output_uri"] is None
    assert json.loads(run_json_bytes(typed)) == summary


def test_summary_tolerates_unparseable_timestamps() -> None:
    s = RunSummary(run_id="r", run_uri="out", manifest_uri="m.csv", status="complete",
                   counts={}, pairs=[], started_at="start", finished_at="end").to_json()
    assert s["duration_s"] is None and s["failures"] == [] and s["details"] == {"stages": {}}
    assert s["status"] == "complete" and s["counts"] == dict.fromkeys(REQUIRED_COUNTS, 0)


# ---------------------------------------------------------------- reserved names


def test_reserved_names() -> None:
    for name in ("run.json", "_SUCCESS", "report.html", "report-2.html", "report-117.html",
                 "contact_sheet.png", "contact_sheet-3.png", "thumbs/abc.webp", "thumbs",
                 "Run.JSON", "./report.html", "REPORT-2.HTML"):
        assert is_reserved(name), name
    for name in ("house.png", "house.json", "report.png", "report-2.json", "run.png",
                 "contact_sheet.json", "contact_sheet-x.png", "thumbs.png", "report-.html",
                 "myreport.html", "thumbsx/a.webp"):
        assert not is_reserved(name), name
    assert {"run.json", "_SUCCESS", "report.html", "contact_sheet.png"} <= RESERVED_NAMES


def test_every_report_file_is_reserved(store: Store) -> None:
    outcomes = [_pair(f"p{i}", i + 2, store) for i in range(101)]
    files = _build(_summary(outcomes), store)
    assert len(files) > 4 and all(is_reserved(name) for name in files)
    # ...and no output name of the manifest collides with them.
    assert not any(is_reserved(o.png_name or "") for o in outcomes)


# ---------------------------------------------------------------- pagination


@pytest.mark.parametrize("n", [1, 100, 101, 250])
def test_pagination_every_pair_once(store: Store, n: int) -> None:
    outcomes = [_pair(f"p{i}", i + 2, store) for i in range(n)]
    files = _build(_summary(outcomes), store)
    pages = _pages(files)
    expected = ["report.html"] + [f"report-{k}.html" for k in range(2, math.ceil(n / 100) + 1)]
    assert sorted(pages) == sorted(expected)
    seen = Counter(i for page in pages.values() for i in _parse(page).ids)
    assert seen == Counter(o.pair_id for o in outcomes)  # every pair exactly once
    for name, page in pages.items():
        assert len(_parse(page).ids) <= 100, name
    # Pages are in manifest order: page k holds pairs 100(k-1)+1 .. 100k.
    if n > 100:
        assert _parse(pages["report-2.html"]).ids[0] == "p100"


def test_index_has_counts_status_and_failures(store: Store) -> None:
    outcomes = [_pair(f"p{i}", i + 2, store) for i in range(150)]
    outcomes.append(_pair("bad", 500, store, status="failed", reason="CUDA out of memory"))
    s = _summary(outcomes, status="partial",
                 row_errors=[{"line": 1, "pair_id": "dup", "reason": "duplicate pair_id"}])
    pages = _pages(_build(s, store))
    index = pages["report.html"]
    for key in REQUIRED_COUNTS:
        assert key in index
    assert "run-partial" in index and ">partial<" in index
    assert "Failures (2)" in index
    assert "CUDA out of memory" in index and "duplicate pair_id" in index
    assert "line 500" in index and "line 1" in index
    assert 'href="run.json"' in index
    assert "concept_s" in index and "12.35 s" in index
    assert 'href="report-2.html"' in index
    other = pages["report-2.html"]
    assert "Failures" not in other and "pairs_ok" not in other
    assert 'href="report.html"' in other and 'rel="prev"' in other
    assert 'rel="next"' not in other  # the last page


def test_failures_on_index_are_bounded(store: Store) -> None:
    outcomes = [_pair(f"f{i}", i + 2, store, status="failed", reason=f"boom {i}")
                for i in range(MAX_FAILURES_SHOWN + 50)]
    index = _pages(_build(_summary(outcomes), store))["report.html"]
    assert index.count('<span class="reason">boom') == MAX_FAILURES_SHOWN
    assert f"Failures ({MAX_FAILURES_SHOWN + 50})" in index
    assert "50 more failures" in index and "run.json" in index


def test_page_navigation_links_are_bounded(store: Store) -> None:
    outcomes = [_pair(f"p{i}", i + 2, store, source="s", reference="r") for i in range(60)]
    pages = _pages(_build(_summary(outcomes), store, page_size=1))
    assert len(pages) == 60
    middle = _parse(pages["report-30.html"])
    nav_pages = {h for h in middle.hrefs if h.startswith("report")}
    assert {"report.html", "report-29.html", "report-31.html", "report-60.html"} <= nav_pages
    page = pages["report-30.html"]
    assert '<a href="report-29.html" rel="prev">' in page
    assert '<a href="report-31.html" rel="next">' in page
    assert '<a href="report-2.html" rel="next">' in pages["report.html"]
    assert len(nav_pages) < 20  # a window, not one link per page


def test_empty_run(store: Store) -> None:
    s = _summary([])
    files = _build(s, store)
    assert set(files) == {"report.html", "contact_sheet.png"}
    page = files["report.html"][0].decode()
    assert "no pairs" in page and "No failures." in page
    assert _open(files["contact_sheet.png"][0]).width < 400


def test_rejects_bad_page_size_and_thumb(store: Store, summary: RunSummary) -> None:
    for kw in ({"page_size": 0}, {"page_size": 100_000}, {"thumb": 4}):
        with pytest.raises(ValueError):
            report_files(summary, store, **kw)  # at the call, not at next()


# ---------------------------------------------------------------- thumbnails


def test_one_thumbnail_per_distinct_image_read_once(store: Store) -> None:
    # Every pair repeats the same source and reference; outputs are distinct.
    store.data["s3://in/src.png"] = _img((300, 200), (255, 0, 0))
    store.data["s3://in/ref.png"] = _img((200, 300), (0, 0, 255))
    outcomes = [_pair(f"p{i}", i + 2, store, source="s3://in/src.png",
                      reference="s3://in/ref.png") for i in range(120)]
    files = _build(_summary(outcomes), store)  # two pages
    thumbs = _thumbs(files)
    assert len(thumbs) == 2 + 120
    assert set(store.calls.values()) == {1}, "each distinct URI is read exactly once"
    assert set(store.calls) == set(store.data)
    # The pages point at those files: the source thumbnail shows on all 250 rows.
    srcs = Counter(s for page in _pages(files).values() for s in _parse(page).srcs)
    assert set(srcs) == set(thumbs)
    assert max(srcs.values()) == 120
    for name, data in thumbs.items():
        assert re.fullmatch(r"thumbs/[0-9a-f]{16}\.(webp|jpg)", name)
        img = _open(data)
        assert max(img.size) <= 192
    assert max(_open(d).size for d in thumbs.values()) == (192, 128)


def test_same_bytes_under_two_uris_is_one_file(store: Store) -> None:
    same = _img((40, 40), (1, 2, 3))
    store.data.update({"a.png": same, "copy-of-a.png": same})
    outcomes = [_pair("p1", 2, store, source="a.png"), _pair("p2", 3, store, source="copy-of-a.png")]
    files = _build(_summary(outcomes), store)
    assert store.calls["a.png"] == 1 and store.calls["copy-of-a.png"] == 1
    srcs = _parse(_pages(files)["report.html"]).srcs
    assert srcs[0] == srcs[3]  # both rows show the one thumbnail file
    # One file for the two sources, one for the two (byte-identical) references, two outputs.
    assert len(_thumbs(files)) == 1 + 1 + 2


def test_reads_stream_page_by_page_and_thumbnails_are_dropped(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    # The builder must not read everything up front nor keep every thumbnail alive.
    made: dict[str, weakref.ref] = {}
    real = thumbnails.make_thumb

    def tracking(data: bytes | None, box: int) -> thumbnails.Thumb:
        t = real(data, box)
        made[f"{len(made)}"] = weakref.ref(t)
        return t

    monkeypatch.setattr(thumbnails, "make_thumb", tracking)
    store.data["shared.png"] = _img((30, 30))
    outcomes = [_pair(f"p{i}", i + 2, store, source="shared.png") for i in range(30)]
    # The shared source is on every page: read once, kept until the last page. Each output
    # and reference is on one page only: dropped once that page is done.
    gen = report_files(_summary(outcomes), store, page_size=10)
    for name, _, _ in gen:
        if name == "report.html":
            break
    page1 = {o.source_uri for o in outcomes[:10]} | {o.reference_uri for o in outcomes[:10]}
    page1 |= {_out(o.png_name or "") for o in outcomes[:10]}
    assert set(store.calls) <= page1, "read ahead of the page being built"
    for name, _, _ in gen:
        if name == "report-3.html":
            break
    gc.collect()
    alive = sum(ref() is not None for ref in made.values())
    # Alive: page 3's references and outputs plus the shared source, not the 40 of pages 1-2.
    assert alive <= 2 * 10 + 1, alive
    assert list(gen) == []  # page 3's contact sheet came before it
    assert store.calls["shared.png"] == 1


@pytest.mark.parametrize("fallback", [False, True])
def test_degenerate_images_never_fail(store: Store, monkeypatch: pytest.MonkeyPatch,
                                      fallback: bool) -> None:
    if fallback:  # a Pillow built without WebP: thumbnails fall back to JPEG
        monkeypatch.setattr(thumbnails, "thumb_format", lambda: ("JPEG", ".jpg", "image/jpeg"))
    sixteen = Image.new("I;16", (40, 30))
    for x in range(40):
        for y in range(30):
            sixteen.putpixel((x, y), x * 1600)
    buf = io.BytesIO()
    sixteen.save(buf, format="PNG")
    palette = Image.new("P", (30, 30), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0])
    pal_buf = io.BytesIO()
    palette.save(pal_buf, format="PNG", transparency=1)
    images = {
        "wide": _img((5000, 1)),
        "tall": _img((1, 5000)),
        "one": _img((1, 1)),
        "sixteen": buf.getvalue(),
        "float": _img((20, 20), 0.5, "TIFF", mode="F"),
        "palette": pal_buf.getvalue(),
        "alpha": _img((30, 30), (255, 0, 0, 0), mode="RGBA"),
        "cmyk": _img((30, 30), (0, 255, 0, 0), "JPEG", mode="CMYK"),
        "bilevel": _img((30, 30), 1, mode="1"),
        "garbage": b"not an image at all",
        "truncated": _img((300, 300), (1, 2, 3), "JPEG")[:200],
        "empty": b"",
    }
    store.data.update({f"in/{k}": v for k, v in images.items()})
    outcomes = [_pair(k, i + 2, store, source=f"in/{k}", output=v)
                for i, (k, v) in enumerate(images.items())]
    outcomes.append(_pair("gone", 99, store, source="in/not-there", reference="in/raises"))
    del store.data["in/not-there"]  # missing source ...
    del store.data[_out("gone.png")]  # ... and missing output

    def read(uri: str) -> bytes | None:
        if uri == "in/raises":
            raise OSError("storage hiccup")
        return store(uri)

    files = _build(_summary(outcomes), read)
    thumbs = _thumbs(files)
    ext = ".jpg" if fallback else ".webp"
    assert thumbs and all(n.endswith(ext) for n in thumbs)
    for data in thumbs.values():
        img = _open(data)
        assert img.width >= 1 and img.height >= 1
        assert img.format == ("JPEG" if fallback else "WEBP")
    sizes = {_open(d).size for d in thumbs.values()}
    assert (192, 1) in sizes and (1, 192) in sizes and (1, 1) in sizes
    page = _pages(files)["report.html"]
    assert page.count('<span class="ph">unreadable</span>') == 2 * 3  # garbage, truncated, empty
    assert page.count('<span class="ph">missing</span>') == 2  # gone: source and output
    assert page.count('<span class="ph">read error</span>') == 1  # gone: reference
    for sheet in _sheets(files).values():
        assert _open(sheet).format == "PNG"


def _thumb_pixels(data: bytes) -> Image.Image:
    thumb = thumbnails.make_thumb(data, 192)
    assert thumb.data is not None
    return _open(thumb.data).convert("RGB")


def test_sixteen_bit_grey_keeps_its_range() -> None:
    # A plain convert("RGB") clips 16-bit grey to near white; the thumbnail must not.
    img = Image.new("I;16", (64, 8))
    for x in range(64):
        for y in range(8):
            img.putpixel((x, y), x * 1000)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    thumb = _thumb_pixels(buf.getvalue()).convert("L")
    assert thumb.getpixel((2, 4)) < 40 and thumb.getpixel((62, 4)) > 200


def test_transparency_and_cmyk_look_right() -> None:
    # Transparent pixels show the neutral letterbox grey, not the colour hidden under alpha.
    clear = _thumb_pixels(_img((30, 30), (255, 0, 0, 0), mode="RGBA")).getpixel((15, 15))
    assert all(abs(c - 232) < 12 for c in clear), clear
    palette = Image.new("P", (30, 30), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0])
    buf = io.BytesIO()
    palette.save(buf, format="PNG", transparency=1)
    clear = _thumb_pixels(buf.getvalue()).getpixel((15, 15))
    assert all(abs(c - 232) < 12 for c in clear), clear
    magenta = _thumb_pixels(_img((30, 30), (0, 255, 0, 0), "JPEG", mode="CMYK")).getpixel((15, 15))
    assert magenta[0] > 200 and magenta[1] < 60 and magenta[2] > 200, magenta


# ---------------------------------------------------------------- links


def test_links_use_output_names_and_resolve(store: Store, outcomes: list[PairResult]) -> None:
    missing = _pair("lost", 6, store, output_name="lost-output")
    del store.data[_out("lost-output.png")]
    outcomes = [*outcomes, missing]
    files = _build(_summary(outcomes), store)
    page = _pages(files)["report.html"]
    hrefs = set(_parse(page).hrefs)
    # The output of p1 is house.png: read from there, linked there; nothing named p1.png.
    assert store.calls[_out("house.png")] == 1
    assert {"house.png", "house.json", "p2.png", "p2.json"} <= hrefs
    assert "p1.png" not in hrefs and "bad.png" not in hrefs and "bad.json" not in hrefs
    # An output that cannot be read is not linked (the link would be dead); its sidecar is.
    assert "lost-output.png" not in hrefs and "lost-output.json" in hrefs
    written = set(files) | {"run.json"} | {
        o.png_name for o in outcomes if o.png_name and _out(o.png_name) in store.data} | {
        o.sidecar_name for o in outcomes if o.sidecar_name}
    for target in _parse(page).hrefs + _parse(page).srcs:
        assert unquote(target) in written, target
    assert not re.search(r'(?:href|src)="(?:[a-z]+:|/|\.\.)', page), "non-relative link"


def test_pages_come_after_the_files_they_show(store: Store) -> None:
    # Written in the order yielded, a page never lands before its thumbnails and sheets.
    outcomes = [_pair(f"p{i}", i + 2, store) for i in range(150)]
    done: set[str] = set()
    for name, data, _ in report_files(_summary(outcomes), store):
        if name.endswith(".html"):
            links = _parse(data.decode())
            shown = set(links.srcs) | {h for h in links.hrefs if h.startswith("contact_sheet")}
            assert shown and shown <= done, name
        done.add(name)


def test_unsafe_file_names_are_not_linked(store: Store) -> None:
    o = _pair("p", 2, store)
    o.png_name, o.sidecar_name = "../../etc/passwd", "/abs.json"
    store.data[_out(o.png_name)] = _img((4, 4))
    page = _pages(_build(_summary([o]), store))["report.html"]
    assert "passwd" not in " ".join(_parse(page).hrefs)
    assert "abs.json" not in " ".join(_parse(page).hrefs)


def test_escapes_hostile_input(store: Store) -> None:
    evil_id = '"><img src=x onerror=alert(1)>'
    hostile = _pair(evil_id, 7, store, status="failed", reason=HOSTILE,
                    source='s3://b/"><script>x</script>.png')
    js = _pair("js", 8, store, output_name="javascript:alert(1)")
    s = _summary([hostile, js], run_id="<b>run</b>",
                 row_errors=[{"line": 9, "pair_id": "z", "reason": HOSTILE}])
    s.counts[HOSTILE] = 1
    files = _build(s, store)
    for page in _pages(files).values():
        assert HOSTILE not in page
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
        assert "<img src=x" not in page and "<b>run</b>" not in page
        assert 'href="javascript:' not in page
        assert 'href="javascript%3Aalert%281%29.png"' in page
        # Hostile text survives only as inert text: no script, no event handler attribute.
        assert not re.search(r"<script|<[^>]*\son\w+=", page)
        assert "default-src 'none'" in page  # CSP: no script could run anyway


def test_long_text_is_clipped_in_pages(store: Store) -> None:
    o = _pair("p", 2, store, status="failed", reason="x" * 100_000)
    o.source_uri = "s3://b/" + "y" * 100_000
    s = _summary([o])
    page = _pages(_build(s, store))["report.html"]
    assert len(page) < 20_000
    assert s.to_json()["failures"][0]["reason"] == "x" * 100_000  # run.json keeps it whole


# ---------------------------------------------------------------- contact sheets


def test_contact_sheets_are_tiled_in_bounded_pages(store: Store) -> None:
    outcomes = [_pair(f"p{i}", i + 2, store) for i in range(250)]
    # Sheets are bounded even when a caller asks for long HTML pages.
    files = _build(_summary(outcomes), store, page_size=250)
    sheets = _sheets(files)
    names = ["contact_sheet.png", "contact_sheet-2.png", "contact_sheet-3.png"]
    assert sorted(sheets) == sorted(names)
    assert [_sheet_rows(sheets[n]) for n in names] == [100, 100, 50]
    page = _pages(files)["report.html"]
    assert all(f'href="{n}"' in page for n in sheets)


def test_contact_sheet_tile_is_letterboxed(store: Store) -> None:
    # A wide red source: the tile centre is red, the band above it the letterbox colour.
    store.data["wide.png"] = _img((200, 50), (255, 0, 0))
    o = _pair("wide", 1, store, source="wide.png")
    img = _open(_sheets(_build(_summary([o]), store))["contact_sheet.png"]).convert("RGB")
    y_mid = img.height - 6 - 48
    reds = [x for x in range(img.width)
            if img.getpixel((x, y_mid))[0] > 200 and img.getpixel((x, y_mid))[1] < 60]
    assert reds, "source thumbnail not drawn"
    top = img.getpixel((reds[len(reds) // 2], img.height - 6 - 94))
    assert top[1] > 150, "expected letterbox background above a wide image"


@pytest.mark.parametrize("bitmap_font", [False, True])
def test_contact_sheet_unicode_ids(store: Store, monkeypatch: pytest.MonkeyPatch,
                                   bitmap_font: bool) -> None:
    # Without FreeType Pillow falls back to a latin-1 bitmap font; labels must still render.
    if bitmap_font:
        monkeypatch.setattr(contact_sheets, "_font", lambda: ImageFont.load_default_imagefont())
    o = _pair("猫-スタイル-€-" + "x" * 60, 1, store)
    sheets = _sheets(_build(_summary([o], run_id="ラン"), store))
    assert _open(sheets["contact_sheet.png"]).format == "PNG"


# ---------------------------------------------------------------- size at 4 000 pairs


@pytest.fixture(scope="module")
def big_run() -> dict:
    """4 000 pairs (200 sources x 20 references, 220 distinct tiny inputs, a distinct tiny
    output per pair), built once for the size tests."""
    store = Store()
    outcomes = []
    for i in range(200):
        store.data[f"s3://in/s{i}.png"] = _gradient(i, 24)
    for j in range(20):
        store.data[f"s3://in/r{j}.png"] = _gradient(1000 + j, 24)
    line = 2
    for i in range(200):
        for j in range(20):
            name = f"out-{i}-{j}"
            store.data[_out(f"{name}.png")] = _gradient(5000 + line, 24)
            outcomes.append(PairResult(
                f"pair-{i}-{j}", line, "ok" if line % 97 else "failed",
                f"s3://in/s{i}.png", f"s3://in/r{j}.png",
                f"{name}.png" if line % 97 else None, f"{name}.json" if line % 97 else None,
                reason=None if line % 97 else "CUDA out of memory",
                timings={"concept_s": 1.5, "content_s": 2.0, "fusion_s": 3.25}))
            line += 1
    start = time.perf_counter()
    files = _build(_summary(outcomes), store)
    return {"files": files, "outcomes": outcomes, "store": store,
            "seconds": time.perf_counter() - start}


@pytest.mark.slow  # make test-slow (in make check): see pyproject.toml
def test_size_bounds_at_4000_pairs(big_run: dict) -> None:
    files, outcomes = big_run["files"], big_run["outcomes"]
    n = len(outcomes)
    pages, sheets, thumbs = _pages(files), _sheets(files), _thumbs(files)
    total = sum(len(d) for d, _ in files.values())
    largest = max(len(p.encode()) for p in pages.values())
    print(f"\n4000 pairs: {len(files)} files, {total / 1e6:.1f} MB, {total / n / 1e3:.1f} KB/pair; "
          f"html {sum(len(p) for p in pages.values()) / n / 1e3:.2f} KB/pair, largest page "
          f"{largest / 1e3:.0f} KB; thumbs {len(thumbs)} = "
          f"{sum(map(len, thumbs.values())) / n / 1e3:.2f} KB/pair; sheets "
          f"{sum(map(len, sheets.values())) / n / 1e3:.2f} KB/pair; built in "
          f"{big_run['seconds']:.1f} s")
    assert len(pages) == 40 and len(sheets) == 40
    assert largest <= 2_000_000
    assert total / n <= 30_000
    distinct_outputs = sum(1 for o in outcomes if o.png_name)
    assert len(thumbs) == 220 + distinct_outputs
    assert set(big_run["store"].calls.values()) == {1}
    for data in sheets.values():
        with Image.open(io.BytesIO(data)) as img:
            assert img.height <= 120 * MAX_SHEET_ROWS and img.width <= 1000
            assert img.width * img.height <= 8_000_000


# ---------------------------------------------------------------- Prefect payloads


def test_markdown_summary(summary: RunSummary) -> None:
    md = markdown_summary(summary)
    for key in REQUIRED_COUNTS:
        assert key.replace("_", r"\_") in md
    assert "partial" in md
    assert "line 4" in md and "line 5" in md
    assert "<script>" not in md


def test_markdown_summary_is_bounded() -> None:
    s = _summary([], status="failed",
                 row_errors=[{"line": i, "pair_id": f"p{i}", "reason": "r" * 5000}
                             for i in range(5000)])
    md = markdown_summary(s)
    assert md.count("\n- line ") == MAX_FAILURES_SHOWN
    assert "4800 more" in md
    assert len(md) < 200_000


def test_table_rows_bounded_failures_first(store: Store) -> None:
    outcomes = [_pair(f"p{i}", i + 2, store) for i in range(500)]
    outcomes.append(_pair("late-failure", 900, store, status="failed", reason=HOSTILE))
    rows = table_rows(outcomes, limit=200)
    assert len(rows) == 200
    assert rows[-1]["pair_id"] == "late-failure" and rows[-1]["reason"] == HOSTILE
    assert rows[-1]["output_file"] == ""
    assert [r["line"] for r in rows] == sorted(r["line"] for r in rows)
    assert set(rows[0]) == {"pair_id", "line", "status", "output_file", "reason"}
    assert rows[0]["output_file"] == "p0.png"
    assert len(table_rows(outcomes[:3])) == 3


# ---------------------------------------------------------------- a real browser

class _Chromium:
    """Headless Chromium driven over the DevTools protocol on ``--remote-debugging-pipe``.

    Stdlib only: Chromium reads NUL-terminated JSON commands on fd 3 and answers on fd 4.
    Real-time deadlines instead of ``--dump-dom --virtual-time-budget``: virtual time does not
    wait for image decoding, so on a loaded machine the DOM was dumped before the check ran.
    """

    def __init__(self, chromium: str, profile: Path, log: Path) -> None:
        r_cmd, self._w = os.pipe()
        self._r, w_evt = os.pipe()

        def child() -> None:  # fds 3 and 4 in Chromium; via high fds so the dup2s cannot clash
            a = fcntl.fcntl(r_cmd, fcntl.F_DUPFD, 10)
            b = fcntl.fcntl(w_evt, fcntl.F_DUPFD, 10)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self._log = log.open("wb")
        self.proc = subprocess.Popen(
            [chromium, "--headless", "--disable-gpu", "--no-sandbox", "--no-first-run",
             "--remote-debugging-pipe", f"--user-data-dir={profile}", "about:blank"],
            preexec_fn=child, close_fds=False, stdin=subprocess.DEVNULL,
            stdout=self._log, stderr=self._log)
        os.close(r_cmd)
        os.close(w_evt)
        self._buf = b""
        self._id = 0
        self.events: list[dict] = []

    def _message(self, deadline: float) -> dict:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._r], [], [], left)[0]:
                raise TimeoutError("Chromium did not answer in time")
            chunk = os.read(self._r, 1 << 16)
            if not chunk:
                raise EOFError("Chromium exited")
            self._buf += chunk
        raw, self._buf = self._buf.split(b"\0", 1)
        return json.loads(raw)

    def call(self, method: str, params: dict | None = None, session: str | None = None,
             timeout: float = 30) -> dict:
        self._id += 1
        msg: dict = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._message(deadline)
            if reply.get("id") == self._id:
                assert "error" not in reply, f"{method}: {reply['error']}"
                return reply["result"]
            self.events.append(reply)

    def wait_event(self, method: str, timeout: float = 30) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            for i, event in enumerate(self.events):
                if event.get("method") == method:
                    return self.events.pop(i)
            self.events.append(self._message(deadline))

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=10)
            self.proc.wait(timeout=10)
        except (AssertionError, OSError, TimeoutError, EOFError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait(timeout=10)
        finally:
            os.close(self._w)
            os.close(self._r)
            self._log.close()


# Runs in a report page once it has loaded: forces its lazy thumbnails to load, then records
# every image's natural size (0 = not loaded), every link, and whether any script exists.
_PAGE_CHECK = """(async () => {
  const imgs = Array.from(document.images);
  for (const im of imgs) im.loading = "eager";
  const errs = await Promise.all(imgs.map(im => im.decode().then(() => "", e => String(e))));
  return {url: location.href, scripts: document.scripts.length,
          imgs: imgs.map((im, i) => ({src: im.src, w: im.naturalWidth, h: im.naturalHeight,
                                      err: errs[i]})),
          links: Array.from(document.querySelectorAll("a[href]"), a => a.href)};
})()"""


def _browse(chromium: str, start: Path, scratch: Path) -> tuple[dict[str, dict], list[str]]:
    """Open ``start`` and every ``.html`` page reachable by its links; return what each page
    showed (by URL) and the URL of every request the pages made."""
    browser = _Chromium(chromium, scratch / "profile", scratch / "chromium.log")
    try:
        target = browser.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = browser.call("Target.attachToTarget",
                               {"targetId": target, "flatten": True})["sessionId"]
        browser.call("Page.enable", session=session)
        browser.call("Network.enable", session=session)
        pages: dict[str, dict] = {}
        queue = [start.as_uri()]
        while queue:
            url = queue.pop(0)
            browser.call("Page.navigate", {"url": url}, session=session)
            browser.wait_event("Page.loadEventFired")
            result = browser.call("Runtime.evaluate", {
                "expression": _PAGE_CHECK, "awaitPromise": True, "returnByValue": True,
            }, session=session)["result"]["value"]
            assert result["url"] == url
            pages[url] = result
            for link in result["links"]:
                if link.endswith(".html") and link not in pages and link not in queue:
                    queue.append(link)
        requests = [e["params"]["request"]["url"] for e in browser.events
                    if e.get("method") == "Network.requestWillBeSent"]
        return pages, requests
    finally:
        browser.close()


def _chromium() -> str:
    """Path of a headless-capable Chromium; the test fails (never skips) without one."""
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    pytest.fail("Chromium is not installed: the browser test needs Debian's `chromium` "
                "(apt-get install -y chromium)")


def _write_run(folder: Path, files: dict[str, tuple[bytes, str]], store: Store,
               outcomes: list[PairResult], summary: RunSummary, out: str) -> None:
    """A downloaded run folder: the report files, run.json, and the outputs at their names."""
    for name, (data, _) in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    (folder / "run.json").write_bytes(run_json_bytes(summary))
    for o in outcomes:
        if o.png_name and _out(o.png_name, out) in store.data:
            (folder / o.png_name).write_bytes(store.data[_out(o.png_name, out)])
        if o.sidecar_name:
            (folder / o.sidecar_name).write_text(json.dumps({"pair_id": o.pair_id}))


def test_report_in_headless_chromium(tmp_path: Path) -> None:
    chromium = _chromium()
    store = Store()
    store.data["in/shared.png"] = _img((300, 200), (255, 0, 0))
    store.data["in/wide.png"] = _img((5000, 1))
    store.data["in/garbage.png"] = b"garbage"
    run = tmp_path / "run"
    run.mkdir()
    out = str(run)  # a local run folder: outputs are read from where they are written
    outcomes = [_pair(f"p{i}", i + 2, store, source="in/shared.png",
                      reference=f"in/r{i % 7}.png", output_name=f"out-{i:03d}", run=out)
                for i in range(230)]
    outcomes += [
        _pair("wide", 300, store, source="in/wide.png", output_name="wide-out", run=out),
        _pair("broken", 301, store, source="in/garbage.png", run=out),
        _pair("failed", 302, store, status="failed", reason=HOSTILE, run=out),
        _pair('evil"><b>id', 303, store, output_name="evil-out", run=out),
    ]
    summary = _summary(outcomes, output_uri=out)
    files = _build(summary, store)
    _write_run(run, files, store, outcomes, summary, out)
    pages, requests = _browse(chromium, run / "report.html", tmp_path)

    visited = {Path(unquote(urlparse(u).path)).relative_to(run).as_posix() for u in pages}
    assert visited == set(_pages(files)), "every page is reachable by following the links"
    for url in requests:  # nothing fetched from outside the run folder
        assert url.startswith(run.as_uri() + "/"), url
    thumb_sizes = {n: _open(d).size for n, d in _thumbs(files).items()}
    shown: set[str] = set()
    for url, page in pages.items():
        assert page["imgs"], url
        assert page["scripts"] == 0, url
        for img in page["imgs"]:
            name = Path(unquote(urlparse(img["src"]).path)).relative_to(run).as_posix()
            assert img["err"] == "", (url, name, img)
            assert (img["w"], img["h"]) == thumb_sizes[name], (url, name, img)
            shown.add(name)
        for link in page["links"]:
            parsed = urlparse(link)
            assert parsed.scheme == "file", link
            target = Path(unquote(parsed.path))
            assert target.is_file() and run in target.parents, link
    assert shown == set(thumb_sizes), "every thumbnail written is shown and loads"
    # The browser saw exactly the images the HTML holds (3 pages of 234 pairs; two images are
    # placeholders: the unreadable source and the failed pair's output).
    assert len(visited) == 3
    for url, page in pages.items():
        name = Path(unquote(urlparse(url).path)).name
        assert len(page["imgs"]) == len(_parse(_pages(files)[name]).srcs), url
    assert sum(len(p["imgs"]) for p in pages.values()) == 234 * 3 - 2
