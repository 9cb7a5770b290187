"""Single-file SD 1.x checkpoints: converted once, offline, from local disk or S3, bit-identical
to the same weights as a diffusers folder; anything else refused in one line (issue #20)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.ldm_layout import config_folder, write_single_file
from vct import storage
from vct.cli import main
from vct.mini.shipped import mini_model_folder
from vct.models import ModelError, load_models, local_model_folder, model_identity
from vct.single_file import DEFAULT_CONFIG, CheckpointError

FAST = ["--max-train-steps", "3", "--batch-microsteps", "--num-inference-steps", "6",
        "--num-inner-steps", "2", "--quiet", "--threads", "1"]
PARTS = (("unet", "diffusion_pytorch_model.safetensors"),
         ("vae", "diffusion_pytorch_model.safetensors"), ("text_encoder", "model.safetensors"))


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    """No hub, ever: offline, and the hub's address pointed at a closed port."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("VCT_MODEL_CACHE", str(tmp_path / "models"))


@pytest.fixture(scope="module")
def tiny_file(tiny_model_dir, tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("single")
    return (write_single_file(tiny_model_dir, folder / "tiny.safetensors"),
            config_folder(tiny_model_dir, folder / "tiny-config"))


def _same_weights(a: Path, b: Path) -> None:
    for part, name in PARTS:
        x, y = load_file(a / part / name), load_file(b / part / name)
        assert set(x) == set(y), part
        for key in x:  # values exactly; an fp16 file may be kept at its own precision
            assert torch.equal(x[key].float(), y[key].float()), f"{part}.{key}"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_file_converts_to_the_folders_own_weights(tiny_file, tiny_model_dir, tmp_path):
    path, config = tiny_file
    folder = local_model_folder(str(path), config=str(config))
    _same_weights(tiny_model_dir, folder)
    # its identity is the file's bytes with the config's, not the conversion's output
    config_sha = hashlib.sha256()
    for f in sorted(p for p in config.rglob("*") if p.is_file()):
        config_sha.update(f"{f.relative_to(config).as_posix()}\0{_sha256(f)}\n".encode())
    expected = hashlib.sha256(f"{_sha256(path)}\0{config_sha.hexdigest()}".encode()).hexdigest()
    assert model_identity(folder) == expected
    # a copy under another name is the same model, converted once
    copy = tmp_path / "renamed.safetensors"
    copy.write_bytes(path.read_bytes())
    assert local_model_folder(str(copy), config=str(config)) == folder
    assert len([p for p in (tmp_path / "models").iterdir() if p.is_dir()]) == 1


def test_translate_on_a_file_writes_the_folders_pngs(tiny_file, tiny_model_dir, images,
                                                    tmp_path):
    path, config = tiny_file
    for name, model, extra in (("file", path, ["--model-config", str(config)]),
                               ("folder", tiny_model_dir, [])):
        assert main(["translate", "--model", str(model), "--reference", str(images["ref"]),
                     "--source", str(images["src_a"]), "--out", str(tmp_path / name),
                     "--seed", "3", *FAST, *extra]) == 0
    assert (tmp_path / "file/src_a.png").read_bytes() == (tmp_path / "folder/src_a.png"
                                                           ).read_bytes()
    meta = json.loads((tmp_path / "file/src_a.json").read_text())
    assert meta["model"]["identity"] == model_identity(
        local_model_folder(str(path), config=str(config)))


def test_a_ckpt_loads_weights_only_and_a_code_pickle_is_refused(tiny_model_dir, tmp_path):
    config = config_folder(tiny_model_dir, tmp_path / "cfg")
    ckpt = write_single_file(tiny_model_dir, tmp_path / "tiny.ckpt")
    _same_weights(tiny_model_dir, local_model_folder(str(ckpt), config=str(config)))

    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "hook": Path("/etc")}, evil)
    with pytest.raises(CheckpointError, match=r"evil\.ckpt: a pickle that needs code"):
        local_model_folder(str(evil), config=str(config))


def test_the_mini_model_as_a_file(tmp_path):
    shipped = mini_model_folder()
    path = write_single_file(shipped, tmp_path / "mini.safetensors")
    folder = local_model_folder(str(path), config=str(config_folder(shipped, tmp_path / "cfg")))
    _same_weights(shipped, folder)
    assert load_models(str(path), "cpu", config=str(tmp_path / "cfg")).identity == \
        model_identity(folder)


