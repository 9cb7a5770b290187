"""The attention controller of fusion (spec §6.1), as a diffusers attention processor.

The UNet is called once per step on a batch laid out as
    [uncond: B_1..B_K | cond: B*, B_1..B_K]
(K edit branches sharing one content-matching branch B*, which replays the content fit and so
needs no unconditional pass). Only the conditional passes of the
B_k are changed, always from B*'s conditional pass at the same layer and step:
- cross-attention, steps s < S_x:  P_B[:, :, j] <- R[j] (a_j P_B*[:, :, m(j)] + (1 - a_j) P_B[:, :, j])
- self-attention, steps s < S_self, layers with N_q <= limit:  P_B <- P_B*  (B keeps its own V)
Self replacement needs no explicit probabilities: P_B* V_B = SDPA(Q_B*, K_B*, V_B), so it runs on
fused kernels; cross-attention (77 keys, cheap) is computed explicitly for the conditional rows.
attention_impl='explicit' materialises every probability map: the reference the fast path is
tested against.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from vct.config import FusionConfig


@dataclass
class TokenEdit:
    """Per edit branch: the column map m, the blend a and the reweight R over the text tokens."""

    mapper: torch.Tensor  # (L,) long
    alphas: torch.Tensor  # (L,) float: 1 = take B*'s column, 0 = keep B's own
    reweight: torch.Tensor  # (L,) float


def token_edit(length: int, inserted: int, cfg: FusionConfig) -> TokenEdit:
    """The refinement map of the inversion prompt "" onto a prompt made of `inserted` new tokens.

    Global alignment of [BOS, EOS, pad...] with [BOS, p_1..p_n, EOS, pad...]: BOS maps to BOS,
    the new columns 1..n keep B's own attention (a = 0), EOS (n+1) takes B*'s EOS column 1, and
    the padding columns j >= n+2 take B*'s same column (spec §6.1). The reweight hits the
    original's off-by-one columns {0..n-1}, or with 'concept_tokens' the columns {1..n}.
    """
    mapper = torch.arange(length)
    alphas = torch.ones(length)
    if inserted:
        alphas[1:inserted + 1] = 0.0
        mapper[1:inserted + 1] = 0  # unused: a = 0
        mapper[inserted + 1] = 1
    reweight = torch.ones(length)
    if inserted and cfg.reweight_value != 1.0:
        start = 0 if cfg.reweight_positions == "original" else 1
        reweight[start:start + inserted] = cfg.reweight_value
    return TokenEdit(mapper=mapper, alphas=alphas, reweight=reweight)


@dataclass
class AttentionController:
    """Shared state of all processors: the step, the windows, the edits and an action log."""

    cfg: FusionConfig
    num_steps: int
    edits: list[TokenEdit]
    step: int = 0
    record: bool = False
    log: list[tuple[int, str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.cross_steps = self.cfg.cross_steps(self.num_steps)
        self.self_steps = self.cfg.self_steps(self.num_steps)

    @property
    def branches(self) -> int:
        return 1 + len(self.edits)

    @property
    def passes(self) -> int:
        """Rows of the UNet batch: K unconditional, then B*'s and the K conditional ones."""
        return 2 * len(self.edits) + 1

    @property
    def star(self) -> int:
        """Row of B*'s conditional pass; the B_k's conditional passes follow it."""
        return len(self.edits)

    def mode(self, is_cross: bool, num_queries: int) -> str | None:
        """Which edit applies at this layer and step, if any."""
        if is_cross:
            return "cross" if self.step < self.cross_steps else None
        if self.step < self.self_steps and num_queries <= self.cfg.self_replace_max_tokens:
            return "self"
        return None


def _explicit(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(QK^T scale) in fp32 whatever the UNet's dtype (a no-op cast in fp32): a half
    softmax over 77 or 4096 keys loses the small probabilities the edits mix. The fused
    kernels also keep their softmax in fp32."""
    return (q.float() @ k.float().transpose(-1, -2) * scale).softmax(dim=-1)


def _weigh(probs: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """P V in V's dtype: the fp32 probabilities are rounded to it, as fused kernels do."""
    return probs.to(v.dtype) @ v


class ControlledAttnProcessor:
    """SDPA attention that applies the controller's edits to the B conditional passes."""

    def __init__(self, controller: AttentionController, name: str):
        self.controller = controller
        self.name = name
        self.is_cross = name.endswith("attn2.processor")

    def __call__(self, attn, hidden_states: torch.Tensor,
                 encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 *args, **kwargs) -> torch.Tensor:
        if attention_mask is not None:
            raise NotImplementedError("the VCT controller does not support attention masks")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, ch, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, ch, h * w).transpose(1, 2)
        batch = hidden_states.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, -1, attn.heads, head_dim).transpose(1, 2)

        q, k, v = heads(query), heads(key), heads(value)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        out = self._attend(q, k, v, attn.scale)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(q.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(b, ch, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                scale: float) -> torch.Tensor:
        ctl = self.controller
        mode = ctl.mode(self.is_cross, q.shape[2])
        if mode is not None and q.shape[0] != ctl.passes:
            raise RuntimeError(f"{self.name}: batch {q.shape[0]} does not match the controller's "
                               f"{ctl.passes} passes")
        explicit = ctl.cfg.attention_impl == "explicit"
        if mode is None:
            if explicit:
                return _weigh(_explicit(q, k, scale), v)
            return F.scaled_dot_product_attention(q, k, v, scale=scale)
        if ctl.record:
            ctl.log.append((ctl.step, self.name, mode))
        star = ctl.star
        edits = slice(star + 1, ctl.passes)
        if mode == "self":
            if explicit:
                probs = _explicit(q, k, scale)
                probs[edits] = probs[star:star + 1].expand_as(probs[edits])
                return _weigh(probs, v)
            out = F.scaled_dot_product_attention(q, k, v, scale=scale)
            n = ctl.branches - 1
            out[edits] = F.scaled_dot_product_attention(
                q[star:star + 1].expand(n, -1, -1, -1), k[star:star + 1].expand(n, -1, -1, -1),
                v[edits], scale=scale)
            return out
        # cross: explicit probabilities for the conditional rows only (77 keys: cheap)
        if explicit:
            probs = _explicit(q, k, scale)
            out = None
        else:
            out = F.scaled_dot_product_attention(q, k, v, scale=scale)
            probs = torch.zeros(0)
        cond = _explicit(q[star:], k[star:], scale) if not explicit else probs[star:]
        base = cond[0]
        new_rows = []
        for i, edit in enumerate(ctl.edits):
            own = cond[1 + i]
            dev = own.device
            a = edit.alphas.to(dev, own.dtype)
            mixed = base[..., edit.mapper.to(dev)] * a + own * (1 - a)
            new_rows.append(mixed * edit.reweight.to(dev, own.dtype))
        new = torch.stack(new_rows)
        if explicit:
            probs[edits] = new
            return _weigh(probs, v)
        out[edits] = _weigh(new, v[edits])
        return out


def install(unet, controller: AttentionController) -> dict:
    """Put the controller on all attention modules; returns the processors to restore."""
    previous = dict(unet.attn_processors)
    unet.set_attn_processor({name: ControlledAttnProcessor(controller, name)
                             for name in previous})
    return previous


def restore(unet, previous: dict) -> None:
    unet.set_attn_processor(previous)
