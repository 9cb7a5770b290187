"""Tests for vct.tiny_model: the offline random-weight SD 1.x-shaped model used by other tests."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from diffusers import StableDiffusionPipeline  # noqa: E402
from transformers import CLIPTokenizer  # noqa: E402

from vct.tiny_model import MARKER_FILE, MODEL_KIND, WORDS, build_tiny_model  # noqa: E402

WEIGHT_FILES = (
    "unet/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/model.safetensors",
)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


def test_loads_and_runs_at_native_size(tiny_dir: Path) -> None:
    pipe = StableDiffusionPipeline.from_pretrained(tiny_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vae_scale_factor == 8
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == 64
    assert pipe.text_encoder.config.eos_token_id == pipe.tokenizer.eos_token_id
    assert pipe.vae.config.scaling_factor == pytest.approx(0.18215)
    out = pipe(
        "girl",
        num_inference_steps=2,
        height=64,
        width=64,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert out.shape == (1, 64, 64, 3)
    assert np.isfinite(out).all()


def test_tokenizer_conventions(tiny_dir: Path) -> None:
    tok = CLIPTokenizer.from_pretrained(tiny_dir / "tokenizer")
    assert tok.bos_token == "<|startoftext|>"
    assert tok.eos_token == "<|endoftext|>"
    assert tok.pad_token_id == tok.eos_token_id
    assert tok.model_max_length == 77
    assert tok.tokenize("girl") == ["girl</w>"]
    assert [w for w in WORDS if len(tok(w, add_special_tokens=False).input_ids) != 1] == []
    ids = tok("a painting of a girl").input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id and len(ids) == 7
    vocab = json.loads((tiny_dir / "tokenizer" / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == len(tok) and vocab["<|endoftext|>"] == len(vocab) - 1
    merges = (tiny_dir / "tokenizer" / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[0] == "#version: 0.2"


def test_same_seed_is_byte_identical_and_rng_untouched(tiny_dir: Path, tmp_path: Path) -> None:
    state = torch.random.get_rng_state()
    again = build_tiny_model(tmp_path / "again", seed=0)
    assert torch.equal(state, torch.random.get_rng_state())
    for name in WEIGHT_FILES:
        assert (again / name).read_bytes() == (tiny_dir / name).read_bytes(), name


def test_different_seed_differs(tiny_dir: Path, tmp_path: Path) -> None:
    other = build_tiny_model(tmp_path / "other", seed=1)
    name = "unet/diffusion_pytorch_model.safetensors"
    assert (other / name).read_bytes() != (tiny_dir / name).read_bytes()
    assert json.loads((other / MARKER_FILE).read_text()) == {"seed": 1, "kind": MODEL_KIND}


def test_existing_folder_rules(tiny_dir: Path, tmp_path: Path) -> None:
    before = (tiny_dir / WEIGHT_FILES[0]).stat().st_mtime_ns
    assert build_tiny_model(tiny_dir, seed=0) == tiny_dir
    assert (tiny_dir / WEIGHT_FILES[0]).stat().st_mtime_ns == before
    with pytest.raises(FileExistsError, match="seed"):
        build_tiny_model(tiny_dir, seed=3)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        build_tiny_model(foreign, seed=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["foreign"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (build_tiny_model(empty, seed=0) / "model_index.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
