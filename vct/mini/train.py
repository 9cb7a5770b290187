"""Train the mini model: the VAE first, its latents cached, its decoder fine-tuned on them,
then the UNet and the text encoder together (`vct train-mini DIR`).

Seeded and resumable: every step draws its batch, noise and timesteps from a generator seeded
by (seed, stage, step), and the weights, EMA and optimizer state are checkpointed (safetensors +
JSON) every few steps, so a killed run continues exactly where its last checkpoint left it.
Losses go to DIR/losses.jsonl, the latest model (EMA weights) to DIR/model as a normal diffusers
SD 1.x folder, the numbers of the model card to DIR/summary.json.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from vct.mini import data as D
from vct.mini.checkpoint import load_checkpoint, save_checkpoint
from vct.mini.schedule import ema_decay, ema_update, lr_at, min_snr_weights
from vct.mini.spec import SPECS

MODEL_MARKER = "vct_mini_model.json"
STAGE_IDS = {"vae": 1, "unet": 2, "decoder": 3}


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on; saved in DIR/config.json and checked on resume."""

    spec: str = "mini"
    seed: int = 0
    images: int = 16000
    heldout: int = 256
    vae_steps: int = 800
    vae_batch: int = 16
    vae_lr: float = 1e-3
    kl_weight: float = 1e-6
    decoder_steps: int = 800
    decoder_lr: float = 5e-4
    unet_steps: int = 2500
    unet_batch: int = 32
    unet_lr: float = 5e-4
    warmup: int = 100
    min_snr_gamma: float = 5.0
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    checkpoint_every: int = 100

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def step_generator(seed: int, stage: str, step: int) -> torch.Generator:
    """The RNG of one step, independent of every other step: resuming needs no RNG state."""
    return torch.Generator().manual_seed(seed * 1_000_003 + STAGE_IDS[stage] * 10_000_019 + step)


def to_pixels(images: torch.Tensor) -> torch.Tensor:
    """uint8 N x H x W x 3 -> float N x 3 x H x W in [-1, 1], as SD's VAE expects."""
    return images.permute(0, 3, 1, 2).float() / 127.5 - 1.0


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2)."""
    mse = F.mse_loss(a.clamp(-1, 1), b.clamp(-1, 1)).item()
    return 10.0 * math.log10(4.0 / max(mse, 1e-12))


def vae_loss(vae, x: torch.Tensor, g: torch.Generator, kl_weight: float) -> torch.Tensor:
    """L1 + MSE reconstruction plus SD's tiny KL term (latents stay near-deterministic)."""
    post = vae.encode(x).latent_dist
    rec = vae.decode(post.sample(generator=g)).sample
    return (rec - x).abs().mean() + F.mse_loss(rec, x) + kl_weight * post.kl().mean()


def diffusion_loss(unet, text_encoder, z0: torch.Tensor, ids: torch.Tensor,
                   alphas_cumprod: torch.Tensor, g: torch.Generator, gamma: float) -> torch.Tensor:
    """Epsilon-prediction loss at uniform timesteps, Min-SNR weighted."""
    noise = torch.randn(z0.shape, generator=g)
    t = torch.randint(0, len(alphas_cumprod), (z0.shape[0],), generator=g)
    a = alphas_cumprod[t].view(-1, 1, 1, 1)
    zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
    states = text_encoder(input_ids=ids).last_hidden_state
    eps = unet(zt, t, encoder_hidden_states=states).sample
    per_sample = (eps - noise).square().mean(dim=(1, 2, 3))
    return (per_sample * min_snr_weights(alphas_cumprod, t, gamma)).mean()


