"""Prompt encoding, with the concept's n learned vectors spliced into the token embedding table.

Instead of growing the tokenizer and the embedding matrix (and restoring every other row after
each step, as the original does), the concept lives in a separate (n, D) tensor and token ids
`V..V+n-1` (V = base vocabulary size) are routed to it. The UNet sees exactly the same states,
every base row is untouched by construction, and a trained concept never leaks into a shared
model object (spec §11: "build the ids [BOS, p_1..p_n, EOS, pad...] directly").
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from vct.models import VCTModels


class ConceptTokenEmbedding(nn.Module):
    """The base token embedding plus extra rows for ids >= the base vocabulary size."""

    def __init__(self, base: nn.Embedding, rows: torch.Tensor):
        super().__init__()
        self.base = base
        self.rows = rows
        self.num_base = base.num_embeddings

    @property
    def num_embeddings(self) -> int:
        """The base vocabulary size V: concept ids start here."""
        return self.num_base

    @property
    def weight(self) -> torch.Tensor:  # transformers reads .weight for dtype/device checks
        return self.base.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        extra = ids >= self.num_base
        base = F.embedding(ids.clamp(max=self.num_base - 1), self.base.weight)
        if not bool(extra.any()):
            return base
        learned = self.rows.to(base.dtype)[(ids - self.num_base).clamp(min=0)]
        return torch.where(extra.unsqueeze(-1), learned, base)


@contextmanager
def concept_rows(models: VCTModels, rows: torch.Tensor | None) -> Iterator[None]:
    """Temporarily route ids >= V to `rows` in the text encoder; always restores the original."""
    if rows is None:
        yield
        return
    encoder = models.text_encoder
    original = encoder.get_input_embeddings()
    encoder.set_input_embeddings(ConceptTokenEmbedding(original, rows))
    try:
        yield
    finally:
        encoder.set_input_embeddings(original)


def base_vocab_size(models: VCTModels) -> int:
    return int(models.text_encoder.get_input_embeddings().num_embeddings)


def prompt_ids(models: VCTModels, prompt: str) -> torch.Tensor:
    """Token ids of `prompt`, padded to the model's length (pad = EOS for SD 1.x)."""
    tok = models.tokenizer
    return tok(prompt, padding="max_length", max_length=models.max_length, truncation=True,
               return_tensors="pt").input_ids.to(models.device)


def concept_prompt_ids(models: VCTModels, num_vectors: int) -> torch.Tensor:
    """[BOS, V, ..., V+n-1, EOS, pad...]: the placeholder alone, as the original's prompt `<s2>`."""
    tok = models.tokenizer
    first = base_vocab_size(models)
    ids = [tok.bos_token_id, *range(first, first + num_vectors), tok.eos_token_id]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids += [pad] * (models.max_length - len(ids))
    return torch.tensor([ids], device=models.device)


def encode(models: VCTModels, ids: torch.Tensor) -> torch.Tensor:
    """Text-encoder hidden states (last_hidden_state), the UNet's conditioning."""
    return models.text_encoder(input_ids=ids).last_hidden_state


def encode_prompt(models: VCTModels, prompt: str) -> torch.Tensor:
    with torch.no_grad():
        return encode(models, prompt_ids(models, prompt)).float()


def encode_concept(models: VCTModels, rows: torch.Tensor) -> torch.Tensor:
    """Hidden states of the prompt made of the concept's placeholder tokens only."""
    with torch.no_grad(), concept_rows(models, rows.to(models.device)):
        return encode(models, concept_prompt_ids(models, rows.shape[0])).float()


def word_rows(models: VCTModels, word: str, num_vectors: int) -> torch.Tensor:
    """Initial vectors: vector i is the embedding of the word's token floor(i*m/n) (spec §5)."""
    ids = models.tokenizer(word, add_special_tokens=False).input_ids
    if not ids:
        raise ValueError(f"initializer word {word!r} has no tokens")
    table = models.text_encoder.get_input_embeddings().weight.detach()
    m = len(ids)
    picks = [ids[(i * m) // num_vectors] for i in range(num_vectors)]
    return table[picks].float().clone()
