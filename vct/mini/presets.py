"""Named stage settings for the mini model: what `make demo` and `make quality` run.

Why a preset: the faithful concept schedule (500 updates x 4 micro-steps, one UNet sample
each) is sized for SD 1.5 on a GPU. The preset keeps VCT's method (both branches, attention
injection, the pivotal content fit, three concept vectors) and trims only the concept's budget,
so the demo fits 10 minutes and the benchmark 30 on 2 CPU cores. `python -m
vct.mini.presets NAME` prints a preset as `vct run` flags, so the Makefile and the benchmark
read the same values.
"""

from __future__ import annotations

import sys
from typing import Any

from vct.batch.settings import RunSettings

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "faithful": {"concept": {}, "content": {}, "fusion": {}},
    "mini": {
        # The 4 micro-steps of an update as one UNet batch (the same expected update, another
        # RNG order) and 200 updates instead of 500: 800 samples of the reference instead of
        # 2000, what lets 16 concepts fit the benchmark's budget on 2 cores.
        "concept": {"max_train_steps": 200, "batch_microsteps": True},
        # The content fit and fusion stay faithful: on the mini model the fit meets its
        # early-stop threshold after one iteration per step, so its 50-iteration cap costs
        # nothing.
        "content": {},
        "fusion": {},
    },
    # The preset's cost check: the paper's 500 concept updates, still batched (the benchmark's
    # test of what the mini preset's shorter concept stage loses).
    "mini-500": {"concept": {"batch_microsteps": True}, "content": {}, "fusion": {}},
}
"""Stage overrides per preset; 'faithful' is the library's defaults."""


def settings(name: str, base: RunSettings | None = None) -> RunSettings:
    """Run settings with the preset's stage overrides applied (checked like any `--set`)."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return (base or RunSettings()).with_stage_overrides(PRESETS[name])


def as_flags(name: str) -> list[str]:
    """The preset as `--set stage.field=value` arguments of `vct run`."""
    flags = []
    for stage, values in PRESETS[name].items():
        for field, value in values.items():
            text = str(value).lower() if isinstance(value, bool) else str(value)
            flags += ["--set", f"{stage}.{field}={text}"]
    return flags


if __name__ == "__main__":
    print(" ".join(as_flags(sys.argv[1] if len(sys.argv) > 1 else "mini")))
