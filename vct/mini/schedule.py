"""Pure functions of the training schedule: learning rate, EMA decay, Min-SNR loss weights."""

from __future__ import annotations

import math

import torch


def lr_at(step: int, total: int, base: float, warmup: int, floor: float = 0.1) -> float:
    """Linear warm-up over `warmup` steps, then a cosine decay to `floor` x `base` at `total`:
    a small model at a high learning rate needs the warm-up to not diverge early."""
    if warmup and step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def ema_decay(step: int, max_decay: float) -> float:
    """The EMA's decay at `step`: small at first (the average forgets the random init fast),
    growing to `max_decay`."""
    return min(max_decay, (1.0 + step) / (10.0 + step))


def min_snr_weights(alphas_cumprod: torch.Tensor, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma weights for an epsilon-prediction loss: min(SNR, gamma) / SNR per sample.

    Why: the low-noise timesteps dominate a plain epsilon loss without improving samples;
    clamping their weight speeds up convergence (Hang et al., 2023)."""
    a = alphas_cumprod[t]
    snr = a / (1.0 - a)
    return torch.clamp(snr, max=gamma) / snr


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, parameter by parameter."""
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1.0 - decay)
