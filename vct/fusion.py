"""Stage 4: content-concept fusion, the two-branch sampler (spec §6).

Both branches start from the source's x_T. The content-matching branch B* is guided from c_s
towards the inversion prompt, which is exactly the stage-2 fit's advance: so B* replays the fit's
stored reconstruction z-bar bit for bit (as the original's B* does, its arithmetic being the
fit's), and only B*'s conditional pass runs, for the attention it lends. Each main branch B_k is
guided from c_s towards its concept prompt, with the same single weight w and the fit's step
function, and borrows B*'s attention through the controller. There is no noise-space mixing
across branches. Several concepts for one source share one B* (it depends on the source only):
all 1 + 2K passes of a step go through one batched UNet call.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from vct.attention import AttentionController, install, restore, token_edit
from vct.concept import ConceptResult
from vct.config import ContentConfig, FusionConfig
from vct.content import ContentResult
from vct.ddim import guided_step, make_scheduler
from vct.errors import UserError
from vct.images import to_uint8
from vct.inversion import Progress
from vct.models import VCTModels
from vct.text import encode_concept, encode_prompt


class FusionMismatch(UserError, ValueError):
    """The content result was made with settings fusion cannot reproduce (T, w, grid, prompt)."""


@dataclass
class FusionStats:
    """What the sampler did: branches (1 + K), the injection windows in steps, seconds."""

    branches: int
    cross_steps: int
    self_steps: int
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class FusionResult:
    """Output images of the B branches (uint8 NHWC) and what the run cost."""

    images: np.ndarray
    latents: torch.Tensor  # (1+K, 4, h, w): B*, then each B_k, after the last step
    config: FusionConfig
    stats: FusionStats
    star_trajectory: torch.Tensor | None = None  # (T+1, 4, h, w) when asked for
    controller_log: list = field(default_factory=list)


def check_content(content: ContentResult, expected: ContentConfig | None) -> ContentConfig:
    """Rebuild the content config the result was made with, and refuse a mismatch."""
    made_with = content.config
    if expected is not None:
        for name in ("num_inference_steps", "guidance_scale", "steps_offset",
                     "inversion_prompt"):
            if getattr(expected, name) != getattr(made_with, name):
                raise FusionMismatch(
                    f"content result was made with {name}={getattr(made_with, name)!r}, but "
                    f"{getattr(expected, name)!r} was asked for; recompute the content")
    if len(content.stats.timesteps) != made_with.num_inference_steps:
        raise FusionMismatch("content result has no timestep grid matching its T")
    if content.embeddings.shape[0] != made_with.num_inference_steps:
        raise FusionMismatch(f"content result holds {content.embeddings.shape[0]} embeddings for "
                             f"T={made_with.num_inference_steps}")
    recon = content.reconstruction
    if recon is None or recon.shape[0] != made_with.num_inference_steps + 1:
        raise FusionMismatch("content result holds no reconstruction trajectory of T+1 latents "
                             "for fusion's B* to replay; recompute the content")
    if made_with.inversion_prompt:
        raise FusionMismatch("fusion's token map assumes the inversion prompt \"\" (the "
                             "original's); recompute the content with an empty prompt")
    return made_with


@torch.no_grad()
def fuse(models: VCTModels, content: ContentResult, concepts: list[ConceptResult | None],
         cfg: FusionConfig, *, expected_content: ContentConfig | None = None,
         progress: Progress | None = None, keep_trajectory: bool = False,
         record_controller: bool = False, control: bool = True) -> FusionResult:
    """Translate one source towards each concept (None = the empty edit prompt).

    `control=False` runs the same batch without the attention controller (tests and ablations).
    """
    start = time.perf_counter()
    ccfg = check_content(content, expected_content)
    T, w = ccfg.num_inference_steps, ccfg.guidance_scale
    sched = make_scheduler(models.scheduler_config, T, ccfg.steps_offset)
    grid = [int(t) for t in sched.timesteps]
    if grid != content.stats.timesteps:
        raise FusionMismatch(f"timestep grid {grid[:3]}... differs from the content's "
                             f"{content.stats.timesteps[:3]}...; recompute the content")
    e_null = encode_prompt(models, ccfg.inversion_prompt)
    positives = [e_null]
    edits = []
    length = e_null.shape[1]
    for concept in concepts:
        if concept is None:
            positives.append(e_null)
            edits.append(token_edit(length, 0, cfg))
        else:
            positives.append(encode_concept(models, concept.vectors))
            edits.append(token_edit(length, concept.vectors.shape[0], cfg))
    k = len(concepts)
    pos = torch.cat(positives)
    # B* replays the fit: its latent at step s is the fit's z-bar_s, bit for bit, so only its
    # conditional pass (the attention it lends) is computed; its unconditional pass is not.
    replay = content.reconstruction.to(models.device)
    edit_latents = content.x_T.to(models.device).expand(k, -1, -1, -1).clone()
    embeddings = content.embeddings.to(models.device)
    controller = AttentionController(cfg, T, edits, record=record_controller)
    previous = install(models.unet, controller) if control else None
    try:
        for s, t in enumerate(grid):
            controller.step = s
            # [uncond: B_1..B_K | cond: B*, B_1..B_K], the layout the controller expects
            batch = torch.cat([edit_latents, replay[s:s + 1], edit_latents])
            neg = embeddings[s:s + 1].expand(k, -1, -1)
            eps = models.eps(batch, t, torch.cat([neg, pos]), stage="fusion")
            eps_neg, eps_pos = eps[:k], eps[k + 1:]
            edit_latents = guided_step(sched, edit_latents, eps_neg, eps_pos, w, t)
            if progress:
                progress(s + 1, T)
    finally:
        if previous is not None:
            restore(models.unet, previous)
    latents = torch.cat([replay[T:T + 1], edit_latents])
    t_sample = time.perf_counter() - start
    images = decode(models, latents[1:])
    stats = FusionStats(branches=1 + k, cross_steps=controller.cross_steps,
                        self_steps=controller.self_steps,
                        seconds={"fusion": t_sample,
                                 "decode": time.perf_counter() - start - t_sample})
    return FusionResult(images=images, latents=latents.cpu(), config=cfg, stats=stats,
                        star_trajectory=content.reconstruction.cpu() if keep_trajectory else None,
                        controller_log=controller.log)


@torch.no_grad()
def decode(models: VCTModels, latents: torch.Tensor) -> np.ndarray:
    """VAE decode of z / scaling, then (x/2+0.5) clamped, x255, truncated to uint8."""
    scaled = (latents / models.latent_scale).to(models.device, models.vae.dtype)
    return to_uint8(models.vae.decode(scaled).sample)
