"""Hostile names never escape: after runs of manifests whose pair ids and output names try
traversal, absolute paths and the run's own file names (in any case), and runs whose run id
tries the same, a walk of the whole tree finds nothing outside `<output>/<run_id>/` and the
cache, and every file in the run folder is a good pair's output or the report's own."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import make_image
from tests.test_batch_engine import FakeRunner
from vct import report, storage
from vct.batch import engine, outputs
from vct.config import ConfigError

SETTINGS = {"content": {"num_inference_steps": 3}}
GOOD = ("house", "tree", "Run-2", "report_a", "thumbs2")
HOSTILE_IDS = ("../escape", "..", ".", "/abs/pair", "a/b", "a\\b", ".hidden", "%2e%2e",
               "..%2fx", "run/../../x", "x\u2215y")
HOSTILE_NAMES = ("../../outside", "/tmp/absolute", "sub/../../x", "..", "./x", "C:\\x",
                 # the run's own files and folders, in every case a file system might fold
                 "run", "RUN", "Run", "report", "REPORT", "contact_sheet", "Contact_Sheet",
                 "_SUCCESS", "_success", "thumbs", "THUMBS", "report-2", "REPORT-7",
                 "contact_sheet-3", "_cache", "_CACHE", "run.json", "report.html")
HOSTILE_RUN_IDS = ("../ESCAPED_RUN", "..", ".", "/tmp/abs-run", "a/b", "run/../..", "_cache",
                   "run", "_SUCCESS", "report.html", "thumbs", ".hidden", "x\u2215y")


def _inputs(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, kind in (("a", 0), ("b", 2), ("ref", 1)):
        paths[name] = folder / f"{name}.png"
        make_image(kind, (16, 16)).save(paths[name])
    return paths


def _cell(text: str) -> str:
    return '"' + text.replace('"', '""') + '"'


def _hostile_manifest(path: Path, images: dict[str, Path], inputs_uri: str | None = None) -> None:
    src = inputs_uri + "/a.png" if inputs_uri else str(images["a"])
    src_b = inputs_uri + "/b.png" if inputs_uri else str(images["b"])
    ref = inputs_uri + "/ref.png" if inputs_uri else str(images["ref"])
    lines = ["source,reference,pair_id,output_name"]
    lines += [f"{src if i % 2 else src_b},{ref},{name},{name}" for i, name in enumerate(GOOD)]
    lines += [f"{src},{ref},{_cell(pid)}," for pid in HOSTILE_IDS]
    lines += [f"{src},{ref},hostile-{i},{_cell(name)}" for i, name in enumerate(HOSTILE_NAMES)]
    path.write_text("\n".join(lines) + "\n")


def _tree(root: Path) -> set[str]:
    """Every file and symlink under root, relative, after the runs."""
    out = set()
    for folder, dirs, files in os.walk(root):
        for name in files + [d for d in dirs if Path(folder, d).is_symlink()]:
            out.add(os.path.relpath(os.path.join(folder, name), root))
    return out


def _check_run_folder(names: set[str], run_id: str) -> None:
    """Inside <run_id>/: the good pairs' PNG + sidecar, and only the report's own names."""
    pairs = {f"{g}.{ext}" for g in GOOD for ext in ("png", "json")}
    inside = {n.split("/", 1)[1] for n in names if n.startswith(run_id + "/")}
    assert pairs <= inside, sorted(pairs - inside)
    others = inside - pairs
    assert others and all(report.is_reserved(n) or n.startswith(f"{outputs.CONCEPTS}/")
                          for n in others), sorted(others)


def test_hostile_manifests_and_run_ids_write_nothing_outside_the_run_and_cache(
        tmp_path, tiny_model_dir):
    images = _inputs(tmp_path / "in")
    manifest = tmp_path / "in" / "m.csv"
    _hostile_manifest(manifest, images)
    before = _tree(tmp_path)
    out = tmp_path / "work" / "out"
    for run_id in HOSTILE_RUN_IDS:
        with pytest.raises(ConfigError, match="run_id"):
            engine.prepare(str(manifest), str(out), str(tiny_model_dir), SETTINGS, run_id)
    summary = engine.run(engine.prepare(str(manifest), str(out), str(tiny_model_dir),
                                        SETTINGS, "r1"), runner=FakeRunner())
    derived = engine.run(engine.prepare(str(manifest), str(out), str(tiny_model_dir),
                                        SETTINGS), runner=FakeRunner())
    new = _tree(tmp_path) - before
    allowed = (f"work/out/{summary.run_id}/", f"work/out/{derived.run_id}/", "work/out/_cache/")
    escaped = sorted(n for n in new if not n.startswith(allowed))
    assert not escaped, escaped
    assert not [p for p in ("/tmp/absolute.png", "/tmp/absolute.json") if Path(p).exists()]
    statuses = {p.pair_id: p.status for p in summary.pairs}
    assert [statuses[g] for g in GOOD] == ["ok"] * len(GOOD)
    bad = [p for p in summary.pairs if p.status == "bad"]
    assert len(bad) == len(HOSTILE_IDS) + len(HOSTILE_NAMES), statuses
    assert summary.status == "complete"
    for run_id in (summary.run_id, derived.run_id):
        _check_run_folder({n.removeprefix("work/out/") for n in new}, run_id)
    assert not (tmp_path / "ESCAPED_RUN").exists() and not Path("/tmp/abs-run").exists()


def test_hostile_names_on_s3_stay_under_the_run_and_cache_prefixes(s3_bucket, tmp_path,
                                                                   tiny_model_dir):
    images = _inputs(tmp_path / "in")
    for name, path in images.items():
        storage.write_bytes(f"{s3_bucket}/in/{name}.png", path.read_bytes())
    manifest = tmp_path / "m.csv"
    _hostile_manifest(manifest, images, inputs_uri=f"{s3_bucket}/in")
    storage.write_bytes(f"{s3_bucket}/in/m.csv", manifest.read_bytes())
    out = f"{s3_bucket}/out"
    for run_id in HOSTILE_RUN_IDS:
        with pytest.raises(ConfigError, match="run_id"):
            engine.prepare(f"{s3_bucket}/in/m.csv", out, str(tiny_model_dir), SETTINGS, run_id)
    summary = engine.run(engine.prepare(f"{s3_bucket}/in/m.csv", out, str(tiny_model_dir),
                                        SETTINGS, "r1"), runner=FakeRunner())
    assert summary.status == "complete"
    keys = {u.removeprefix(s3_bucket + "/") for u in storage.list_uris(s3_bucket)}
    escaped = sorted(k for k in keys
                     if not k.startswith(("in/", "out/r1/", "out/_cache/")))
    assert not escaped, escaped
    _check_run_folder({k.removeprefix("out/") for k in keys if k.startswith("out/")}, "r1")


def test_the_flow_refuses_a_hostile_run_id_before_any_write(prefect_harness, tmp_path,
                                                            tiny_model_dir):
    from flows.restyle import restyle

    images = _inputs(tmp_path / "in")
    manifest = tmp_path / "in" / "m.csv"
    manifest.write_text(f"source,reference\n{images['a']},{images['ref']}\n")
    for run_id in ("../ESCAPED_RUN", str(tmp_path / "abs"), "RUN.JSON"):
        with pytest.raises(ConfigError, match="run_id"):
            restyle(manifest_uri=str(manifest), output_uri=str(tmp_path / "out"),
                    model=str(tiny_model_dir), settings=SETTINGS, run_id=run_id)
    assert _tree(tmp_path) == {"in/a.png", "in/b.png", "in/ref.png", "in/m.csv"}
