"""The mini model's architecture: SD 1.x's layout at a size that trains in about an hour on
2 CPU cores and runs VCT's thousands of UNet calls in minutes.

Same component classes as SD 1.5 (CLIP tokenizer and text encoder, UNet2DConditionModel with
cross-attention down to the highest latent resolution, AutoencoderKL, DDIM's schedule); the VAE
has factor 4 (64 px images, 16x16x4 latents) so the 8 px textures survive it.
"""

from __future__ import annotations

from dataclasses import replace

from vct.mini.data import CAPTION_WORDS, SIZE
from vct.tiny_model import TINY_SPEC, ModelSpec

MINI_KIND = "vct-mini-sd1"

MINI_SPEC = ModelSpec(
    kind=MINI_KIND,
    label="mini model",
    text={"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 2,
          "num_attention_heads": 4},
    unet={"sample_size": SIZE // 4, "in_channels": 4, "out_channels": 4,
          "block_out_channels": (32, 64, 128), "layers_per_block": 1,
          "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
          "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
          "cross_attention_dim": 128, "attention_head_dim": 4, "norm_num_groups": 32},
    vae={"block_out_channels": (32, 64, 64), "down_block_types": ("DownEncoderBlock2D",) * 3,
         "up_block_types": ("UpDecoderBlock2D",) * 3, "latent_channels": 4,
         "layers_per_block": 1, "norm_num_groups": 32, "sample_size": SIZE,
         "scaling_factor": 1.0},
    scheduler=dict(TINY_SPEC.scheduler),
    words=CAPTION_WORDS,
)
"""The shipped model's sizes (scaling_factor is set from the trained latents)."""

TEST_SPEC = replace(
    MINI_SPEC,
    label="mini test model",
    text={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
          "num_attention_heads": 2},
    unet={**MINI_SPEC.unet, "block_out_channels": (32, 32, 32), "cross_attention_dim": 32,
          "attention_head_dim": 2},
    vae={**MINI_SPEC.vae, "block_out_channels": (32, 32, 32)},
)
"""The same layout, as small as diffusers allows: for tests of the training loop."""

SPECS = {"mini": MINI_SPEC, "test": TEST_SPEC}
