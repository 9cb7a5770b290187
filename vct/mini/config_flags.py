"""`vct train-mini`'s flags, one per TrainConfig field, so the command and the config agree."""

from __future__ import annotations

import argparse
from dataclasses import fields

from vct.mini.train import TrainConfig


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """A flag per config field (default shown), plus --threads, --time and --quiet."""
    for f in fields(TrainConfig):
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=type(f.default),
                            default=f.default, help=f"(default: {f.default!r})")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--time", action="store_true",
                        help="only time 20 steps of each stage and project the run's minutes")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def config_from(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
