"""Shared pytest fixtures: offline environment, the tiny model, small generated images."""

from __future__ import annotations

import os
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"
# Prefect reads its home at import: a private one per test session, never the user's or .prefect
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="vct-prefect-home-")
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from tests.fixtures_s3 import s3_bucket, s3_server  # noqa: E402, F401
from vct.threads import apply_thread_budget  # noqa: E402

# The suite's own torch work runs at the thread count a vct process would use (VCT_THREADS
# when set), so `VCT_THREADS=1 make test` and `VCT_THREADS=2 make test` run it in two
# summation orders: a bit-equality holds only between results made at equal counts.
apply_thread_budget()


@pytest.fixture(scope="session")
def prefect_harness():
    """One embedded Prefect backend for the whole session (starting one costs ~10 s)."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        # What a configured server looks like to `vct run` called in process (not embedded:
        # no server of its own, no reserved core). Subprocesses that must run embedded drop it.
        saved = os.environ.get("PREFECT_API_URL")
        os.environ["PREFECT_API_URL"] = str(PREFECT_API_URL.value())
        try:
            yield
        finally:
            if saved is None:
                os.environ.pop("PREFECT_API_URL", None)
            else:
                os.environ["PREFECT_API_URL"] = saved


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The offline random-weight SD 1.x model, built once per session."""
    from vct.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("model") / "tiny", seed=0)


@pytest.fixture(scope="session")
def broken_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model with its UNet weights cut short: it passes every check a run makes
    before work (layout, configs, identity), and every job then fails loading it. A genuine
    compute-time failure of every pair, for the tests of failed runs."""
    import shutil

    folder = tmp_path_factory.mktemp("broken-model") / "tiny"
    shutil.copytree(tiny_model_dir, folder)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    return folder


@pytest.fixture(scope="session")
def models(tiny_model_dir):
    """Loaded once: stages never mutate the models (only their UNet evaluation counter)."""
    from vct.models import load_models

    return load_models(str(tiny_model_dir))


def make_image(kind: int, size: tuple[int, int] = (80, 64)) -> Image.Image:
    """Small deterministic pictures: a disc on a flat background, or stripes."""
    rng = np.random.default_rng(kind)
    bg, fg = (tuple(int(v) for v in rng.integers(0, 255, 3)) for _ in range(2))
    img = Image.new("RGB", size, bg)
    draw = ImageDraw.Draw(img)
    if kind % 2:
        for x in range(0, size[0], 8):
            draw.rectangle((x, 0, x + 3, size[1]), fill=fg)
    else:
        draw.ellipse((size[0] // 5, size[1] // 6, size[0] * 4 // 5, size[1] * 5 // 6), fill=fg)
    return img


@pytest.fixture(scope="session")
def images(tmp_path_factory) -> dict[str, Path]:
    """Two sources (different sizes, one not square) and one reference, as PNG files."""
    folder = tmp_path_factory.mktemp("images")
    paths = {}
    for name, kind, size in (("src_a", 0, (80, 64)), ("src_b", 2, (64, 96)), ("ref", 1, (64, 64))):
        paths[name] = folder / f"{name}.png"
        make_image(kind, size).save(paths[name])
    return paths
