"""Single-file SD 1.x checkpoints (.safetensors, weights-only .ckpt): what studios keep.

A1111 and ComfyUI store a fine-tune as one state dict in the original (LDM) key layout. vct
converts such a file once, offline, with diffusers' own single-file loader, into a diffusers
folder in the model cache, and from then on loads that folder like any other. The loader needs
the component configs and the tokenizer, which a single file does not carry; without a local
config folder diffusers goes to the hub, which hangs on an offline GPU node. So vct ships SD
1.5's (vct/model_configs/sd15: configs, CLIP tokenizer, scheduler, no weights), and
`--model-config DIR` names another for SD 1.x variants of other sizes.

The folder is keyed by the file's sha256 (and the config's, when not the shipped one), and that
is also the model's identity in every cache key: a renamed or re-uploaded file with the same
bytes reuses every stage result. A file that is not an SD 1.x checkpoint is refused before any
conversion, in one line naming it and what it holds.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import struct
from pathlib import Path

from vct.errors import UserError
from vct.file_hashes import HashMemo, sha256_file

SUFFIXES = (".safetensors", ".ckpt")
DEFAULT_CONFIG = Path(__file__).parent / "model_configs" / "sd15"
MARKER = "vct_single_file.json"
"""Written last into a converted folder: the file's hash, the config's, and the identity."""
UNET, VAE, TEXT = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer."


class CheckpointError(UserError, ValueError):
    """A single file that cannot be used as an SD 1.x checkpoint (one line, naming it)."""


def is_single_file(spec: str) -> bool:
    """Whether `--model` names one checkpoint file (local or s3://) rather than a folder."""
    return str(spec).lower().endswith(SUFFIXES)


def folder_digest(folder: Path) -> str:
    """sha256 over a config folder's files (relative path and content), in sorted order."""
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(folder).as_posix()}\0{sha256_file(f)}\n".encode())
    return h.hexdigest()


def _safetensors_keys(path: Path) -> dict[str, str]:
    """Key -> dtype from the header alone; a file shorter than its header says is truncated."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise CheckpointError(f"model {path}: not a safetensors file (empty or truncated)")
        (length,) = struct.unpack("<Q", head)
        if length > min(size - 8, 100 << 20):
            raise CheckpointError(f"model {path}: not a safetensors file (truncated, or another "
                                  "format with a .safetensors name)")
        try:
            header = json.loads(fh.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"model {path}: not a safetensors file (unreadable header)"
                                  ) from None
    header.pop("__metadata__", None)
    end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
    if 8 + length + end > size:
        raise CheckpointError(f"model {path}: truncated ({size} bytes, its header needs "
                              f"{8 + length + end}); copy it again")
    return {k: str(v["dtype"]) for k, v in header.items()}


def _ckpt_keys(path: Path) -> dict[str, str]:
    """Key -> dtype of a torch file read with `weights_only` (no code from the file runs)."""
    import pickle

    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0][:160]
        raise CheckpointError(f"model {path}: a pickle that needs code to load ({first}); only "
                              "weights-only .ckpt files are read: convert it to .safetensors "
                              "where you trust it") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"model {path}: not a readable .ckpt (truncated or another "
                              f"format: {first})") from None
    while isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(f"model {path}: holds a {type(state).__name__}, not a state dict")
    return {k: str(getattr(v, "dtype", type(v).__name__)) for k, v in state.items()}


def checkpoint_keys(path: Path) -> dict[str, str]:
    if path.suffix.lower() == ".ckpt":
        return _ckpt_keys(path)
    return _safetensors_keys(path)


def what_it_is(keys: dict[str, str]) -> str | None:
    """None for an SD 1.x checkpoint; otherwise what the keys say the file is."""
    names = list(keys)
    if any("lora_" in k or ".lora." in k for k in names):
        return "a LoRA, not a full checkpoint (apply it to its base model first)"
    if any(k.startswith("conditioner.embedders.") for k in names):
        return "an SDXL checkpoint (conditioner.embedders.*); vct runs SD 1.x models"
    if any(k.startswith("cond_stage_model.model.") for k in names):
        return "an SD 2.x checkpoint (OpenCLIP text encoder); vct runs SD 1.x models"
    missing = [what for prefix, what in ((UNET, "UNet"), (VAE, "VAE"), (TEXT, "CLIP text "
                                                                        "encoder"))
               if not any(k.startswith(prefix) for k in names)]
    if missing:
        return (f"not an SD 1.x checkpoint: no {', '.join(missing)} weights "
                f"({len(names)} tensors, e.g. {', '.join(names[:2]) or 'none'})")
    return None


def check_config(config: Path) -> None:
    from vct.models import REQUIRED_FILES

    missing = [n for n in REQUIRED_FILES if not (config / n).is_file()]
    if not (config / "tokenizer").is_dir():
        missing.append("tokenizer/")
    if missing:
        raise CheckpointError(f"model config {config}: missing {', '.join(missing)} (give a "
                              "folder with SD 1.x component configs, tokenizer and scheduler)")


def _dtype(keys: dict[str, str]):
    """The file's own floating dtype, kept in the converted folder (fp16 stays fp16)."""
    import torch

    names = {"F16": torch.float16, "float16": torch.float16, "torch.float16": torch.float16,
             "BF16": torch.bfloat16, "torch.bfloat16": torch.bfloat16}
    unet = [v for k, v in keys.items() if k.startswith(UNET)]
    return names.get(max(set(unet), key=unet.count), torch.float32) if unet else torch.float32


