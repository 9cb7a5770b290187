"""The spec's formulas written out in plain torch, and a UNet whose output is known in closed form.

Why: a test that measures the method with the method's own helpers (`vct.ddim.ddim_map`,
`guided`, `content_losses`, `concept_loss`) cannot fail when one of those helpers is wrong. The
fidelity tests compute every expected value from the method (`docs/method.md`) with the few lines
below instead. Nothing here imports `vct`: this module is the independent side of each check.

All oracle arithmetic runs in float64, so a disagreement with the float32 code is a formula
error, not rounding.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch

# spec §2: SD 1.x scaled-linear schedule, 1000 training steps, set_alpha_to_one off.
BETA_START, BETA_END, NUM_TRAIN = 0.00085, 0.012, 1000
GUIDANCE = 7.5  # spec §4, §6: one w for the fit and both fusion branches


def alphas_cumprod() -> torch.Tensor:
    """ᾱ_t = Π_{i≤t} (1 − β_i), β = linspace(√β_start, √β_end, 1000)² (spec §2), float64."""
    betas = torch.linspace(math.sqrt(BETA_START), math.sqrt(BETA_END), NUM_TRAIN,
                           dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


_ALPHAS = alphas_cumprod()


def a(t: int) -> float:
    """a(t) = ᾱ_t for t ≥ 0 and ᾱ_0 for t < 0 (spec §2, set_alpha_to_one=False)."""
    return float(_ALPHAS[max(int(t), 0)])


def ddim(z: torch.Tensor, eps: torch.Tensor, t_from: int, t_to: int) -> torch.Tensor:
    """D(z, ε, t_f, t_o) = √a(t_o)·(z − √(1−a(t_f))·ε)/√a(t_f) + √(1−a(t_o))·ε (spec §2)."""
    af, at = a(t_from), a(t_to)
    return math.sqrt(at) * (z - math.sqrt(1 - af) * eps) / math.sqrt(af) + math.sqrt(1 - at) * eps


def x0_hat(z: torch.Tensor, eps: torch.Tensor, t: int) -> torch.Tensor:
    """ẑ_0 = (z_t − √(1−ᾱ_t)·ε)/√ᾱ_t (spec §5; also the 'x0' content target)."""
    return (z - math.sqrt(1 - a(t)) * eps) / math.sqrt(a(t))


def cfg(eps_negative: torch.Tensor, eps_positive: torch.Tensor, w: float = GUIDANCE):
    """ε̃ = ε(c) + w·(ε(e) − ε(c)): the content embedding c in the negative slot (spec §2)."""
    return eps_negative + w * (eps_positive - eps_negative)


def step_size(T: int) -> int:
    """Δ = 1000 / T (20 at T = 50)."""
    return NUM_TRAIN // T


def sampling_grid(T: int, offset: int = 1) -> list[int]:
    """t_s = (T − 1 − s)·Δ + offset for s = 0..T−1: 981, 961, ..., 1 at T = 50 with the
    original's steps_offset 1 (spec §2); 980, ..., 0 at offset 0."""
    return [(T - 1 - s) * step_size(T) + offset for s in range(T)]


def inversion_grid(T: int, offset: int = 1) -> list[int]:
    """τ_k = k·Δ + offset for k = 0..T−1 (spec §3): 1, 21, ..., 981 at the original's offset."""
    return [k * step_size(T) + offset for k in range(T)]