class Trainer:
    """One training folder: its config, data, components, checkpoints and logs."""

    def __init__(self, out_dir: str | Path, cfg: TrainConfig, *,
                 log: Callable[[str], None] = print, progress: bool = True):
        self.dir = Path(out_dir).expanduser().absolute()
        self.cfg = cfg
        self.log = log
        self.progress = progress
        self.spec = SPECS[cfg.spec]
        self.dir.mkdir(parents=True, exist_ok=True)
        cfg_path = self.dir / "config.json"
        if cfg_path.is_file():
            old = TrainConfig.from_dict(json.loads(cfg_path.read_text()))
            if old != cfg:
                raise ValueError(f"{self.dir} holds a run with another config ({cfg_path}); "
                                 "use another folder or the same settings")
        else:
            cfg_path.write_text(json.dumps(asdict(cfg), indent=1) + "\n")
        from vct.tiny_model import _build_pipeline

        self.pipe, self.vocab, self.merges = _build_pipeline(cfg.seed, self.spec)
        self.alphas_cumprod = self.pipe.scheduler.alphas_cumprod.float()
        self._images: torch.Tensor | None = None

    # ------------------------------------------------------------------ data
    @property
    def images(self) -> torch.Tensor:
        """The training images, rendered once per process (seconds)."""
        if self._images is None:
            arr = D.images_array(D.train_indices(self.cfg.images), self.cfg.seed)
            self._images = torch.from_numpy(arr)
        return self._images

    def heldout_pixels(self) -> torch.Tensor:
        return to_pixels(torch.from_numpy(D.images_array(D.heldout_indices(self.cfg.heldout),
                                                         self.cfg.seed)))

    # ------------------------------------------------------------------ logs
    def _log_losses(self, rows: list[dict]) -> None:
        with (self.dir / "losses.jsonl").open("a") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)

    def _summary(self, **values) -> dict:
        path = self.dir / "summary.json"
        summary = json.loads(path.read_text()) if path.is_file() else {}
        summary.update(values)
        path.write_text(json.dumps(summary, indent=1) + "\n")
        return summary

    # ------------------------------------------------------------------ loop
    def _loop(self, stage: str, modules: dict, trainable: list, emas: dict, steps: int,
              lr: float, loss_fn: Callable[[int, torch.Generator], torch.Tensor]) -> None:
        """The shared training loop: warm-up + cosine LR, clipping, EMA, checkpoints, logs."""
        params = [p for m in trainable for p in m.parameters()]
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
        ckpt = self.dir / "checkpoints" / stage
        meta = load_checkpoint(ckpt, {**modules, **emas}, opt) or {"step": 0, "elapsed_s": 0.0}
        start, elapsed = int(meta["step"]), float(meta["elapsed_s"])
        if start >= steps:
            return
        if start:
            self.log(f"{stage}: resuming at step {start}/{steps}")
        for m in trainable:
            m.train()
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(total=steps, initial=start, desc=stage, unit="step", dynamic_ncols=True)
        rows: list[dict] = []
        smooth = None
        t0 = time.monotonic()
        for step in range(start, steps):
            for group in opt.param_groups:
                group["lr"] = lr_at(step, steps, lr, self.cfg.warmup)
            loss = loss_fn(step, step_generator(self.cfg.seed, stage, step))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            decay = ema_decay(step, self.cfg.ema_decay)
            for name, ema in emas.items():
                ema_update(ema, modules[name.removeprefix("ema_")], decay)
            value = float(loss.detach())
            smooth = value if smooth is None else 0.98 * smooth + 0.02 * value
            now = elapsed + time.monotonic() - t0
            rows.append({"stage": stage, "step": step + 1, "loss": round(value, 6),
                         "lr": opt.param_groups[0]["lr"], "elapsed_s": round(now, 2)})
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{smooth:.4f}")
            done = step + 1
            if done % self.cfg.checkpoint_every == 0 or done == steps:
                self._log_losses(rows)
                rows = []
                save_checkpoint(ckpt, {**modules, **emas}, opt,
                                {"step": done, "elapsed_s": now, "stage": stage})
                if stage == "unet":
                    self.export(done)
        if bar is not None:
            bar.close()
        self._summary(**{f"{stage}_wall_s": round(elapsed + time.monotonic() - t0, 1),
                         f"{stage}_steps": steps,
                         f"{stage}_final_loss_smoothed": round(smooth, 6)})

    # ------------------------------------------------------------------ stages
    def train_vae(self) -> None:
        vae, cfg = self.pipe.vae, self.cfg
        images = self.images

        def loss_fn(step: int, g: torch.Generator) -> torch.Tensor:
            idx = torch.randint(len(images), (cfg.vae_batch,), generator=g)
            return vae_loss(vae, to_pixels(images[idx]), g, cfg.kl_weight)

        self._loop("vae", {"vae": vae}, [vae], {}, cfg.vae_steps, cfg.vae_lr, loss_fn)
        vae.eval()

    @torch.no_grad()
    def cache_latents(self) -> torch.Tensor:
        """The training images' latent means (unscaled), encoded once; sets the VAE's
        scaling_factor to 1/std of them, as SD's 0.18215 was chosen, and measures the VAE's
        reconstruction PSNR on held-out images."""
        path = self.dir / "latents.safetensors"
        vae = self.pipe.vae.eval()
        if path.is_file():
            latents = load_file(str(path))["latents"]
        else:
            chunks = [vae.encode(to_pixels(self.images[i:i + 256])).latent_dist.mean
                      for i in range(0, len(self.images), 256)]
            latents = torch.cat(chunks)
            tmp = path.with_name(".latents.tmp")
            save_file({"latents": latents.contiguous()}, str(tmp))
            os.replace(tmp, path)
        scale = float(1.0 / latents.std())
        vae.register_to_config(scaling_factor=scale)
        held = self.heldout_pixels()
        rec = vae.decode(vae.encode(held).latent_dist.mean).sample
        self._summary(scaling_factor=scale, vae_heldout_psnr_db=round(psnr(rec, held), 2),
                      heldout_images=len(held))
        return latents

    def train_decoder(self, latents: torch.Tensor) -> None:
        """Fine-tune the VAE's decoder alone on the cached latents (as SD's ft-MSE VAE was):
        sharper, truer colours, and the latent space the UNet learns is unchanged, so this
        stage may run before, after or beside the UNet's."""
        vae, cfg = self.pipe.vae, self.cfg
        images = self.images
        decoder = [vae.post_quant_conv, vae.decoder]

        def loss_fn(step: int, g: torch.Generator) -> torch.Tensor:
            idx = torch.randint(len(images), (cfg.vae_batch,), generator=g)
            x = to_pixels(images[idx])
            rec = vae.decode(latents[idx]).sample
            return (rec - x).abs().mean() + F.mse_loss(rec, x)

        self._loop("decoder", {"vae": vae}, decoder, {}, cfg.decoder_steps, cfg.decoder_lr,
                   loss_fn)
        vae.eval()
        with torch.no_grad():
            held = self.heldout_pixels()
            rec = vae.decode(vae.encode(held).latent_dist.mean).sample
        self._summary(decoder_heldout_psnr_db=round(psnr(rec, held), 2))

    def train_unet(self, latents: torch.Tensor) -> None:
        cfg, pipe = self.cfg, self.pipe
        tok = pipe.tokenizer
        captions = D.captions_for(D.train_indices(cfg.images), cfg.seed)
        ids = tok(captions, padding="max_length", max_length=tok.model_max_length,
                  truncation=True, return_tensors="pt").input_ids
        empty = tok("", padding="max_length", max_length=tok.model_max_length,
                    return_tensors="pt").input_ids[0]
        scaled = latents * pipe.vae.config.scaling_factor
        unet, text = pipe.unet, pipe.text_encoder
        modules = {"unet": unet, "text_encoder": text}
        self.emas = {"ema_unet": copy.deepcopy(unet).requires_grad_(False),
                     "ema_text_encoder": copy.deepcopy(text).requires_grad_(False)}

        def loss_fn(step: int, g: torch.Generator) -> torch.Tensor:
            idx = torch.randint(len(scaled), (cfg.unet_batch,), generator=g)
            drop = torch.rand(cfg.unet_batch, generator=g) < cfg.caption_dropout
            batch_ids = torch.where(drop[:, None], empty[None], ids[idx])
            return diffusion_loss(unet, text, scaled[idx], batch_ids, self.alphas_cumprod, g,
                                  cfg.min_snr_gamma)

        self._loop("unet", modules, [unet, text], self.emas, cfg.unet_steps, cfg.unet_lr,
                   loss_fn)

    # ------------------------------------------------------------------ export
    def export(self, step: int) -> Path:
        """Write the EMA weights as a diffusers SD 1.x folder, DIR/model (atomically)."""
        from diffusers import StableDiffusionPipeline

        from vct.tiny_model import _write_bpe_files

        p = self.pipe
        pipe = StableDiffusionPipeline(
            vae=p.vae, text_encoder=self.emas["ema_text_encoder"], tokenizer=p.tokenizer,
            unet=self.emas["ema_unet"], scheduler=p.scheduler, safety_checker=None,
            feature_extractor=None, requires_safety_checker=False)
        target = self.dir / "model"
        staging = Path(tempfile.mkdtemp(prefix=".model.tmp-", dir=self.dir))
        pipe.save_pretrained(staging, safe_serialization=True)
        _write_bpe_files(staging / "tokenizer", self.vocab, self.merges)
        marker = {"kind": self.spec.kind, "seed": self.cfg.seed, "unet_steps": step,
                  "config": asdict(self.cfg)}
        (staging / MODEL_MARKER).write_text(json.dumps(marker, indent=1) + "\n")
        old = self.dir / ".model.old"
        if target.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
        os.replace(staging, target)
        shutil.rmtree(old, ignore_errors=True)
        return target

    def run(self) -> Path:
        """Both stages (each skipped when already done); returns DIR/model."""
        t0 = time.monotonic()
        self.train_vae()
        latents = self.cache_latents()
        self.train_decoder(latents)
        self.train_unet(latents)
        self.export(self.cfg.unet_steps)
        self._summary(last_invocation_wall_s=round(time.monotonic() - t0, 1))
        return self.dir / "model"


