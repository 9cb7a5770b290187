"""How sd15/tokenizer/ was made: SD 1.x's CLIP tokenizer files, derived from CLIP's BPE merges.

SD 1.x checkpoints carry no tokenizer, and no hub can be reached from a GPU node, so vct ships
the tokenizer beside the component configs. Its vocabulary is not data of its own: CLIP builds
it from the merge list (the 256 byte symbols, the same with the end-of-word mark, one entry per
merge, then the two special tokens). The merge list is CLIP's `bpe_simple_vocab_16e6.txt.gz`
(MIT licence), as packaged in `open_clip_torch`. Run once by hand:

    python -m vct.model_configs.clip_bpe bpe_simple_vocab_16e6.txt.gz vct/model_configs/sd15/tokenizer
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

MERGES = 49152 - 256 - 2
"""CLIP uses the first 48 894 merges of the file, so that the vocabulary has 49 408 entries."""


def byte_symbols() -> list[str]:
    """The character that stands for each byte in byte-level BPE (GPT-2's table), in CLIP's
    vocabulary order: the printable bytes first, then the others mapped above U+0100."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


def write_tokenizer(bpe_gz: Path, out: Path) -> None:
    lines = gzip.open(bpe_gz).read().decode("utf-8").split("\n")[1:MERGES + 1]
    merges = [tuple(line.split()) for line in lines]
    symbols = byte_symbols()
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)},
                                               ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges)
                                    + "\n", encoding="utf-8")


if __name__ == "__main__":
    write_tokenizer(Path(sys.argv[1]), Path(sys.argv[2]))