def test_an_s3_file_is_downloaded_once_and_is_the_same_model(s3_bucket, tiny_file, tmp_path):
    path, config = tiny_file
    uri = f"{s3_bucket}/checkpoints/tiny.safetensors"
    storage.write_bytes(uri, path.read_bytes())
    folder = local_model_folder(uri, config=str(config))
    assert model_identity(folder) == model_identity(local_model_folder(str(path),
                                                                       config=str(config)))
    downloads = list((tmp_path / "models" / "files").iterdir())
    assert len(downloads) == 1
    assert local_model_folder(uri, config=str(config)) == folder  # no second download
    assert list((tmp_path / "models" / "files").iterdir()) == downloads
    with pytest.raises(CheckpointError, match="missing.safetensors"):
        local_model_folder(f"{s3_bucket}/checkpoints/missing.safetensors", config=str(config))


def _lines(exc: pytest.ExceptionInfo) -> list[str]:
    return str(exc.value).splitlines()


@pytest.mark.parametrize("keys, found", [
    ({"conditioner.embedders.0.transformer.text_model.x": 1, "model.diffusion_model.a": 1},
     "SDXL"),
    ({"lora_unet_down_blocks_0_attentions_0.lora_down.weight": 1}, "LoRA"),
    ({"cond_stage_model.model.token_embedding.weight": 1, "model.diffusion_model.a": 1,
      "first_stage_model.a": 1}, "SD 2.x"),
    ({"model.diffusion_model.a": 1, "first_stage_model.a": 1}, "no CLIP text encoder"),
])
def test_other_files_are_refused_naming_what_they_hold(tmp_path, keys, found):
    path = tmp_path / "other.safetensors"
    save_file({k: torch.zeros(v) for k, v in keys.items()}, path)
    with pytest.raises(CheckpointError, match=found) as exc:
        local_model_folder(str(path))
    assert len(_lines(exc)) == 1 and "other.safetensors" in str(exc.value)
    assert not (tmp_path / "models").exists() or not any(
        p.name.startswith("single-") for p in (tmp_path / "models").iterdir())


def test_a_truncated_file_is_refused(tiny_file, tmp_path):
    path, config = tiny_file
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"cut\.safetensors: truncated") as exc:
        local_model_folder(str(cut), config=str(config))
    assert len(_lines(exc)) == 1
    with pytest.raises(CheckpointError, match="no such file"):
        local_model_folder(str(tmp_path / "absent.ckpt"))


def test_a_config_for_another_size_is_needed_and_named(tiny_file):
    path, _ = tiny_file
    with pytest.raises(CheckpointError, match="--model-config") as exc:
        local_model_folder(str(path))  # the shipped SD 1.5 configs do not fit the tiny sizes
    assert len(_lines(exc)) == 1
    with pytest.raises(ModelError, match="single-file checkpoint .* only"):
        local_model_folder("/some/folder", config=str(DEFAULT_CONFIG))


def test_the_shipped_configs_are_sd15s():
    """The tokenizer gives CLIP's own ids (published with CLIP) and the configs SD 1.5's sizes."""
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(DEFAULT_CONFIG / "tokenizer", local_files_only=True)
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert len(tok) == 49408 and tok.model_max_length == 77
    unet = json.loads((DEFAULT_CONFIG / "unet/config.json").read_text())
    assert unet["block_out_channels"] == [320, 640, 1280, 1280]
    assert unet["cross_attention_dim"] == 768 and unet["layers_per_block"] == 2


def test_the_package_ships_every_config_and_weight_file():
    """An installed vct (a wheel, not this checkout) has the configs and the mini weights:
    every file under them matches a package-data pattern of pyproject.toml."""
    import fnmatch
    import tomllib

    root = Path(__file__).resolve().parents[1]
    data = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    patterns = data["package-data"]
    for package, sub in (("vct.model_configs", "sd15"), ("vct.mini", "weights")):
        base = root / package.replace(".", "/")
        files = [p.relative_to(base).as_posix() for p in (base / sub).rglob("*") if p.is_file()]
        assert files
        for rel in files:
            assert any(fnmatch.fnmatch(rel, pat) and rel.count("/") == pat.count("/")
                       for pat in patterns[package]), f"{package}: {rel} is not packaged"