class AdamState:
    """torch's Adam/AdamW written out (spec §4.2, §5), one state per parameter tensor."""

    def __init__(self, param: torch.Tensor, lr: float, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        self.lr, self.betas, self.eps, self.wd = lr, betas, eps, weight_decay
        self.m = torch.zeros_like(param)
        self.v = torch.zeros_like(param)
        self.k = 0

    def step(self, param: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """One update: decoupled decay p ← p(1 − lr·wd), then the bias-corrected Adam step."""
        b1, b2 = self.betas
        self.k += 1
        param = param * (1 - self.lr * self.wd)
        self.m = b1 * self.m + (1 - b1) * grad
        self.v = b2 * self.v + (1 - b2) * grad * grad
        m_hat = self.m / (1 - b1 ** self.k)
        v_hat = self.v / (1 - b2 ** self.k)
        return param - self.lr * m_hat / (v_hat.sqrt() + self.eps)


class StubUNet(torch.nn.Module):
    """ε(z, t, e) = α·z + β·s(e)·U + (t/1000)·V with s(e) = Σ e ⊙ W.

    Closed form, cheap, differentiable in e (so the content fit and the concept have gradients),
    dependent on t (so a wrong timestep shows) and on every element of e through a fixed random
    W (so two different embeddings in two guidance slots give different predictions). It has no
    attention layers: fusion's controller installs nothing on it.
    """

    def __init__(self, latent_shape: tuple[int, ...], text_shape: tuple[int, int], *,
                 alpha: float = 0.1, beta: float = 1.0, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        n = text_shape[0] * text_shape[1]
        self.register_buffer("W", torch.randn(text_shape, generator=gen) / math.sqrt(n))
        self.register_buffer("U", torch.randn(latent_shape, generator=gen))
        self.register_buffer("V", torch.randn(latent_shape, generator=gen))
        self.alpha, self.beta = alpha, beta
        self.config = SimpleNamespace(sample_size=latent_shape[-1])
        self.attn_processors: dict = {}

    def set_attn_processor(self, processors: dict) -> None:
        """No attention modules: nothing to install or restore."""

    def score(self, e: torch.Tensor) -> torch.Tensor:
        """s(e) = Σ e ⊙ W per batch row."""
        return (e * self.W.to(e.dtype)).sum(dim=(1, 2)).view(-1, 1, 1, 1)

    def formula(self, z: torch.Tensor, t, e: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=z.dtype, device=z.device).reshape(-1, 1, 1, 1)
        return (self.alpha * z + self.beta * self.score(e) * self.U.to(z.dtype)
                + t / NUM_TRAIN * self.V.to(z.dtype))

    def forward(self, z: torch.Tensor, t, encoder_hidden_states: torch.Tensor, **_):
        return SimpleNamespace(sample=self.formula(z, t, encoder_hidden_states))


def content_step(eps_fn, z: torch.Tensor, c_prev: torch.Tensor, e_null: torch.Tensor,
                 target: torch.Tensor, t: int, dt: int, s: int, *, max_iterations: int,
                 lr0: float = 0.01, decay: float = 0.01, epsilon: float = 1e-5,
                 slope: float = 2e-5, w: float = GUIDANCE, to_x0: bool = False,
                 iterations: int | None = None):
    """Spec §4, one sampling step s of the content fit, from the reconstruction latent z = z̄_s.

    ε_c = ε(z̄, t, e_∅); a fresh Adam with lr_s = lr0·(1 − decay·s) on c, starting from c_prev;
    each iteration takes L = mean((D(z̄, ε(c) + w(ε_c − ε(c)), t, t−Δ) − P)²), steps, and stops
    when that pre-step L < epsilon + slope·s; then z̄ ← D(z̄, ε̃(z̄, t; c_s, e_∅), t, t−Δ).
    `iterations` forces the count (to check Adam apart from the stop rule).
    Returns (pre-step losses, c_s, z̄_{s+1}).
    """
    eps_c = eps_fn(z, t, e_null)
    c = c_prev.clone()
    adam = AdamState(c, lr=lr0 * (1 - decay * s))
    threshold = epsilon + slope * s
    losses: list[float] = []
    for _ in range(max_iterations if iterations is None else iterations):
        var = c.clone().requires_grad_(True)
        eps_hat = cfg(eps_fn(z, t, var), eps_c, w)
        pred = x0_hat(z, eps_hat, t) if to_x0 else ddim(z, eps_hat, t, t - dt)
        loss = ((pred - target) ** 2).mean()
        (grad,) = torch.autograd.grad(loss, var)
        c = adam.step(c, grad)
        losses.append(float(loss.detach()))
        if iterations is None and losses[-1] < threshold:
            break
    with torch.no_grad():
        z_next = ddim(z, cfg(eps_fn(z, t, c), eps_c, w), t, t - dt)
    return losses, c, z_next


def prompt_states(tokenizer, text_encoder, vectors: torch.Tensor | None = None) -> torch.Tensor:
    """e_∅ = E("") or e_ref = E("<s2>") built from the spec, not from `vct.text` (spec §2, §5).

    ids = [BOS, p_1..p_n, EOS, pad = EOS ...] (77); the n concept vectors are spliced in as the
    token embeddings at positions 1..n (a hook on the embedding table's output), so the encoder
    adds its own position embeddings to them exactly as to any token. Differentiable in
    `vectors`; in the encoder's dtype.
    """
    n = 0 if vectors is None else int(vectors.shape[0])
    length = int(tokenizer.model_max_length)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    ids = torch.tensor([[bos] + [bos] * n + [eos] * (length - 1 - n)])
    table = text_encoder.get_input_embeddings()

    def splice(_module, _inputs, output):
        output = output.clone()
        output[:, 1:n + 1] = vectors.to(output)
        return output

    handle = table.register_forward_hook(splice) if n else None
    try:
        device = next(text_encoder.parameters()).device
        return text_encoder(input_ids=ids.to(device)).last_hidden_state
    finally:
        if handle is not None:
            handle.remove()


@torch.no_grad()
def text_states(tokenizer, text_encoder, vectors: torch.Tensor | None = None) -> torch.Tensor:
    """`prompt_states` without gradient, as float64 on the CPU."""
    return prompt_states(tokenizer, text_encoder, vectors).double().cpu()


def token_columns(length: int, n: int, positions: str = "original", value: float = 0.5):
    """Spec §6.1, the refinement of "" onto a prompt of n new tokens, column by column.

    m(0) = 0 (BOS); columns 1..n are new (α = 0, B keeps its own attention); EOS at n+1 takes
    B*'s EOS column 1; j ≥ n+2 take B*'s column j. R = value on {0..n−1} ('original', the
    off-by-one of ptp_utils.get_word_inds) or on {1..n} ('concept_tokens'), 1 elsewhere.
    Returns (m, α, R) as python lists.
    """
    m = list(range(length))
    alpha = [1.0] * length
    reweight = [1.0] * length
    if n:
        for j in range(1, n + 1):
            alpha[j] = 0.0
        m[n + 1] = 1
        cols = range(0, n) if positions == "original" else range(1, n + 1)
        for j in cols:
            reweight[j] = value
    return m, alpha, reweight


def windows(T: int, r_cross: float = 0.2, r_self: float = 0.9,
            rounding: str = "original") -> tuple[int, int]:
    """S_x = ⌊r_x·(T+1)⌋ ('original'; ⌊r_x·T⌋ 'consistent') and S_self = ⌊r_s·T⌋ (spec §6.1)."""
    span = T + 1 if rounding == "original" else T
    return math.floor(r_cross * span), math.floor(r_self * T)


def concept_objective(eps_fn, states: torch.Tensor, z0: torch.Tensor, t: torch.Tensor,
                      noise: torch.Tensor, *, use_l1: bool = True, weight: float = 1.0):
    """Spec §5, one micro-batch: z_t = √ᾱ_t·z_0 + √(1−ᾱ_t)·ε, ê = ε(z_t, t, E_θ("<s2>")),
    L = mean((ê − ε)²) + λ·mean|ẑ_0 − z_0| with ẑ_0 = (z_t − √(1−ᾱ_t)·ê)/√ᾱ_t."""
    a_t = _ALPHAS[t.long()].to(z0.dtype).view(-1, 1, 1, 1)
    z_t = a_t.sqrt() * z0 + (1 - a_t).sqrt() * noise
    eps_hat = eps_fn(z_t, t, states.expand(z0.shape[0], -1, -1))
    loss = ((eps_hat - noise) ** 2).mean()
    if use_l1:
        x0 = (z_t - (1 - a_t).sqrt() * eps_hat) / a_t.sqrt()
        loss = loss + weight * (x0 - z0).abs().mean()
    return loss


def concept_updates(eps_fn, states_fn, init: torch.Tensor, draws: list, *, steps: int,
                    accum: int = 4, lr: float = 2e-3, weight_decay: float = 0.01,
                    betas=(0.9, 0.999), eps: float = 1e-8, use_l1: bool = True,
                    weight: float = 1.0) -> tuple[torch.Tensor, list[float]]:
    """Spec §5: `steps` AdamW updates of the n rows, each on the mean of `accum` micro-batch
    losses (accelerate divides each by accum); draws[i] = (z_0, t, ε) of micro-step i.
    Returns (rows, the loss of each update)."""
    rows = init.double()
    adam = AdamState(rows, lr, betas, eps, weight_decay)
    losses = []
    for u in range(steps):
        grad = torch.zeros_like(rows)
        total = 0.0
        for z0, t, noise in draws[u * accum:(u + 1) * accum]:
            var = rows.clone().requires_grad_(True)
            loss = concept_objective(eps_fn, states_fn(var), z0.double(), t, noise.double(),
                                     use_l1=use_l1, weight=weight) / accum
            (g,) = torch.autograd.grad(loss, var)
            grad += g
            total += float(loss.detach())
        rows = adam.step(rows, grad)
        losses.append(total)
    return rows, losses
