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

import torch
import torch.nn.functional as F
from PIL import Image

from vct.artifacts import ContentResult
from vct.config import ContentConfig, to_dict
from vct.ddim import alpha_at, ddim_map, guided, make_scheduler, predicted_x0, step_size
from vct.inversion import Progress, ddim_invert, encode_source
from vct.models import VCTModels
from vct.text import encode_prompt


def content_loss(models: VCTModels, z: torch.Tensor, t: int, c: torch.Tensor,
                 eps_pos: torch.Tensor, target: torch.Tensor, a_t: torch.Tensor,
                 a_prev: torch.Tensor, cfg: ContentConfig) -> torch.Tensor:
    """MSE of one guided step (or its x0 prediction) against the target, differentiable in c."""
    eps_neg = models.eps(z, t, c, stage="content", grad=True)
    eps_hat = guided(eps_neg, eps_pos, cfg.guidance_scale)
    if cfg.content_target == "pivot":
        return F.mse_loss(ddim_map(z, eps_hat, a_t, a_prev), target)
    return F.mse_loss(predicted_x0(z, eps_hat, a_t), target)


def fit_content(models: VCTModels, latents: torch.Tensor, cond: torch.Tensor,
                cfg: ContentConfig, progress: Progress | None = None) -> dict:
    """Fit c_0..c_{T-1} along the pivot trajectory `latents` (z_0, z*_0, ..., z*_{T-1})."""
    sched = make_scheduler(models.scheduler_config, cfg.num_inference_steps, cfg.steps_offset)
    dt = step_size(sched)
    T = cfg.num_inference_steps
    z = latents[-1:].clone()
    c = cond.clone()
    embeddings, recon = [], [z]
    first_losses, last_losses, iterations = [], [], []
    for s, t in enumerate(int(t) for t in sched.timesteps):
        a_t, a_prev = alpha_at(sched, t), alpha_at(sched, t - dt)
        target = latents[T - s - 1: T - s] if cfg.content_target == "pivot" else latents[:1]
        with torch.no_grad():
            eps_pos = models.eps(z, t, cond, stage="content")
        c = c.clone().requires_grad_(True)
        opt = torch.optim.Adam([c], lr=cfg.inner_learning_rate * (1 - cfg.inner_lr_decay * s))
        threshold = cfg.early_stop_epsilon + cfg.early_stop_slope * s
        losses = []
        for _ in range(cfg.num_inner_steps):
            loss = content_loss(models, z, t, c, eps_pos, target, a_t, a_prev, cfg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            if losses[-1] < threshold:  # the pre-step loss, as the original checks it
                break
        c = c.detach()
        embeddings.append(c.clone())  # the next step's Adam updates c in place
        with torch.no_grad():
            # The advance reuses eps_pos: same math as the original's batched call, 1 call less.
            eps_neg = models.eps(z, t, c, stage="content")
            z = ddim_map(z, guided(eps_neg, eps_pos, cfg.guidance_scale), a_t, a_prev)
        recon.append(z)
        first_losses.append(losses[0] if losses else float("nan"))
        last_losses.append(losses[-1] if losses else float("nan"))
        iterations.append(len(losses))
        if progress:
            progress(s + 1, T)
    return {"embeddings": torch.cat(embeddings), "reconstruction": torch.cat(recon),
            "timesteps": [int(t) for t in sched.timesteps], "first_losses": first_losses,
            "last_losses": last_losses, "iterations": iterations}


def invert_content(models: VCTModels, image: Image.Image, cfg: ContentConfig, *,
                   source_sha256: str = "", progress: Progress | None = None) -> ContentResult:
    """Stages 1+2 for one source. Depends only on the source, the model and `cfg` (never on a
    concept), so its result is cached per distinct source."""
    start = time.perf_counter()
    evals_before = dict(models.unet_evals)
    cond = encode_prompt(models, cfg.inversion_prompt)
    z0 = encode_source(models, image, cfg.resolution)
    inv = ddim_invert(models, z0, cond, cfg,
                      progress=(lambda i, n: progress(i, 2 * n)) if progress else None)
    t_inv = time.perf_counter() - start
    fit = fit_content(models, inv.latents, cond, cfg,
                      progress=(lambda i, n: progress(n + i, 2 * n)) if progress else None)
    evals = {k: v - evals_before.get(k, 0) for k, v in models.unet_evals.items()
             if v != evals_before.get(k, 0)}
    meta = {
        "config": to_dict(cfg),
        "num_inference_steps": cfg.num_inference_steps,
        "guidance_scale": cfg.guidance_scale,
        "inversion_prompt": cfg.inversion_prompt,
        "timesteps": fit["timesteps"],
        "resolution": int(z0.shape[-1] * models.vae_scale_factor),
        "source_sha256": source_sha256,
        "model_identity": models.identity,
        "iterations": fit["iterations"],
        "total_iterations": int(sum(fit["iterations"])),
        "first_losses": fit["first_losses"],
        "last_losses": fit["last_losses"],
        "unet_evals": evals,
        "seconds": {"inversion": t_inv, "fit": time.perf_counter() - start - t_inv},
    }
    return ContentResult(meta=meta, x_T=inv.x_T.cpu(), embeddings=fit["embeddings"].cpu(),
                         inversion_latents=inv.latents.cpu(),
                         reconstruction=fit["reconstruction"].cpu())
