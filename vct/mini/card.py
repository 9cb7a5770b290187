"""The model card's numbers and sample grid, from a training folder and a model.

`python -m vct.mini.card DIR [MODEL] [PNG]` prints the loss summary and the training wall time
of DIR and writes the grid of samples from captions (default docs/mini-samples.png).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from vct.mini import data as D


def grid_captions() -> list[str]:
    """30 captions, one row per colour and one column per shape; fills and backgrounds cycle
    so that every fill and every background appears in every row."""
    colors = list(D.COLORS)
    return [D.caption(D.Params(shape, color, D.FILLS[(r + c) % 4],
                               D.BACKGROUNDS[(2 * r + 3 * c) % 4], 32, 32, 16))
            for r, color in enumerate(colors) for c, shape in enumerate(D.SHAPES)]


def loss_summary(train_dir: Path, window: int = 100) -> dict:
    """Mean loss of each stage's first and last `window` steps, and its last logged wall time."""
    rows = [json.loads(line) for line in (train_dir / "losses.jsonl").read_text().splitlines()]
    out = {}
    for stage in ("vae", "decoder", "unet"):
        own = sorted((r for r in rows if r["stage"] == stage), key=lambda r: r["step"])
        own = list({r["step"]: r for r in own}.values())  # a resumed step counts once
        if not own:
            continue
        losses = [r["loss"] for r in own]
        out[stage] = {"steps": own[-1]["step"],
                      "first_mean": round(sum(losses[:window]) / len(losses[:window]), 4),
                      "last_mean": round(sum(losses[-window:]) / len(losses[-window:]), 4),
                      "wall_s": own[-1]["elapsed_s"]}
    return out


def main(argv: list[str]) -> None:
    from vct.mini.sample import grid, sample_captions

    train_dir = Path(argv[0])
    model = argv[1] if len(argv) > 1 else str(train_dir / "model")
    png = Path(argv[2]) if len(argv) > 2 else Path("docs/mini-samples.png")
    print(json.dumps({"losses": loss_summary(train_dir),
                      "summary": json.loads((train_dir / "summary.json").read_text())},
                     indent=1))
    images = sample_captions(model, grid_captions(), steps=50, guidance=7.5, seed=0)
    grid(images, cols=len(D.SHAPES), scale=2).save(png)
    print(png)


if __name__ == "__main__":
    main(sys.argv[1:])
