"""Make the golden trajectory `tests/golden/tiny_trajectory.safetensors`.

    python -m tests.golden.make_golden            # rewrite the fixture
    python -m tests.golden.make_golden --check    # recompute and compare, write nothing

The fixture pins the whole method end to end on the tiny random model
(`vct.tiny_model.build_tiny_model(dir, seed=0)`) at 64 px and T = 8, on the CPU with one torch
thread: x_T, the per-step content embeddings c_0..c_7, the per-step iteration counts, the
concept's vectors and the fused latents of B* and B. `tests/test_fidelity_golden.py`
recomputes all of it and compares within tight tolerances.

Regenerating it is legitimate only for a deliberate change of the method (a formula, a default,
the order of random draws), said as such in the commit message, or when the tiny model's weights
themselves change (a torch or diffusers upgrade that changes their seeded initialisation: the
fixture stores a digest of the weights, and the test says which of the two failed). Never
regenerate to make a failing fidelity test pass without knowing why it failed.

Only safetensors and JSON are written: no pickle.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from PIL import Image, ImageDraw

GOLDEN = Path(__file__).with_name("tiny_trajectory.safetensors")
CONTENT = {"num_inference_steps": 8, "num_inner_steps": 6, "early_stop_epsilon": 0.1,
           "early_stop_slope": 0.1}  # thresholds that stop some steps early on this model
CONCEPT = {"max_train_steps": 4, "seed": 0}
FUSION: dict = {}  # the defaults
THREADS = 1


def source_image() -> Image.Image:
    """A disc on a flat background, 80×64 (not square: the center crop matters)."""
    img = Image.new("RGB", (80, 64), (40, 90, 160))
    ImageDraw.Draw(img).ellipse((16, 10, 64, 54), fill=(230, 200, 60))
    return img


def reference_image() -> Image.Image:
    """Vertical stripes, 64×64."""
    img = Image.new("RGB", (64, 64), (250, 240, 230))
    draw = ImageDraw.Draw(img)
    for x in range(0, 64, 8):
        draw.rectangle((x, 0, x + 3, 64), fill=(20, 120, 60))
    return img


def weights_digest(models) -> str:
    """sha256 of every weight of the UNet, the text encoder and the VAE, in name order."""
    h = hashlib.sha256()
    for module in (models.unet, models.text_encoder, models.vae):
        for name, tensor in sorted(module.state_dict().items()):
            h.update(name.encode())
            h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


@contextmanager
def pinned_threads(n: int = THREADS):
    """One torch thread: the reduction order, hence the rounding, does not depend on the host."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _iterations(result) -> list[int]:
    return list(result.stats.iterations)


def compute(models) -> dict[str, torch.Tensor]:
    """Run stages 1-4 with the golden settings; the tensors the fixture holds."""
    from vct.concept import learn_concept
    from vct.config import ConceptConfig, ContentConfig, FusionConfig
    from vct.content import invert_content
    from vct.fusion import fuse

    with pinned_threads():
        content = invert_content(models, source_image(), ContentConfig(**CONTENT))
        concept = learn_concept(models, reference_image(), ConceptConfig(**CONCEPT))
        fused = fuse(models, content, [concept], FusionConfig(**FUSION))
    return {
        "x_T": content.x_T.contiguous(),
        "embeddings": content.embeddings.contiguous(),
        "iterations": torch.tensor(_iterations(content), dtype=torch.int64),
        "concept": concept.vectors.contiguous(),
        "fused_latents": fused.latents.contiguous(),
    }


def header(models) -> dict:
    return {"content": CONTENT, "concept": CONCEPT, "fusion": FUSION, "threads": THREADS,
            "tiny_model_seed": 0, "weights_sha256": weights_digest(models),
            "torch": torch.__version__, "made_by": "python -m tests.golden.make_golden"}


def read_fixture(path: Path, header: str) -> tuple[dict[str, torch.Tensor], dict]:
    """A golden fixture's tensors and the JSON stored under `header` in its metadata."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()[header])
    return load_file(str(path)), meta


def read() -> tuple[dict[str, torch.Tensor], dict]:
    return read_fixture(GOLDEN, "vct_golden")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare, do not write")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from safetensors.torch import save_file

    from vct.models import load_models
    from vct.tiny_model import build_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        models = load_models(str(build_tiny_model(Path(tmp) / "tiny", seed=0)), device="cpu")
        tensors = compute(models)
        meta = header(models)
    if args.check:
        old, old_meta = read()
        worst = {k: float((tensors[k].double() - old[k].double()).abs().max()) for k in old}
        print(json.dumps({"max_abs_diff": worst,
                          "weights_same": meta["weights_sha256"] == old_meta["weights_sha256"]},
                         indent=1))
        return 0
    save_file(tensors, str(GOLDEN), metadata={"vct_golden": json.dumps(meta, sort_keys=True)})
    print(f"wrote {GOLDEN} ({GOLDEN.stat().st_size} bytes): iterations "
          f"{tensors['iterations'].tolist()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
