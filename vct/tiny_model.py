"""Build a tiny, random-weight Stable Diffusion 1.x-shaped model folder, fully offline.

Why: tests and smoke runs of the VCT pipeline need a real diffusers model folder (same component
classes, same factor-8 VAE geometry, same CLIP tokenizer conventions as SD 1.5) without network
access or gigabytes of weights. Everything here is deterministic so that the same seed always
yields byte-identical weight files, which keeps caches and golden tests stable.

Only torch, diffusers, transformers and the standard library are used, so importing this module
never pulls in the rest of the ``vct`` package.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

__all__ = ["MARKER_FILE", "MODEL_KIND", "TINY_SPEC", "WORDS", "ModelSpec", "build_random_model",
           "build_tiny_model", "train_bpe"]

MARKER_FILE = "vct_tiny_model.json"
MODEL_KIND = "vct-tiny-sd1"
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
MODEL_MAX_LENGTH = 77

# Every word below becomes a single token (prompts like "a painting of a girl" stay short and
# meaningful). Lowercase ASCII letters only, so CLIP's pre-tokenizer never splits a word.
WORDS: tuple[str, ...] = tuple(
    """
    a an the of in on at with and or by to is
    girl boy man woman face hair eyes portrait
    cat dog bird horse flower tree forest mountain river lake sea sky cloud sun moon night
    city street house garden light shadow color red blue green yellow black white dark bright
    old young small beautiful
    painting paint style photo art artist drawing sketch watercolor oil canvas ink pencil
    landscape abstract cartoon anime modern picture
    """.split()
)


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2 reversible byte -> printable unicode map (BPE never sees raw control bytes)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _merge_word(symbols: list[str], pair: tuple[str, str]) -> list[str]:
    """Merge every left-to-right occurrence of ``pair`` (same rule CLIP's BPE applies)."""
    out: list[str] = []
    i = 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            out.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return out


def train_bpe(words: Iterable[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Learn a byte-level CLIP-style BPE until every word is one token; return (vocab, merges).

    Plain Python and fully deterministic: the most frequent pair wins and ties are broken by
    the pair's string order. The vocabulary layout mirrors CLIP's: 256 byte symbols, the same
    256 with ``</w>``, the merged tokens in merge order, then the two special tokens.
    """
    byte_encoder = bytes_to_unicode()
    base = list(byte_encoder.values())
    vocab_list = base + [s + END_OF_WORD for s in base]
    known = set(vocab_list)

    corpus: list[list[str]] = []
    for word in dict.fromkeys(w.strip().lower() for w in words):
        if not word:
            continue
        symbols = [byte_encoder[b] for b in word.encode("utf-8")]
        symbols[-1] += END_OF_WORD
        corpus.append(symbols)

    merges: list[tuple[str, str]] = []
    while True:
        counts: Counter[tuple[str, str]] = Counter()
        for symbols in corpus:
            counts.update(zip(symbols, symbols[1:]))
        if not counts:
            break
        pair = min(counts, key=lambda p: (-counts[p], p))
        merges.append(pair)
        corpus = [_merge_word(s, pair) if len(s) > 1 else s for s in corpus]
        token = pair[0] + pair[1]
        if token not in known:
            known.add(token)
            vocab_list.append(token)

    vocab_list += [BOS_TOKEN, EOS_TOKEN]
    return {tok: i for i, tok in enumerate(vocab_list)}, merges


def _write_bpe_files(folder: Path, vocab: dict[str, int], merges: list[tuple[str, str]]) -> None:
    """Write CLIP's slow-tokenizer files (transformers 5 only saves tokenizer.json)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def pad_vocab(vocab: dict[str, int], size: int) -> dict[str, int]:
    """The vocabulary grown to `size` entries with filler tokens no text ever produces (no
    merge leads to them), placed before the two special tokens, which stay last: with 49408,
    BOS and EOS get CLIP's own ids 49406 and 49407."""
    specials = (BOS_TOKEN, EOS_TOKEN)
    tokens = [t for t in sorted(vocab, key=vocab.get) if t not in specials]
    if size < len(tokens) + 2:
        raise ValueError(f"vocabulary size {size} is below the {len(tokens) + 2} tokens needed")
    tokens += [f"<|filler{i}|>" for i in range(size - 2 - len(tokens))]
    return {tok: i for i, tok in enumerate([*tokens, *specials])}


def _build_tokenizer(vocab_size: int | None = None, words: tuple[str, ...] = WORDS):
    """CLIPTokenizer with SD 1.5 conventions: bos/eos specials, pad == eos, max length 77;
    the vocabulary learnt from `words` (each one token), or that vocabulary padded to
    `vocab_size` entries."""
    from transformers import CLIPTokenizer

    vocab, merges = train_bpe(words)
    if vocab_size is not None:
        vocab = pad_vocab(vocab, vocab_size)
    tokenizer = CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=EOS_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        model_max_length=MODEL_MAX_LENGTH,
    )
    return tokenizer, vocab, merges


@dataclass(frozen=True)
class ModelSpec:
    """What a random-weight SD 1.x folder is made of: the keyword arguments of each component
    (the text encoder's vocabulary and token ids come from the tokenizer), the scheduler, the
    dtype its weights are saved in, and the words its errors use."""

    kind: str
    label: str
    text: dict
    unet: dict
    vae: dict
    scheduler: dict
    scheduler_class: str = "DDIMScheduler"
    vocab_size: int | None = None
    save_dtype: str = "float32"
    words: tuple[str, ...] = WORDS
    """The words the tokenizer learns as single tokens."""


TINY_SPEC = ModelSpec(
    kind=MODEL_KIND,
    label="tiny model",
    text={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
          "num_attention_heads": 4},
    unet={"sample_size": 8, "in_channels": 4, "out_channels": 4, "block_out_channels": (32, 64),
          "layers_per_block": 1, "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
          "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"), "cross_attention_dim": 32,
          "attention_head_dim": 8, "norm_num_groups": 32},
    vae={"block_out_channels": (32, 32, 64, 64), "down_block_types": ("DownEncoderBlock2D",) * 4,
         "up_block_types": ("UpDecoderBlock2D",) * 4, "latent_channels": 4,
         "layers_per_block": 1, "norm_num_groups": 32, "sample_size": 64,
         "scaling_factor": 0.18215},
    scheduler={"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
               "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1},
)


def _build_pipeline(seed: int, spec: ModelSpec = TINY_SPEC):
    """Construct every component under a forked, seeded global RNG (caller's RNG untouched)."""
    import diffusers
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer, vocab, merges = _build_tokenizer(spec.vocab_size, spec.words)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                max_position_embeddings=MODEL_MAX_LENGTH,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                **spec.text,
            )
        )
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**spec.unet)
        torch.manual_seed(seed)
        vae = AutoencoderKL(**spec.vae)
    scheduler = getattr(diffusers, spec.scheduler_class)(**spec.scheduler)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    if spec.save_dtype != "float32":
        pipe.to(dtype=getattr(torch, spec.save_dtype))
    return pipe, vocab, merges


