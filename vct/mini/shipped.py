"""The mini model's weights as shipped in the package, and `--model mini`'s folder.

The package holds the trained model as a diffusers SD 1.x folder in fp16 (vct/mini/weights/,
under 20 MB). Runs never read it in place: it is copied once into VCT_HOME (or ~/.cache/vct) under
a name carrying the hash of the shipped files, so the package stays read-only, a new release
gets a new folder, and the model's identity (the hash of the copied files, as for any folder)
is the same on every machine. The loader upcasts the fp16 weights to fp32.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
MINI_NAME = "mini"
MAX_SHIPPED_BYTES = 20 * 1024 * 1024
_PARTS = ("model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler",
          "vct_mini_model.json")


def shipped_files(root: Path | None = None) -> list[Path]:
    """Every file of the shipped folder (default: the package's), in a fixed order."""
    root = root or WEIGHTS_DIR
    files: list[Path] = []
    for part in _PARTS:
        p = root / part
        if p.is_dir():
            files.extend(sorted(x for x in p.rglob("*") if x.is_file()))
        elif p.is_file():
            files.append(p)
    return files


def shipped_digest(root: Path | None = None) -> str:
    """sha256 over the shipped files' relative paths and bytes: the release's fingerprint."""
    root = root or WEIGHTS_DIR
    digest = hashlib.sha256()
    for f in shipped_files(root):
        digest.update(f.relative_to(root).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(f.read_bytes()).digest())
    return digest.hexdigest()


def mini_model_folder(root: Path | None = None, home: Path | None = None) -> Path:
    """The shipped mini model as a local diffusers folder, copied once (atomically) into
    VCT_HOME/mini-model-<hash>; later calls return it unchanged."""
    root = root or WEIGHTS_DIR
    if not (root / "model_index.json").is_file():
        from vct.models import ModelError

        raise ModelError(f"model {MINI_NAME}: the shipped weights are missing ({root})")
    home = home or Path(os.environ.get("VCT_HOME", Path.home() / ".cache" / "vct"))
    target = home / f"mini-model-{shipped_digest(root)[:16]}"
    if (target / "model_index.json").is_file():
        return target
    home.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=home))
    try:
        for f in shipped_files(root):
            dest = staging / f.relative_to(root)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, dest)
        try:
            os.replace(staging, target)
        except OSError:
            if not (target / "model_index.json").is_file():  # not a concurrent twin's copy
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def ship(model_dir: Path, root: Path | None = None) -> Path:
    """Write a trained model folder as the shipped one: weights in fp16, everything else as is.

    Refuses a result over MAX_SHIPPED_BYTES (the repository's budget for it)."""
    root = root or WEIGHTS_DIR
    model_dir = Path(model_dir)
    if root.exists():
        shutil.rmtree(root)
    for f in shipped_files(model_dir):
        rel = f.relative_to(model_dir)
        dest = root / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        if f.suffix == ".safetensors":
            tensors = {k: (v.half() if v.is_floating_point() else v).contiguous()
                       for k, v in load_file(str(f)).items()}
            save_file(tensors, str(dest), metadata={"format": "pt"})
        else:
            shutil.copyfile(f, dest)
    size = sum(f.stat().st_size for f in shipped_files(root))
    if size > MAX_SHIPPED_BYTES:
        raise ValueError(f"shipped weights are {size / 2**20:.1f} MiB, over the 20 MiB budget")
    marker = root / "vct_mini_model.json"
    if marker.is_file():
        data = json.loads(marker.read_text())
        data["shipped_dtype"] = str(torch.float16).removeprefix("torch.")
        marker.write_text(json.dumps(data, indent=1) + "\n")
    return root
