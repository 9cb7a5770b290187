"""An SD 1.5-architecture model with random weights, built offline, for benchmarks only.

The same component classes and configs as Stable Diffusion 1.5 (runwayml/stable-diffusion-v1-5):
UNet 320/640/1280/1280 with cross-attention 768 and 8 heads, AutoencoderKL 128/256/512/512 with
4 latent channels and scaling 0.18215, the CLIP ViT-L/14 text encoder (768 wide, 12 layers,
12 heads, 3072, 49408 tokens, 77 positions) and SD 1.5's PNDM scheduler config, so time, memory
and UNet evaluations are those of the real model at 512 px. Its images mean nothing.

The tokenizer is the tiny model's (`vct.tiny_model`: a small CLIP BPE learnt offline) padded to
CLIP's 49408 entries with filler tokens, so BOS/EOS are CLIP's ids 49406/49407 and the text
encoder has the real vocabulary size. The build is `vct.tiny_model.build_random_model` with the
spec below: atomic, idempotent, deterministic for a seed.

Weights are saved in fp16 (2.0 GB on disk instead of about 4 GB in fp32): `load_models` loads
the UNet in the precision asked for and the text encoder and VAE in fp32; fp16 values are exact in
fp32, so an fp32 run sees the very weights an fp16 run does (bf16 rounds them further).

    python -m benchmarks.sd15 [DIR]   # build (or find) it; prints the folder
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from vct.tiny_model import ModelSpec, build_random_model

SD15_SPEC = ModelSpec(
    kind="vct-sd15-arch-random",
    label="SD 1.5-architecture random model",
    text={"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
          "num_attention_heads": 12, "hidden_act": "quick_gelu", "projection_dim": 768,
          "layer_norm_eps": 1e-5},
    unet={"sample_size": 64, "in_channels": 4, "out_channels": 4,
          "block_out_channels": (320, 640, 1280, 1280), "layers_per_block": 2,
          "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                               "CrossAttnDownBlock2D", "DownBlock2D"),
          "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                             "CrossAttnUpBlock2D"),
          "cross_attention_dim": 768, "attention_head_dim": 8, "norm_num_groups": 32,
          "norm_eps": 1e-5, "act_fn": "silu", "downsample_padding": 1, "flip_sin_to_cos": True,
          "freq_shift": 0, "mid_block_scale_factor": 1, "center_input_sample": False},
    vae={"block_out_channels": (128, 256, 512, 512),
         "down_block_types": ("DownEncoderBlock2D",) * 4,
         "up_block_types": ("UpDecoderBlock2D",) * 4, "in_channels": 3, "out_channels": 3,
         "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "act_fn": "silu",
         "sample_size": 512, "scaling_factor": 0.18215},
    scheduler={"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
               "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
               "steps_offset": 1},
    scheduler_class="PNDMScheduler",
    vocab_size=49408,
    save_dtype="float16",
)
DISK_NEEDED = 5 * 2**30
"""Free bytes asked for before a build: the 2.0 GB folder staged next to its target, plus
margin (the fp32 components exist only in memory, about 4.3 GB of RAM)."""


def default_folder(seed: int = 0) -> Path:
    """Where the model is cached: under VCT_HOME (or ~/.cache/vct), as the tiny model is."""
    home = Path(os.environ.get("VCT_HOME", Path.home() / ".cache" / "vct"))
    return home / f"sd15-arch-random-seed{seed}"


def build_sd15_model(out_dir: str | Path | None = None, seed: int = 0) -> Path:
    """The SD 1.5-architecture random model's folder, built on first use (3.5 minutes on 2
    busy CPU cores) and then found. Refuses, before building, when the disk lacks room."""
    folder = Path(out_dir) if out_dir is not None else default_folder(seed)
    folder = folder.expanduser().absolute()
    if not (folder / "model_index.json").is_file():
        probe = next(p for p in (folder, *folder.parents) if p.exists())
        free = shutil.disk_usage(probe).free
        if free < DISK_NEEDED:
            raise OSError(f"{probe}: {free / 2**30:.1f} GiB free, the SD 1.5-architecture "
                          f"model needs about {DISK_NEEDED / 2**30:.0f} GiB to build; set "
                          "VCT_HOME to a larger disk")
    return build_random_model(folder, SD15_SPEC, seed)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(build_sd15_model(sys.argv[1] if len(sys.argv) > 1 else None))