def _convert(path: Path, config: Path, keys: dict[str, str], target: Path) -> None:
    """diffusers' single-file loader with a local config only (never the hub), saved as a
    diffusers folder into a temp folder renamed into place, its marker written last."""
    from unittest import mock

    from diffusers import StableDiffusionPipeline

    try:
        with mock.patch.dict(os.environ, {"HF_HUB_OFFLINE": "1"}):  # restored after, whatever
            pipe = StableDiffusionPipeline.from_single_file(
                str(path), config=str(config), local_files_only=True, safety_checker=None,
                requires_safety_checker=False, torch_dtype=_dtype(keys))
            pipe.save_pretrained(target, safe_serialization=True)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"model {path}: could not convert with the config {config} "
                              f"({first}); an SD 1.x variant of another size needs "
                              "--model-config") from None


def converted_folder(spec: str, config: str | None, cache_root: Path) -> Path:
    """The diffusers folder for a single-file checkpoint, converted on first use.

    `spec` is a local path or s3:// URI (downloaded once into the model cache, keyed by its
    ETag); `config` the config folder (None: the shipped SD 1.5 one).
    """
    from vct import storage
    from vct.storage.sync import publish_folder

    if storage.is_s3(spec):
        try:
            path = storage.sync_object(spec, cache_root / "files")
        except storage.StorageError as exc:
            raise CheckpointError(f"model {spec}: {exc}") from None
        from vct.models import touch_last_used

        touch_last_used(path.parent)
    else:
        path = Path(spec).expanduser()
    if not path.is_file():
        raise CheckpointError(f"model {spec}: no such file (give a .safetensors or .ckpt SD 1.x "
                              "checkpoint, a diffusers folder, or an s3:// URI of either)")
    config_dir = Path(config).expanduser() if config else DEFAULT_CONFIG
    check_config(config_dir)
    memo = HashMemo(cache_root / "file-hashes.json")  # the CLI, planner and workers: once
    sha = memo.sha256(path, str(path.resolve()))
    memo.save()
    config_sha = None if config is None else folder_digest(config_dir)
    name = f"single-{sha[:24]}" + (f"-{config_sha[:12]}" if config_sha else "")
    final = cache_root / name
    if (final / MARKER).is_file():
        return final
    keys = checkpoint_keys(path)
    problem = what_it_is(keys)
    if problem:
        raise CheckpointError(f"model {spec}: {problem}")
    cache_root.mkdir(parents=True, exist_ok=True)
    tmp = cache_root / f".{name}.{secrets.token_hex(6)}.tmp"
    try:
        _convert(path, config_dir, keys, tmp)
        identity = sha if config_sha is None else hashlib.sha256(
            f"{sha}\0{config_sha}".encode()).hexdigest()
        (tmp / MARKER).write_text(json.dumps({"sha256": sha, "config_sha256": config_sha,
                                              "identity": identity, "source": spec}, indent=1))
        publish_folder(tmp, final, MARKER)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def single_file_identity(folder: Path) -> str | None:
    """The identity recorded by the conversion, or None for a folder that was not one."""
    try:
        return str(json.loads((folder / MARKER).read_text())["identity"])
    except (OSError, ValueError, KeyError):
        return None
