"""How `--model mini` reaches the pipeline (vct/mini/shipped.py): the shipped fp16 folder is
copied once into VCT_HOME under its hash and loads in fp32, with a stable identity."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vct.batch import engine
from vct.mini import shipped
from vct.models import load_models


@pytest.fixture()
def fake_release(tiny_model_dir: Path, tmp_path: Path) -> Path:
    """A shipped folder made from the tiny model, as `ship` makes the real one."""
    return shipped.ship(tiny_model_dir, tmp_path / "weights")


def test_ship_halves_the_weights(fake_release: Path, tiny_model_dir: Path) -> None:
    rel = "unet/diffusion_pytorch_model.safetensors"
    half, full = load_file(str(fake_release / rel)), load_file(str(tiny_model_dir / rel))
    assert set(half) == set(full)
    assert all(t.dtype == torch.float16 for t in half.values())
    assert all(torch.equal(half[k].float(), full[k].half().float()) for k in full)
    assert (fake_release / "tokenizer" / "vocab.json").is_file()


def test_mini_resolves_to_a_stable_copy_that_loads_in_fp32(fake_release: Path, tmp_path: Path,
                                                            monkeypatch) -> None:
    monkeypatch.setattr(shipped, "WEIGHTS_DIR", fake_release)
    monkeypatch.setenv("VCT_HOME", str(tmp_path / "home"))
    folder = Path(engine.named_model_folder("mini"))
    assert folder.parent == tmp_path / "home"
    assert folder.name == f"mini-model-{shipped.shipped_digest(fake_release)[:16]}"
    assert engine.named_model_folder("mini") == str(folder)  # copied once
    assert engine.named_model_folder("/some/folder") == "/some/folder"
    models = load_models(str(folder), "cpu")
    assert all(p.dtype == torch.float32 for m in (models.unet, models.vae, models.text_encoder)
               for p in m.parameters())
    # another machine (another home) gets the same identity: the cache keys agree
    other = shipped.mini_model_folder(fake_release, tmp_path / "elsewhere")
    assert load_models(str(other), "cpu").identity == models.identity
    request = engine.prepare("m.csv", str(tmp_path / "out"), "mini")
    assert request.model == str(folder)


def test_missing_weights_are_one_line(tmp_path: Path) -> None:
    from vct.models import ModelError

    with pytest.raises(ModelError, match="shipped weights are missing"):
        shipped.mini_model_folder(tmp_path / "nothing", tmp_path / "home")
