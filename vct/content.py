"""Stage 2: pivotal content inversion, the original's "Pivot Turning Inversion" (spec §4).

Null-text inversion with the conditional prompt "" (the inversion prompt): per sampling step s a
full text-state tensor c_s in the guidance's negative slot is fitted so that one guided DDIM step
from the reconstruction latent lands on the DDIM-inversion pivot (or, with content_target 'x0',
so that the predicted clean latent matches z_0). c_s is warm-started from c_{s-1}, each step gets
a fresh Adam with lr 0.01 (1 - s/100), and stops early when the pre-step loss drops below
1e-5 + 2e-5 s. The UNet is frozen: gradients reach only c_s.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from PIL import Image

from vct.config import ContentConfig
from vct.ddim import (
    alpha_at,
    ddim_map,
    guided,
    guided_step,
    make_scheduler,
    predicted_x0,
    step_size,
)
from vct.inversion import Progress, ddim_invert, encode_source
from vct.models import VCTModels
from vct.text import encode_prompt


@dataclass
class ContentStats:
    """How the fit went, per sampling step s: Adam iterations J_s and the first and last
    (pre-step) losses; the timestep grid it was fitted on; the working size; seconds spent."""

    iterations: list[int]
    first_losses: list[float]
    last_losses: list[float]
    timesteps: list[int]
    resolution: int
    batch_size: int = 1
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def total_iterations(self) -> int:
        """Sum of J_s: the fit's UNet forward+backward passes for this source (spec §8)."""
        return int(sum(self.iterations))


@dataclass
class ContentResult:
    """Stages 1-2 for one source: x_T and one content embedding per sampling step.

    `config` is what the embeddings were fitted for (T, w, grid, prompt): fusion reads it and
    refuses to run with anything else.
    """

    x_T: torch.Tensor  # (1, 4, h, w)
    embeddings: torch.Tensor  # (T, L, D), c_0..c_{T-1}
    # The pivots, for tests and debugging; fusion never reads them. invert_content(s) always
    # returns them; a content cache entry holds them only with the run setting
    # keep_trajectories (else they are None when loaded back).
    inversion_latents: torch.Tensor | None  # (T+1, 4, h, w): z_0, z*_0..z*_{T-1}
    # Fusion's B* replays this trajectory, so every content entry holds it.
    reconstruction: torch.Tensor  # (T+1, 4, h, w): x_T, then z-bar after each step
    config: ContentConfig
    stats: ContentStats


def content_losses(models: VCTModels, z: torch.Tensor, t: int, c: torch.Tensor,
                   eps_pos: torch.Tensor, target: torch.Tensor, a_t: torch.Tensor,
                   a_prev: torch.Tensor, cfg: ContentConfig) -> torch.Tensor:
    """Per-source MSE of one guided step (or its x0 prediction) against the target,
    differentiable in c. Batch rows are independent in the UNet, so the gradient of the sum
    reaching c_i is exactly the gradient of source i's own loss."""
    eps_neg = models.eps(z, t, c, stage="content", grad=True)
    eps_hat = guided(eps_neg, eps_pos, cfg.guidance_scale)
    if cfg.content_target == "pivot":
        pred = ddim_map(z, eps_hat, a_t, a_prev)
    else:
        pred = predicted_x0(z, eps_hat, a_t)
    return ((pred - target) ** 2).flatten(1).mean(dim=1)


