"""An attribute classifier for the procedural set: shape, colour, fill and background of a
64 px image, one small CNN with four heads, trained on the generator's own images.

Why: a restyle is right when the output shows the source's shape with the reference's colour
and fill; a classifier trained on rendered images reads those attributes off any output, the
mini model's samples included. It trains in a minute on one core with augmentation that mimics
what a VAE decoder does to an image (blur, noise, a little colour drift), and ships as a small
safetensors file with its training settings in the header.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from vct.mini import data as D

HEADS: dict[str, tuple[str, ...]] = {
    "shape": D.SHAPES,
    "color": tuple(D.COLORS),
    "fill": D.FILLS,
    "background": D.BACKGROUNDS,
}
"""Each head's class names, in label order."""
WEIGHTS = Path(__file__).with_name("classifier.safetensors")
"""The shipped weights (`python -m vct.mini.classifier` rewrites them)."""
CLASSIFIER_SEED = 1234
"""The classifier's own image set seed: never the mini model's training images."""


@dataclass(frozen=True)
class ClassifierConfig:
    """What a trained classifier depends on; stored in its weights' header."""

    images: int = 4000
    steps: int = 700
    batch: int = 64
    lr: float = 2e-3
    seed: int = 0
    data_seed: int = CLASSIFIER_SEED
    noise_max: float = 12.0
    blur_max: float = 1.2
    drift_max: float = 12.0


