"""The baselines VCT is measured against, on the same model and the same DDIM sampler.

- `text_to_image`: classifier-free-guided DDIM from seeded noise, conditioned on any text
  states (a caption, or a learned concept's prompt alone).
- `sdedit`: img2img / SDEdit: the source's latent noised to `strength` of the schedule, then
  the same guided DDIM from there. Strength 1 starts at the first grid step (almost pure
  noise, the source barely present); strength 0 is the source through the VAE.

Both reuse VCT's own pieces (the scheduler, `models.eps`, prompt encoding, VAE encode and
decode), so a difference in the benchmark is the method's, not a different sampler's.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from vct.ddim import guided, make_scheduler
from vct.fusion import decode
from vct.inversion import encode_source
from vct.models import VCTModels
from vct.text import encode_prompt

DEFAULT_STEPS = 50
DEFAULT_GUIDANCE = 7.5
DEFAULT_OFFSET = 1


def initial_noise(models: VCTModels, count: int, seed: int, resolution: int | None = None
                  ) -> torch.Tensor:
    """Seeded N(0, I) latents on the CPU generator (the same numbers on every device)."""
    size = (resolution or models.native_resolution) // models.vae_scale_factor
    channels = int(models.unet.config.in_channels)
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((count, channels, size, size), generator=gen).to(models.device)


@torch.no_grad()
def guided_ddim(models: VCTModels, latents: torch.Tensor, states: torch.Tensor,
                timesteps: list[int], num_steps: int, guidance: float,
                steps_offset: int = DEFAULT_OFFSET) -> torch.Tensor:
    """Classifier-free-guided DDIM over `timesteps` (a tail of the T-step grid), the
    unconditional slot being the empty prompt; `states` is (1 or N, L, D)."""
    sched = make_scheduler(models.scheduler_config, num_steps, steps_offset)
    n = latents.shape[0]
    pos = states.to(models.device).expand(n, -1, -1)
    neg = encode_prompt(models, "").expand(n, -1, -1)
    for t in timesteps:
        eps = models.eps(torch.cat([latents, latents]), t, torch.cat([neg, pos]),
                         stage="baseline")
        eps_neg, eps_pos = eps.chunk(2)
        latents = sched.step(guided(eps_neg, eps_pos, guidance), t, latents).prev_sample
    return latents


def text_to_image(models: VCTModels, states: torch.Tensor, seed: int, count: int = 1, *,
                  num_steps: int = DEFAULT_STEPS, guidance: float = DEFAULT_GUIDANCE,
                  steps_offset: int = DEFAULT_OFFSET) -> np.ndarray:
    """`count` images (uint8 NHWC) from seeded noise under the text states."""
    sched = make_scheduler(models.scheduler_config, num_steps, steps_offset)
    grid = [int(t) for t in sched.timesteps]
    x = initial_noise(models, count, seed)
    return decode(models, guided_ddim(models, x, states, grid, num_steps, guidance,
                                      steps_offset))


def sdedit_start(num_steps: int, strength: float) -> int:
    """Index of the first grid step SDEdit runs: it skips the first T - int(T * strength)
    steps, as diffusers' img2img does."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    return num_steps - min(int(num_steps * strength), num_steps)


@torch.no_grad()
def sdedit(models: VCTModels, image: Image.Image, states: torch.Tensor, strength: float,
           seed: int, *, num_steps: int = DEFAULT_STEPS, guidance: float = DEFAULT_GUIDANCE,
           steps_offset: int = DEFAULT_OFFSET, resolution: int | None = None) -> np.ndarray:
    """img2img: the source's latent noised to the grid step `strength` reaches, then denoised
    under the text states. Returns uint8 (1, H, W, 3)."""
    sched = make_scheduler(models.scheduler_config, num_steps, steps_offset)
    grid = [int(t) for t in sched.timesteps][sdedit_start(num_steps, strength):]
    z0 = encode_source(models, image, resolution)
    if not grid:
        return decode(models, z0)
    noise = initial_noise(models, 1, seed, resolution)
    z = sched.add_noise(z0, noise, torch.tensor([grid[0]]))
    return decode(models, guided_ddim(models, z, states, grid, num_steps, guidance,
                                      steps_offset))