def time_steps(cfg: TrainConfig, n: int = 20) -> dict[str, float]:
    """Seconds per step of each stage, measured over `n` steps on real data (after 2 warm-up
    steps), and the projected wall time of the configured run: how the sizes were chosen."""
    with tempfile.TemporaryDirectory() as tmp:
        small = TrainConfig.from_dict({**asdict(cfg), "images": 512})
        tr = Trainer(tmp, small, progress=False)
        images, vae = tr.images, tr.pipe.vae
        opt = torch.optim.AdamW(vae.parameters(), lr=1e-4)
        out = {}

        def timed(fn) -> float:
            for i in range(n + 2):
                if i == 2:
                    t0 = time.monotonic()
                loss = fn(step_generator(0, "vae", i))
                opt.zero_grad()
                loss.backward()
                opt.step()
            return (time.monotonic() - t0) / n

        out["vae_step_s"] = timed(lambda g: vae_loss(
            vae, to_pixels(images[torch.randint(512, (cfg.vae_batch,), generator=g)]), g, 1e-6))
        unet, text = tr.pipe.unet, tr.pipe.text_encoder
        opt = torch.optim.AdamW([*unet.parameters(), *text.parameters()], lr=1e-4)
        ids = torch.full((cfg.unet_batch, 77), tr.pipe.tokenizer.eos_token_id)
        out["unet_step_s"] = timed(lambda g: diffusion_loss(
            unet, text, torch.randn(cfg.unet_batch, 4, 16, 16, generator=g), ids,
            tr.alphas_cumprod, g, 5.0))
        out["projected_minutes"] = (out["vae_step_s"] * cfg.vae_steps
                                    + out["unet_step_s"] * cfg.unet_steps) / 60
        return out


def parameter_counts(folder: Path) -> dict[str, int]:
    """Parameters per component of a model folder (the model card's sizes)."""
    from safetensors import safe_open

    counts = {}
    for part in ("unet", "vae", "text_encoder"):
        total = 0
        for f in sorted((folder / part).glob("*.safetensors")):
            with safe_open(str(f), "pt") as fh:
                for k in fh.keys():
                    total += int(np.prod(fh.get_slice(k).get_shape()))
        counts[part] = total
    return counts