class AttributeNet(nn.Module):
    """Four conv blocks (64 -> 4 px), a shared hidden layer, one linear head per attribute."""

    def __init__(self) -> None:
        super().__init__()
        chans = [3, 16, 32, 64, 64]
        blocks = []
        for cin, cout in zip(chans[:-1], chans[1:]):
            blocks += [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                       nn.MaxPool2d(2)]
        self.features = nn.Sequential(*blocks)
        self.hidden = nn.Sequential(nn.Flatten(), nn.Linear(64 * 4 * 4, 128), nn.ReLU())
        self.heads = nn.ModuleDict({k: nn.Linear(128, len(v)) for k, v in HEADS.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.hidden(self.features(x))
        return {k: head(h) for k, head in self.heads.items()}


def to_input(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (or 0..255 float) N x 64 x 64 x 3 -> float N x 3 x 64 x 64 in [-1, 1]."""
    x = torch.as_tensor(np.asarray(images)).float()
    if x.ndim == 3:
        x = x[None]
    return x.permute(0, 3, 1, 2) / 127.5 - 1.0


def labels_of(params: list[D.Params]) -> dict[str, torch.Tensor]:
    """Label indices per head for a list of params."""
    return {k: torch.tensor([names.index(getattr(p, k)) for p in params])
            for k, names in HEADS.items()}


def augment(x: torch.Tensor, g: torch.Generator, cfg: ClassifierConfig) -> torch.Tensor:
    """Per image: a Gaussian blur of random width, a per-channel offset and pixel noise, all
    in [-1, 1] units scaled from 0..255 settings."""
    n = x.shape[0]
    sigma = torch.rand(n, generator=g) * cfg.blur_max
    r = torch.arange(-2, 3, dtype=torch.float32)
    k = torch.exp(-0.5 * (r[None] / sigma.clamp(min=1e-3)[:, None]) ** 2)
    k = k / k.sum(dim=1, keepdim=True)  # (n, 5); sigma ~0 gives the identity
    xs = x.reshape(1, n * 3, *x.shape[2:])
    kx = k.repeat_interleave(3, dim=0)
    xs = F.conv2d(F.pad(xs, (2, 2, 0, 0), mode="replicate"), kx[:, None, None, :],
                  groups=n * 3)
    xs = F.conv2d(F.pad(xs, (0, 0, 2, 2), mode="replicate"), kx[:, None, :, None],
                  groups=n * 3)
    x = xs.reshape(x.shape)
    drift = (torch.rand(n, 3, 1, 1, generator=g) * 2 - 1) * cfg.drift_max / 127.5
    noise = torch.randn(x.shape, generator=g) * (torch.rand(n, 1, 1, 1, generator=g)
                                                  * cfg.noise_max / 127.5)
    return (x + drift + noise).clamp(-1, 1)


def training_set(cfg: ClassifierConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The classifier's rendered images (inputs) and labels, from its own data seed."""
    params = [D.params_for(i, cfg.data_seed) for i in range(cfg.images)]
    images = np.stack([np.asarray(D.render(p)) for p in params])
    return to_input(images), labels_of(params)


def train(cfg: ClassifierConfig = ClassifierConfig(), log=None) -> AttributeNet:
    """Train from scratch, seeded: Adam, a cosine learning rate, the sum of the heads' losses."""
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    x, y = training_set(cfg)
    net = AttributeNet()
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.steps)
    net.train()
    for step in range(cfg.steps):
        idx = torch.randint(len(x), (cfg.batch,), generator=g)
        out = net(augment(x[idx], g, cfg))
        loss = sum(F.cross_entropy(out[k], y[k][idx]) for k in HEADS)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log and (step + 1) % 100 == 0:
            log(f"classifier step {step + 1}/{cfg.steps} loss {loss.item():.4f}")
    return net.eval()


def save(net: AttributeNet, path: Path, cfg: ClassifierConfig, extra: dict | None = None) -> None:
    """Weights plus the training config (and any numbers) as JSON in the header."""
    meta = {"config": json.dumps(asdict(cfg)), "heads": json.dumps(HEADS)}
    if extra:
        meta["report"] = json.dumps(extra)
    tensors = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    save_file(tensors, str(path), metadata=meta)


def load(path: Path = WEIGHTS) -> AttributeNet:
    """The classifier from its safetensors file, in eval mode."""
    net = AttributeNet()
    net.load_state_dict(load_file(str(path)))
    return net.eval()


@torch.no_grad()
def predict(net: AttributeNet, images: np.ndarray, batch: int = 256) -> dict[str, list[str]]:
    """Class names per head for uint8 N x 64 x 64 x 3 images."""
    x = to_input(images)
    out: dict[str, list[str]] = {k: [] for k in HEADS}
    for i in range(0, len(x), batch):
        logits = net(x[i:i + batch])
        for k, names in HEADS.items():
            out[k] += [names[j] for j in logits[k].argmax(dim=1).tolist()]
    return out


def accuracy(predicted: dict[str, list[str]], params: list[D.Params]) -> dict[str, float]:
    """Per-head accuracy of predictions against the params' true attributes, and 'all'
    (every head right)."""
    right = {k: np.array([a == getattr(p, k) for a, p in zip(predicted[k], params)])
             for k in HEADS}
    result = {k: float(v.mean()) for k, v in right.items()}
    result["all"] = float(np.logical_and.reduce(list(right.values())).mean())
    return result


def heldout_accuracy(net: AttributeNet, n: int = 512,
                     seed: int = CLASSIFIER_SEED) -> dict[str, float]:
    """Accuracy on clean held-out renders of the classifier's own image set."""
    params = [D.params_for(i, seed) for i in D.heldout_indices(n)]
    images = np.stack([np.asarray(D.render(p)) for p in params])
    return accuracy(predict(net, images), params)


def main() -> None:
    """Retrain the shipped weights and print their held-out accuracy."""
    torch.set_num_threads(1)
    cfg = ClassifierConfig()
    start = time.perf_counter()
    net = train(cfg, log=print)
    seconds = time.perf_counter() - start
    acc = heldout_accuracy(net)
    print(f"trained in {seconds:.1f} s; held-out accuracy {acc}")
    save(net, WEIGHTS, cfg, {"train_seconds_1_thread": round(seconds, 1),
                             "heldout_accuracy": acc})


if __name__ == "__main__":
    main()
