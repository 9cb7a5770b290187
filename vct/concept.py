"""Stage 3: multi-vector concept inversion on the reference image (spec §5).

Plain textual inversion of one placeholder made of n vectors, prompt = the placeholder alone, with
the noise loss plus (use_l1) a latent L1 on the predicted clean latent, AdamW with weight decay,
gradient accumulation, random flips and a fresh VAE posterior sample per micro-step. Only the n
rows are parameters; the rest of the embedding table cannot change (see vct/text.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from PIL import Image

from vct.config import ConceptConfig
from vct.ddim import make_scheduler
from vct.images import reference_pixels
from vct.inversion import Progress, working_size
from vct.models import VCTModels
from vct.text import concept_prompt_ids, concept_rows, encode, word_rows


@dataclass
class ConceptStats:
    """One training loss per optimizer update, the learning rate actually used, seconds."""

    losses: list[float]
    effective_lr: float
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class ConceptResult:
    """Stage 3 for one reference: the n learned token vectors (n, D) and what made them."""

    vectors: torch.Tensor
    config: ConceptConfig
    stats: ConceptStats


@torch.no_grad()
def reference_posteriors(models: VCTModels, image: Image.Image,
                         cfg: ConceptConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """VAE posterior (mean, std) of the reference and of its mirror image.

    The original encodes the augmented image every micro-step; the image has only two versions
    (flipped or not), so the posterior is computed once per version and a fresh sample drawn
    from it each micro-step: the same distribution, 2 VAE encodes instead of 4 per update.
    """
    pixels = reference_pixels(image, working_size(models, cfg.reference_resolution), cfg.center_crop)
    both = torch.cat([pixels, pixels.flip(-1)]).to(models.device, models.vae.dtype)
    dist = models.vae.encode(both).latent_dist
    return dist.mean.float(), dist.std.float()


def concept_loss(models: VCTModels, rows: torch.Tensor, z0: torch.Tensor, t: torch.Tensor,
                 noise: torch.Tensor, alphas: torch.Tensor, cfg: ConceptConfig) -> torch.Tensor:
    """Noise MSE + l1_weight * mean |x0_hat - z0|, averaged over the micro-batch."""
    a = alphas[t].view(-1, 1, 1, 1).to(z0)
    z_t = a.sqrt() * z0 + (1 - a).sqrt() * noise
    with concept_rows(models, rows):
        states = encode(models, concept_prompt_ids(models, rows.shape[0]))
    states = states.expand(z0.shape[0], -1, -1)
    eps = models.eps(z_t, t.to(models.device), states, stage="concept", grad=True)
    loss = F.mse_loss(eps, noise)
    if cfg.use_l1:
        x0_hat = (z_t - (1 - a).sqrt() * eps) / a.sqrt()
        loss = loss + cfg.l1_weight * (x0_hat - z0).abs().mean()
    return loss


REPEATS = 100
"""The original's dataset repeats its images this many times per epoch (``repeats=100``)."""


class ImageOrder:
    """Which reference image each micro-step draws, as the original's loader does: its
    dataset is the images repeated REPEATS times, shuffled every epoch (one image a
    micro-step). Its own generator, so the flips, timesteps and noise of the micro-steps are
    those of a one-image concept; with one image it draws nothing."""

    def __init__(self, count: int, seed: int):
        self.count = count
        self.gen = torch.Generator().manual_seed(seed)
        self.pending: list[int] = []

    def take(self, n: int) -> torch.Tensor:
        """The next ``n`` image indices."""
        if self.count == 1:
            return torch.zeros(n, dtype=torch.long)
        while len(self.pending) < n:
            epoch = torch.randperm(self.count * REPEATS, generator=self.gen) % self.count
            self.pending += epoch.tolist()
        out, self.pending = self.pending[:n], self.pending[n:]
        return torch.tensor(out, dtype=torch.long)


def draw_microbatch(gen: torch.Generator, mean: torch.Tensor, std: torch.Tensor, count: int,
                    cfg: ConceptConfig, num_train_timesteps: int, scale: float,
                    images: torch.Tensor | None = None):
    """One augmentation draw per micro-step, all from the seeded CPU generator (reproducible).
    ``mean``/``std`` hold each image and its mirror (2 rows an image); ``images`` says which
    image each micro-step uses (the first when None)."""
    flips = (torch.rand(count, generator=gen) < cfg.flip_p).long()
    sample = torch.randn((count, *mean.shape[1:]), generator=gen)
    t = torch.randint(0, num_train_timesteps, (count,), generator=gen)
    noise = torch.randn((count, *mean.shape[1:]), generator=gen)
    dev = mean.device
    rows = flips if images is None else 2 * images + flips
    z0 = (mean[rows.to(dev)] + std[rows.to(dev)] * sample.to(dev)) * scale
    return z0, t, noise.to(dev)


def learn_concept(models: VCTModels, image: Image.Image | list[Image.Image], cfg: ConceptConfig,
                  *, progress: Progress | None = None) -> ConceptResult:
    """Learn the concept's n vectors from one reference image or several (each micro-step
    draws one, :class:`ImageOrder`). Depends only on the references, the model and `cfg`
    (seed included), so its result is cached per distinct set of references.

    A job runs on one device, so the lr scaling uses one process: the same key must never hold
    two results depending on how many GPUs the executor had."""
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(cfg.seed)
    images = image if isinstance(image, list) else [image]
    posteriors = [reference_posteriors(models, one, cfg) for one in images]
    mean = torch.cat([m for m, _ in posteriors])
    std = torch.cat([s for _, s in posteriors])
    order = ImageOrder(len(images), cfg.seed)
    n_train = int(models.scheduler_config.get("num_train_timesteps", 1000))
    alphas = make_scheduler(models.scheduler_config, 1, 0).alphas_cumprod.to(models.device)
    init = word_rows(models, cfg.initializer_word, cfg.num_vectors)
    rows = init.clone().to(models.device).requires_grad_(True)
    opt = torch.optim.AdamW([rows], lr=cfg.effective_lr(),
                            betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon,
                            weight_decay=cfg.adam_weight_decay)
    accum = cfg.gradient_accumulation_steps
    losses: list[float] = []
    for step in range(cfg.max_train_steps):
        opt.zero_grad(set_to_none=True)
        total = 0.0
        if cfg.batch_microsteps:
            z0, t, noise = draw_microbatch(gen, mean, std, accum, cfg, n_train,
                                           models.latent_scale, order.take(accum))
            loss = concept_loss(models, rows, z0, t, noise, alphas, cfg)
            loss.backward()
            total = loss.item()
        else:
            for _ in range(accum):
                z0, t, noise = draw_microbatch(gen, mean, std, 1, cfg, n_train,
                                               models.latent_scale, order.take(1))
                loss = concept_loss(models, rows, z0, t, noise, alphas, cfg) / accum
                loss.backward()
                total += loss.item()
        opt.step()
        losses.append(total)
        if progress:
            progress(step + 1, cfg.max_train_steps)
    stats = ConceptStats(losses=losses, effective_lr=cfg.effective_lr(),
                         seconds={"concept": time.perf_counter() - start})
    return ConceptResult(vectors=rows.detach().cpu().float(), config=cfg, stats=stats)
