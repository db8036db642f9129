"""The toy data set: scikit-learn's bundled handwritten digits (UCI optdigits test set, 1,797 images of 8x8 pixels,
grey levels 0..16), upsampled to 32x32 and scaled to [-1, 1] (background -1, ink +1), with text prompts.

The digits ship inside scikit-learn, so nothing is downloaded. Every function here is deterministic.
"""
from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

IMAGE_SIZE = 32
NUM_DIGITS = 10
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# Prompt templates used to train the teacher. Template 0 is the canonical one used for sampling and evaluation.
PROMPT_TEMPLATES = (
    "a handwritten digit {word}",
    "the number {word}",
    "a drawing of the digit {num}",
    "{word}",
    "a scanned image of a handwritten {word}",
)


def prompt_for(digit: int, template: int = 0) -> str:
    """``prompt_for(7) == "a handwritten digit seven"``."""
    if not 0 <= int(digit) < NUM_DIGITS:
        raise ValueError(f"digit must be 0..9, got {digit}")
    return PROMPT_TEMPLATES[template].format(word=DIGIT_WORDS[int(digit)], num=int(digit))


def prompts_for(digits, template: int = 0) -> list[str]:
    return [prompt_for(int(d), template) for d in digits]


def all_prompts() -> list[str]:
    """Every (template, digit) prompt the teacher was trained on, template-major (50 prompts)."""
    return [prompt_for(d, t) for t in range(len(PROMPT_TEMPLATES)) for d in range(NUM_DIGITS)]


def digit_from_prompt(prompt: str) -> int | None:
    """The digit a prompt names (word or numeral), or None."""
    words = prompt.lower().replace(",", " ").split()
    for w in reversed(words):
        if w in DIGIT_WORDS:
            return DIGIT_WORDS.index(w)
        if w.isdigit() and len(w) == 1:
            return int(w)
    return None


@functools.lru_cache(maxsize=1)
def _raw() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    data = load_digits()
    return data.images.astype(np.float32), data.target.astype(np.int64)


def upsample(images8: Tensor) -> Tensor:
    """[N, 8, 8] grey levels 0..16 -> [N, 1, 32, 32] in [-1, 1] (bilinear, clamped)."""
    x = images8.float().reshape(-1, 1, 8, 8) / 16.0
    x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    return (x * 2.0 - 1.0).clamp(-1.0, 1.0)


def load_digits_32() -> tuple[Tensor, Tensor]:
    """All 1,797 digits: (images [1797, 1, 32, 32] in [-1, 1], labels [1797] int64)."""
    images, labels = _raw()
    return upsample(torch.from_numpy(images)), torch.from_numpy(labels)


def split_indices(holdout_fraction: float = 0.2, seed: int = 0) -> tuple[Tensor, Tensor]:
    """A fixed, stratified train / held-out split of the 1,797 digits (the classifier never sees the held-out part)."""
    _, labels = _raw()
    rng = np.random.default_rng(seed)
    train, held = [], []
    for d in range(NUM_DIGITS):
        idx = np.flatnonzero(labels == d)
        rng.shuffle(idx)
        n_held = int(round(len(idx) * holdout_fraction))
        held.append(idx[:n_held])
        train.append(idx[n_held:])
    return torch.from_numpy(np.sort(np.concatenate(train))), torch.from_numpy(np.sort(np.concatenate(held)))


def to_uint8_grid(images: Tensor, nrow: int = 10) -> np.ndarray:
    """[N, C, H, W] in [-1, 1] -> one uint8 grid image [rows*H, nrow*W] (grey) or [.., 3] (RGB), 1-pixel gaps."""
    x = images.detach().float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8).cpu().numpy()
    n, c, h, w = x.shape
    rows = (n + nrow - 1) // nrow
    grid = np.zeros((rows * (h + 1) + 1, nrow * (w + 1) + 1, c), dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, nrow)
        grid[1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + q * (w + 1) : 1 + q * (w + 1) + w] = x[i].transpose(1, 2, 0)
    return grid[..., 0] if c == 1 else grid
