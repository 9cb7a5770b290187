"""Draw images from captions with a mini model (or any SD 1.x folder), with classifier-free
guidance and DDIM, as SD 1.5 is sampled: how the model card's grid and the benchmark's
caption-accuracy check make their images."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def load_pipeline(model: str | Path):
    """A StableDiffusionPipeline in fp32 on the CPU; `model` may be a folder or 'mini'/'tiny'."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from vct.batch.engine import named_model_folder

    folder = named_model_folder(str(model))
    pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32,
                                                   local_files_only=True, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def sample_captions(model, captions: Sequence[str], *, steps: int = 50,
                    guidance: float = 7.5, seed: int = 0, batch: int = 16) -> list[Image.Image]:
    """One image per caption at the model's native size. Image i uses seed `seed + i`, so it
    does not depend on the batch it was drawn in. `model`: a loaded pipeline, or what
    :func:`load_pipeline` takes."""
    pipe = model if hasattr(model, "unet") else load_pipeline(model)
    size = int(pipe.unet.config.sample_size) * pipe.vae_scale_factor
    images: list[Image.Image] = []
    for start in range(0, len(captions), batch):
        chunk = list(captions[start:start + batch])
        gens = [torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))]
        out = pipe(chunk, height=size, width=size, num_inference_steps=steps,
                   guidance_scale=guidance, generator=gens)
        images.extend(out.images)
    return images


def grid(images: Sequence[Image.Image], cols: int, scale: int = 1) -> Image.Image:
    """The images tiled row by row (`scale` times larger, nearest-neighbour)."""
    arrays = [np.asarray(im.convert("RGB")) for im in images]
    h, w = arrays[0].shape[:2]
    rows = -(-len(arrays) // cols)
    canvas = np.full((rows * h, cols * w, 3), 255, np.uint8)
    for i, a in enumerate(arrays):
        r, c = divmod(i, cols)
        canvas[r * h:(r + 1) * h, c * w:(c + 1) * w] = a
    out = Image.fromarray(canvas)
    return out.resize((out.width * scale, out.height * scale), Image.NEAREST) if scale > 1 else out
