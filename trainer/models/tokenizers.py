"""SDXL's two CLIP tokenizers, built offline from the BPE table shipped in ``trainer/assets``.

The table is OpenAI CLIP's ``bpe_simple_vocab_16e6.txt.gz`` as redistributed (MIT licence) inside the
open-clip-torch wheel; see ``trainer/assets/clip_tokenizer/README.md``. Both SDXL tokenizers share it; they differ
only in the padding token ("<|endoftext|>" for CLIP-L, "!" for CLIP-G).
"""
from __future__ import annotations

import atexit
import functools
import gzip
import json
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path

from transformers import CLIPTokenizer

_NUM_MERGES = 49152 - 256 - 2  # CLIP keeps the first 48,894 merges of the table
MAX_LENGTH = 77


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode map."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


@functools.lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    raw = resources.files("trainer.assets.clip_tokenizer").joinpath("bpe_simple_vocab_16e6.txt.gz").read_bytes()
    lines = gzip.decompress(raw).decode("utf-8").split("\n")
    merges = lines[1 : 1 + _NUM_MERGES]
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(tokens)}, merges


@functools.lru_cache(maxsize=1)
def _tokenizer_files() -> tuple[str, str]:
    """vocab.json and merges.txt in a private temp folder: the file form works on transformers 4 and 5 alike."""
    vocab, merges = clip_vocab_and_merges()
    folder = Path(tempfile.mkdtemp(prefix="dmd2-clip-tokenizer-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
    vocab_file.write_text(json.dumps(vocab), encoding="utf-8")
    merges_file.write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return os.fspath(vocab_file), os.fspath(merges_file)


def clip_tokenizer(pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    vocab_file, merges_file = _tokenizer_files()
    tok = CLIPTokenizer(vocab_file, merges_file, pad_token=pad_token)
    tok.model_max_length = MAX_LENGTH
    return tok


def sdxl_tokenizers() -> tuple[CLIPTokenizer, CLIPTokenizer]:
    """(tokenizer for CLIP-L, tokenizer for CLIP-G) exactly as SDXL's diffusers folders configure them."""
    return clip_tokenizer("<|endoftext|>"), clip_tokenizer("!")
