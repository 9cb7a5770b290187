"""Model loading: local folders, s3:// prefixes (downloaded once, keyed by ETags), bad folders."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from vct import storage
from vct.models import ModelError, check_layout, load_models, model_identity


def _upload(folder: Path, prefix: str) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not path.name.startswith("."):
            storage.write_bytes(f"{prefix}/{path.relative_to(folder).as_posix()}", path.read_bytes())


def test_loads_from_an_s3_prefix_once(s3_bucket, tiny_model_dir, models, tmp_path, monkeypatch):
    monkeypatch.setenv("VCT_MODEL_CACHE", str(tmp_path / "cache"))
    prefix = f"{s3_bucket}/models/tiny"
    _upload(tiny_model_dir, prefix)
    loaded = load_models(prefix)
    assert loaded.identity == models.identity  # same files, same identity
    assert loaded.source == prefix
    for a, b in zip(loaded.unet.parameters(), models.unet.parameters()):
        assert torch.equal(a, b)
    folders = list((tmp_path / "cache").iterdir())
    storage.delete(f"{prefix}/unet/config.json")  # a second load must not need the bucket's copy
    storage.write_bytes(f"{prefix}/unet/config.json",
                        (tiny_model_dir / "unet/config.json").read_bytes())
    load_models(prefix)
    assert len(list((tmp_path / "cache").iterdir())) == len(folders)


def test_refuses_what_is_not_an_sd1_folder(tmp_path, tiny_model_dir):
    with pytest.raises(ModelError, match="no such folder"):
        check_layout(tmp_path / "missing")
    with pytest.raises(ModelError, match="missing model_index.json"):
        check_layout(tmp_path)
    with pytest.raises(ModelError, match="needs CUDA"):
        load_models(str(tiny_model_dir), device="cpu", dtype="fp16")


def test_identity_changes_with_any_weight_byte(tmp_path, tiny_model_dir):
    import shutil

    copy = Path(shutil.copytree(tiny_model_dir, tmp_path / "copy"))
    first = model_identity(copy)
    assert model_identity(copy) == first  # memoised, stable
    weights = copy / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert model_identity(copy) != first


def test_native_resolution_follows_the_model(models):
    assert models.native_resolution == 64  # 8x8 latents x VAE factor 8 (SD 1.5: 64 x 8 = 512)
    assert models.latent_scale == pytest.approx(0.18215)


def test_each_file_version_is_hashed_once(tmp_path, tiny_model_dir, monkeypatch):
    """The memo is what keeps a 4 GB model from being rehashed by every process."""
    import shutil

    from vct import file_hashes

    copy = Path(shutil.copytree(tiny_model_dir, tmp_path / "copy"))
    (copy / ".vct-file-hashes.json").unlink(missing_ok=True)  # copied with the same mtimes
    hashed: list[str] = []
    real = file_hashes.sha256_file
    monkeypatch.setattr(file_hashes, "sha256_file", lambda p: hashed.append(p.name) or real(p))
    first = model_identity(copy)
    count = len(hashed)
    assert count > 0 and model_identity(copy) == first and len(hashed) == count
    (copy / "unet" / "config.json").touch()  # a new mtime: that file is hashed again, alone
    os.utime(copy / "unet" / "config.json", (1.0, 1.0))
    assert model_identity(copy) == first and hashed[count:] == ["config.json"]
