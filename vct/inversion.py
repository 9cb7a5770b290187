"""Stage 1: DDIM inversion of the source image (spec §3).

Guidance 1 with the inversion prompt, eta 0, ascending timesteps 0, dt, ..., queried at the
destination timestep on the less noisy latent: exactly diffusers' DDIMInverseScheduler.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from PIL import Image

from vct.config import ContentConfig
from vct.ddim import make_inverse_scheduler
from vct.images import source_pixels
from vct.models import VCTModels

Progress = Callable[[int, int], None]
"""(step, total): told after each step of a long stage (a progress bar's update)."""


@dataclass
class InversionTrajectory:
    """z_0 and the pivots z*_0..z*_{T-1}; latents[k+1] = z*_k, so latents[-1] is x_T."""

    latents: torch.Tensor  # (T+1, 4, h, w)
    timesteps: list[int]  # ascending inversion grid tau_0..tau_{T-1}

    @property
    def x_T(self) -> torch.Tensor:
        return self.latents[-1:]


def working_size(models: VCTModels, resolution: int | None) -> int:
    size = resolution or models.native_resolution
    if size % models.vae_scale_factor:
        raise ValueError(f"resolution {size} is not a multiple of the VAE factor "
                         f"{models.vae_scale_factor}")
    return size


@torch.no_grad()
def encode_source(models: VCTModels, image: Image.Image, resolution: int | None) -> torch.Tensor:
    """z_0 = VAE posterior mean x scaling factor of the center-cropped, resized source."""
    pixels = source_pixels(image, working_size(models, resolution)).to(models.device)
    mean = models.vae.encode(pixels.to(models.vae.dtype)).latent_dist.mean
    return mean.float() * models.latent_scale


@torch.no_grad()
def ddim_invert(models: VCTModels, z0: torch.Tensor, cond: torch.Tensor, cfg: ContentConfig,
                progress: Progress | None = None) -> InversionTrajectory:
    """Run the inverse DDIM chain from z_0. At steps_offset 0 step 0 is the identity and may
    skip its UNet call; at the original's offset 1 it goes from a(-19) to a(1) and runs."""
    sched = make_inverse_scheduler(models.scheduler_config, cfg.num_inference_steps,
                                   cfg.steps_offset)
    timesteps = [int(t) for t in sched.timesteps]
    z = z0
    latents = [z0]
    for k, t in enumerate(timesteps):
        # a(t - dt) == a(t) only at t == 0 (set_alpha_to_one off): that step maps z to itself.
        if not (t == 0 and cfg.skip_identity_step):
            eps = models.eps(z, t, cond, stage="inversion")
            z = sched.step(eps, t, z).prev_sample
        latents.append(z)
        if progress:
            progress(k + 1, len(timesteps))
    return InversionTrajectory(latents=torch.cat(latents), timesteps=timesteps)