def _read_marker(folder: Path) -> dict | None:
    """Return the tiny-model marker of ``folder`` or None if absent/unreadable."""
    try:
        data = json.loads((folder / MARKER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _is_same_model(folder: Path, seed: int, kind: str = MODEL_KIND) -> bool:
    marker = _read_marker(folder)
    return bool(marker) and marker.get("kind") == kind and marker.get("seed") == seed


def _check_target(out_dir: Path, seed: int, spec: ModelSpec = TINY_SPEC) -> bool:
    """True if ``out_dir`` already holds this exact model; raise if it holds anything else."""
    if not out_dir.exists():
        return False
    if not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a directory; refusing to overwrite it")
    if not any(out_dir.iterdir()):
        return False
    if _is_same_model(out_dir, seed, spec.kind):
        return True
    marker = _read_marker(out_dir)
    what = (f"a {marker.get('kind')!r} model built with seed {marker.get('seed')!r}" if marker
            else "other files")
    raise FileExistsError(
        f"{out_dir} is not empty (it holds {what}); refusing to overwrite it with a "
        f"{spec.label} for seed {seed}. Choose another directory or delete it first."
    )


def build_tiny_model(out_dir: str | Path, seed: int = 0) -> Path:
    """Build, offline and deterministically, a random-weight Stable Diffusion 1.x-shaped
    diffusers model folder.

    The folder loads with
    ``StableDiffusionPipeline.from_pretrained(out_dir, local_files_only=True)``; its native
    resolution is 64x64 (8x8 latents, VAE factor 8). The build is atomic (staged in a temporary
    sibling folder, then renamed) and idempotent: an ``out_dir`` already holding a tiny model of
    the same seed is returned unchanged, any other non-empty ``out_dir`` raises
    ``FileExistsError``.
    """
    return build_random_model(out_dir, TINY_SPEC, seed)


def build_random_model(out_dir: str | Path, spec: ModelSpec, seed: int = 0) -> Path:
    """Build the random-weight model `spec` describes (atomic and idempotent, as
    :func:`build_tiny_model`, which is this function with the tiny spec)."""
    out_dir = Path(out_dir).expanduser().absolute()
    if _check_target(out_dir, seed, spec):
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)

    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        pipe, vocab, merges = _build_pipeline(seed, spec)
        pipe.save_pretrained(staging, safe_serialization=True)
        _write_bpe_files(staging / "tokenizer", vocab, merges)
        marker = {"seed": seed, "kind": spec.kind}
        (staging / MARKER_FILE).write_text(json.dumps(marker) + "\n", encoding="utf-8")
        try:
            # os.replace onto an empty directory is allowed on POSIX; drop it first for others.
            if out_dir.is_dir() and not any(out_dir.iterdir()):
                out_dir.rmdir()
            os.replace(staging, out_dir)
        except OSError:
            # Lost a race against a concurrent builder: accept its result if it is the same model.
            if _is_same_model(out_dir, seed, spec.kind):
                return out_dir
            raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return out_dir
