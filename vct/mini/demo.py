"""The demo's inputs: procedural sources and references for `make demo` on the mini model.

Why hand-picked params rather than random indices: a newcomer should see at a glance what a
restyle did, so each source is a large, plain shape and each reference looks nothing like
it (another shape, colour, fill and background). Every source is paired with every
reference: three restyles of one shape side by side on the contact sheet.
`python -m vct.mini.demo` rewrites manifests/mini/ and manifests/mini.csv from these params.
"""

from __future__ import annotations

import sys
from pathlib import Path

from vct.mini.data import Params, render

SOURCES: dict[str, Params] = {
    "house": Params("house", "red", "solid", "white", cx=32, cy=33, size=21),
    "star": Params("star", "blue", "solid", "black", cx=32, cy=32, size=22),
}
REFERENCES: dict[str, Params] = {
    "yellow-checks": Params("square", "yellow", "checkered", "black", cx=30, cy=34, size=17),
    "purple-stripes": Params("triangle", "purple", "striped", "white", cx=33, cy=31, size=19),
    "orange-dots": Params("circle", "orange", "dotted", "lined", cx=32, cy=30, size=16),
}
FOLDER = "mini"
"""The images' folder, next to the manifest."""


def manifest_rows() -> list[tuple[str, str, str]]:
    """(source, reference, pair_id) for every source with every reference."""
    return [(f"{FOLDER}/src-{s}.png", f"{FOLDER}/ref-{r}.png", f"{s}-{r}")
            for s in SOURCES for r in REFERENCES]


def write(manifests: Path) -> Path:
    """Write the PNGs under manifests/mini/ and the manifest manifests/mini.csv."""
    folder = manifests / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    for name, p in SOURCES.items():
        render(p).save(folder / f"src-{name}.png")
    for name, p in REFERENCES.items():
        render(p).save(folder / f"ref-{name}.png")
    path = manifests / f"{FOLDER}.csv"
    path.write_text("source,reference,pair_id\n"
                    + "".join(f"{s},{r},{p}\n" for s, r, p in manifest_rows()))
    return path


if __name__ == "__main__":
    print(write(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("manifests")))
