"""Write a diffusers SD 1.x folder as one file in the original (LDM) key layout, for the tests.

Studios keep their checkpoints as A1111 and ComfyUI do: one state dict with the UNet under
`model.diffusion_model.`, the VAE under `first_stage_model.` and the CLIP text encoder under
`cond_stage_model.transformer.`. diffusers reads that layout but does not write it, so the tests
build such files from the tiny and mini models with this inverse of its key mapping. Written
from the layouts themselves (the UNet's input/middle/output blocks, the VAE's down/mid/up
levels), not from diffusers' tables.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
          "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
UNET_FIXED = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
              "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v",
                 "to_out.0": "proj_out"}


def _resnet(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return f"{RESNET[head]}.{tail}"


def unet_key(key: str, config: dict) -> str:
    """One UNet key: down block i's layer j is input block (L+1)i + j + 1, its downsampler the
    block after its layers; up block i's layer j is output block (L+1)i + j, its upsampler the
    last layer's third (or, without attention, second) module."""
    for name, ldm in UNET_FIXED.items():
        if key.startswith(name + "."):
            return ldm + key[len(name):]
    per = config["layers_per_block"] + 1
    p = key.split(".")
    rest = ".".join(p[4:])
    if p[0] == "down_blocks":
        i = int(p[1])
        if p[2] == "resnets":
            j = int(p[3])
            return f"input_blocks.{per * i + j + 1}.0.{_resnet(rest)}"
        if p[2] == "attentions":
            return f"input_blocks.{per * i + int(p[3]) + 1}.1.{rest}"
        return f"input_blocks.{per * (i + 1)}.0.op.{'.'.join(p[5:])}"
    if p[0] == "mid_block":
        k = int(p[2])
        if p[1] == "resnets":
            return f"middle_block.{2 * k}.{_resnet('.'.join(p[3:]))}"
        return f"middle_block.1.{'.'.join(p[3:])}"
    if p[0] == "up_blocks":
        i, j = int(p[1]), int(p[3])
        if p[2] == "resnets":
            return f"output_blocks.{per * i + j}.0.{_resnet(rest)}"
        if p[2] == "attentions":
            return f"output_blocks.{per * i + j}.1.{rest}"
        with_attention = "CrossAttn" in config["up_block_types"][i]
        return f"output_blocks.{per * i + per - 1}.{2 if with_attention else 1}.{rest}"
    raise KeyError(key)


def vae_key(key: str, levels: int) -> str:
    """One VAE key: diffusers counts the decoder's levels from the bottom, LDM from the top."""
    key = key.replace(".conv_norm_out.", ".norm_out.")
    p = key.split(".")
    if len(p) < 3 or p[1] not in ("down_blocks", "up_blocks", "mid_block"):
        return key
    part, kind = p[0], p[1]
    if kind == "mid_block":
        k = int(p[3])
        if p[2] == "resnets":
            tail = ".".join(p[4:]).replace("conv_shortcut", "nin_shortcut")
            return f"{part}.mid.block_{k + 1}.{tail}"
        tail = ".".join(p[4:])
        for name, ldm in VAE_ATTENTION.items():
            if tail.startswith(name + "."):
                tail = ldm + tail[len(name):]
        return f"{part}.mid.attn_1.{tail}"
    level = int(p[2]) if kind == "down_blocks" else levels - 1 - int(p[2])
    where = "down" if kind == "down_blocks" else "up"
    if p[3] == "resnets":
        tail = ".".join(p[5:]).replace("conv_shortcut", "nin_shortcut")
        return f"{part}.{where}.{level}.block.{p[4]}.{tail}"
    sampler = "downsample" if kind == "down_blocks" else "upsample"
    return f"{part}.{where}.{level}.{sampler}.{'.'.join(p[5:])}"


def ldm_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """The folder's UNet, VAE and text encoder as one state dict in the LDM layout."""
    unet_cfg = json.loads((folder / "unet/config.json").read_text())
    vae_cfg = json.loads((folder / "vae/config.json").read_text())
    out: dict[str, torch.Tensor] = {}
    for key, value in load_file(folder / "unet/diffusion_pytorch_model.safetensors").items():
        out["model.diffusion_model." + unet_key(key, unet_cfg)] = value
    levels = len(vae_cfg["down_block_types"])
    for key, value in load_file(folder / "vae/diffusion_pytorch_model.safetensors").items():
        new = vae_key(key, levels)
        if ".mid.attn_1." in new and new.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]  # LDM's attention projections are 1x1 convolutions
        out["first_stage_model." + new] = value
    for key, value in load_file(folder / "text_encoder/model.safetensors").items():
        out["cond_stage_model.transformer.text_model." + key.removeprefix("text_model.")] = value
    return {k: v.contiguous() for k, v in out.items()}


def write_single_file(folder: Path, path: Path) -> Path:
    """`folder` as one .safetensors (or, for a .ckpt path, a weights-only torch file)."""
    state = ldm_state_dict(folder)
    if path.suffix == ".ckpt":
        torch.save({"state_dict": state}, path)
    else:
        save_file(state, path)
    return path


def config_folder(folder: Path, out: Path) -> Path:
    """The folder without its weights: what `--model-config` takes for a non-SD-1.5 size."""
    for rel in ("model_index.json", "unet/config.json", "vae/config.json",
                "text_encoder/config.json", "scheduler/scheduler_config.json"):
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes((folder / rel).read_bytes())
    (out / "tokenizer").mkdir(parents=True, exist_ok=True)
    for f in (folder / "tokenizer").iterdir():
        (out / "tokenizer" / f.name).write_bytes(f.read_bytes())
    return out
