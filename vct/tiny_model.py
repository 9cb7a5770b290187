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
from functools import lru_cache
from pathlib import Path

__all__ = ["MARKER_FILE", "MODEL_KIND", "WORDS", "build_tiny_model", "train_bpe"]

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


def _build_tokenizer():
    """CLIPTokenizer with SD 1.5 conventions: bos/eos specials, pad == eos, max length 77."""
    from transformers import CLIPTokenizer

    vocab, merges = train_bpe(WORDS)
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


def _build_pipeline(seed: int):
    """Construct every component under a forked, seeded global RNG (caller's RNG untouched)."""
    import torch
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer, vocab, merges = _build_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=32,
                intermediate_size=37,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=MODEL_MAX_LENGTH,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=32,
        )
        torch.manual_seed(seed)
        vae = AutoencoderKL(
            block_out_channels=(32, 32, 64, 64),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4,
            layers_per_block=1,
            norm_num_groups=32,
            sample_size=64,
            scaling_factor=0.18215,
        )
    scheduler = DDIMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
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
    return pipe, vocab, merges


def _read_marker(folder: Path) -> dict | None:
    """Return the tiny-model marker of ``folder`` or None if absent/unreadable."""
    try:
        data = json.loads((folder / MARKER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _is_same_tiny_model(folder: Path, seed: int) -> bool:
    marker = _read_marker(folder)
    return bool(marker) and marker.get("kind") == MODEL_KIND and marker.get("seed") == seed


def _check_target(out_dir: Path, seed: int) -> bool:
    """True if ``out_dir`` already holds this exact tiny model; raise if it holds anything else."""
    if not out_dir.exists():
        return False
    if not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a directory; refusing to overwrite it")
    if not any(out_dir.iterdir()):
        return False
    if _is_same_tiny_model(out_dir, seed):
        return True
    marker = _read_marker(out_dir)
    what = f"a tiny model built with seed {marker.get('seed')!r}" if marker else "other files"
    raise FileExistsError(
        f"{out_dir} is not empty (it holds {what}); refusing to overwrite it with a tiny model "
        f"for seed {seed}. Choose another directory or delete it first."
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
    out_dir = Path(out_dir).expanduser().absolute()
    if _check_target(out_dir, seed):
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)

    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        pipe, vocab, merges = _build_pipeline(seed)
        pipe.save_pretrained(staging, safe_serialization=True)
        _write_bpe_files(staging / "tokenizer", vocab, merges)
        marker = {"seed": seed, "kind": MODEL_KIND}
        (staging / MARKER_FILE).write_text(json.dumps(marker) + "\n", encoding="utf-8")
        try:
            # os.replace onto an empty directory is allowed on POSIX; drop it first for others.
            if out_dir.is_dir() and not any(out_dir.iterdir()):
                out_dir.rmdir()
            os.replace(staging, out_dir)
        except OSError:
            # Lost a race against a concurrent builder: accept its result if it is the same model.
            if _is_same_tiny_model(out_dir, seed):
                return out_dir
            raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return out_dir