def fit_content(models: VCTModels, latents: torch.Tensor, cond: torch.Tensor,
                cfg: ContentConfig, progress: Progress | None = None) -> list[dict]:
    """Fit c_0..c_{T-1} for B sources at once; `latents` is (B, T+1, 4, h, w), each row the
    pivot trajectory (z_0, z*_0, ..., z*_{T-1}) of one source.

    Every source keeps its own Adam, warm start and early stop: a source whose loss fell below
    the threshold leaves the batch, the others go on. The result for each source is the fit
    it would get alone, up to float rounding of the batched UNet call.
    """
    sched = make_scheduler(models.scheduler_config, cfg.num_inference_steps, cfg.steps_offset)
    dt = step_size(sched)
    T = cfg.num_inference_steps
    B = latents.shape[0]
    z = latents[:, -1].clone()
    conds = cond.expand(B, -1, -1)
    cs = [cond.clone() for _ in range(B)]
    stats = [{"embeddings": [], "reconstruction": [z[i:i + 1]], "first_losses": [],
              "last_losses": [], "iterations": []} for i in range(B)]
    for s, t in enumerate(int(t) for t in sched.timesteps):
        a_t, a_prev = alpha_at(sched, t), alpha_at(sched, t - dt)
        target = latents[:, T - s - 1] if cfg.content_target == "pivot" else latents[:, 0]
        with torch.no_grad():
            eps_pos = models.eps(z, t, conds, stage="content")
        params = [c.clone().requires_grad_(True) for c in cs]
        lr = cfg.inner_learning_rate * (1 - cfg.inner_lr_decay * s)
        opts = [torch.optim.Adam([p], lr=lr) for p in params]
        threshold = cfg.early_stop_epsilon + cfg.early_stop_slope * s
        losses: list[list[float]] = [[] for _ in range(B)]
        active = list(range(B))
        for _ in range(cfg.num_inner_steps):
            if not active:
                break
            per = content_losses(models, z[active], t, torch.cat([params[i] for i in active]),
                                 eps_pos[active], target[active], a_t, a_prev, cfg)
            for i in active:
                opts[i].zero_grad(set_to_none=True)
            per.sum().backward()
            values = per.tolist()
            for i in active:
                opts[i].step()
            for i, value in zip(active, values):
                losses[i].append(value)
            # the pre-step loss decides, as in the original
            active = [i for i, value in zip(active, values) if value >= threshold]
        cs = [p.detach().clone() for p in params]  # next step's Adam updates its own copy
        with torch.no_grad():
            # The advance reuses eps_pos: same math as the original's batched call, 1 call less.
            eps_neg = models.eps(z, t, torch.cat(cs), stage="content")
            z = guided_step(sched, z, eps_neg, eps_pos, cfg.guidance_scale, t)
        for i, st in enumerate(stats):
            st["embeddings"].append(cs[i])
            st["reconstruction"].append(z[i:i + 1])
            st["first_losses"].append(losses[i][0] if losses[i] else float("nan"))
            st["last_losses"].append(losses[i][-1] if losses[i] else float("nan"))
            st["iterations"].append(len(losses[i]))
        if progress:
            progress(s + 1, T)
    grid = [int(t) for t in sched.timesteps]
    return [{**st, "embeddings": torch.cat(st["embeddings"]),
             "reconstruction": torch.cat(st["reconstruction"]), "timesteps": grid}
            for st in stats]


def invert_content(models: VCTModels, image: Image.Image, cfg: ContentConfig, *,
                   progress: Progress | None = None) -> ContentResult:
    """Stages 1+2 for one source. Depends only on the source, the model and `cfg` (never on a
    concept), so its result is cached per distinct source."""
    return invert_contents(models, [image], cfg, progress=progress)[0]


def invert_contents(models: VCTModels, images: list[Image.Image], cfg: ContentConfig, *,
                    progress: Progress | None = None) -> list[ContentResult]:
    """Stages 1+2 for several sources in one batch (same config): every UNet call of the
    inversion, the fit and the advance carries all sources still fitting."""
    start = time.perf_counter()
    cond = encode_prompt(models, cfg.inversion_prompt)
    z0 = torch.cat([encode_source(models, image, cfg.resolution) for image in images])
    inv = ddim_invert(models, z0, cond.expand(len(images), -1, -1), cfg,
                      progress=(lambda i, n: progress(i, 2 * n)) if progress else None)
    t_inv = time.perf_counter() - start
    trajectories = inv.latents.view(-1, len(images), *z0.shape[1:]).transpose(0, 1)
    fits = fit_content(models, trajectories, cond, cfg,
                       progress=(lambda i, n: progress(n + i, 2 * n)) if progress else None)
    seconds = {"inversion": t_inv / len(images),
               "fit": (time.perf_counter() - start - t_inv) / len(images)}
    results = []
    for i, fit in enumerate(fits):
        stats = ContentStats(iterations=fit["iterations"], first_losses=fit["first_losses"],
                             last_losses=fit["last_losses"], timesteps=fit["timesteps"],
                             resolution=int(z0.shape[-1] * models.vae_scale_factor),
                             batch_size=len(images), seconds=dict(seconds))
        traj = trajectories[i].contiguous()
        results.append(ContentResult(x_T=traj[-1:].clone().cpu(),
                                     embeddings=fit["embeddings"].cpu(),
                                     inversion_latents=traj.cpu(),
                                     reconstruction=fit["reconstruction"].cpu(),
                                     config=cfg, stats=stats))
    return results
