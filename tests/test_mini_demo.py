"""The demo's inputs (vct/mini/demo.py): the committed manifest and PNGs are what the params
render, and every source meets references that look nothing like it or like each other."""

from pathlib import Path

import numpy as np
from PIL import Image

from vct.manifest import parse_manifest
from vct.mini import demo
from vct.mini.data import render

MANIFESTS = Path(__file__).resolve().parent.parent / "manifests"


def test_committed_demo_inputs_are_the_rendered_params(tmp_path) -> None:
    fresh = demo.write(tmp_path)
    assert fresh.read_text() == (MANIFESTS / "mini.csv").read_text()
    for name, p in {**{f"src-{k}": v for k, v in demo.SOURCES.items()},
                    **{f"ref-{k}": v for k, v in demo.REFERENCES.items()}}.items():
        committed = np.asarray(Image.open(MANIFESTS / "mini" / f"{name}.png").convert("RGB"))
        assert np.array_equal(committed, np.asarray(render(p))), name


def test_each_source_meets_clearly_different_references() -> None:
    rows = parse_manifest((MANIFESTS / "mini.csv").read_bytes(), "mini.csv").rows
    assert len(rows) == len(demo.SOURCES) * len(demo.REFERENCES)
    refs = list(demo.REFERENCES.values())
    for i, a in enumerate(refs):
        for b in refs[i + 1:]:
            assert a.color != b.color and a.fill != b.fill and a.background != b.background
    for src in demo.SOURCES.values():
        for ref in refs:
            assert src.shape != ref.shape and src.color != ref.color and src.fill != ref.fill


def test_preset_flags_give_the_preset_settings() -> None:
    """`make demo` passes the preset as `--set` flags: they must build the same settings the
    benchmark uses, and differ from the faithful defaults."""
    from vct.cli import build_parser, settings_from
    from vct.mini import presets

    args = build_parser().parse_args(["run", "m.csv", "--output", "o", "--model", "mini",
                                      *presets.as_flags("mini")])
    assert settings_from(args) == presets.settings("mini")
    assert presets.settings("mini") != presets.settings("faithful")
    assert presets.settings("faithful").concept.max_train_steps == 500
