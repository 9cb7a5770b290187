"""The DDIM pieces shared by every stage: the faithful scheduler, its grid and the map D.

The original builds its scheduler by hand with steps_offset 0, but its StableDiffusionPipeline
rewrites that to 1 on the same object, so every stage runs on 981..1 (spec §2): our default.
Inversion steps go through diffusers' inverse scheduler. The content fit's advance and every
fusion branch step with `ddim_map`, one function, so fusion's B* can replay the fit exactly.
"""

from __future__ import annotations

import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler


def scheduler_kwargs(model_config: dict, steps_offset: int) -> dict:
    """The original's DDIM arguments, taking the beta schedule from the model's own config."""
    return {
        "num_train_timesteps": int(model_config.get("num_train_timesteps", 1000)),
        "beta_start": float(model_config.get("beta_start", 0.00085)),
        "beta_end": float(model_config.get("beta_end", 0.012)),
        "beta_schedule": model_config.get("beta_schedule", "scaled_linear"),
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": steps_offset,
        "timestep_spacing": "leading",
        "prediction_type": "epsilon",
    }


def make_scheduler(model_config: dict, num_steps: int, steps_offset: int) -> DDIMScheduler:
    sched = DDIMScheduler(**scheduler_kwargs(model_config, steps_offset))
    sched.set_timesteps(num_steps)
    return sched


def make_inverse_scheduler(model_config: dict, num_steps: int,
                           steps_offset: int) -> DDIMInverseScheduler:
    sched = DDIMInverseScheduler(**scheduler_kwargs(model_config, steps_offset))
    sched.set_timesteps(num_steps)
    return sched


def alpha_at(sched: DDIMScheduler, t: int) -> torch.Tensor:
    """a(t) = alphas_cumprod[t] for t >= 0, and alphas_cumprod[0] below (set_alpha_to_one off)."""
    return sched.alphas_cumprod[t] if t >= 0 else sched.final_alpha_cumprod


def step_size(sched: DDIMScheduler) -> int:
    return sched.config.num_train_timesteps // sched.num_inference_steps


def ddim_map(z: torch.Tensor, eps: torch.Tensor, a_from: torch.Tensor,
             a_to: torch.Tensor) -> torch.Tensor:
    """D(z, eps, t_f, t_o) = sqrt(a_o) (z - sqrt(1-a_f) eps) / sqrt(a_f) + sqrt(1-a_o) eps."""
    a_from = a_from.to(z)
    a_to = a_to.to(z)
    x0 = (z - (1 - a_from).sqrt() * eps) / a_from.sqrt()
    return a_to.sqrt() * x0 + (1 - a_to).sqrt() * eps


def guided_step(sched: DDIMScheduler, z: torch.Tensor, eps_neg: torch.Tensor,
                eps_pos: torch.Tensor, w: float, t: int) -> torch.Tensor:
    """One guided DDIM step from t to t - dt: the content fit's advance and every fusion branch
    take it, so fusion's B* can replay the fit bit for bit."""
    return ddim_map(z, guided(eps_neg, eps_pos, w), alpha_at(sched, t),
                    alpha_at(sched, t - step_size(sched)))


def predicted_x0(z: torch.Tensor, eps: torch.Tensor, a_t: torch.Tensor) -> torch.Tensor:
    a_t = a_t.to(z)
    return (z - (1 - a_t).sqrt() * eps) / a_t.sqrt()


def guided(eps_neg: torch.Tensor, eps_pos: torch.Tensor, w: float) -> torch.Tensor:
    """CFG with the learned content embedding in the negative slot: e(c) + w (e(pos) - e(c))."""
    return eps_neg + w * (eps_pos - eps_neg)
