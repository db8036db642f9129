"""The bundled toy teacher: where it lives, loading it like any user checkpoint, and sampling it.

Sampling goes through ``trainer.toy.rows`` (and so ``trainer.generate`` and ``trainer.sampling``, as everywhere
else): Euler on ``teacher_sigmas(steps)`` with classifier-free guidance against DMD2's unconditional input (all-zero
prompt and pooled embeddings). Image i's noise depends only on (seed, i), so results do not depend on the batching.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

import trainer.assets.toy_teacher as _asset_pkg
from trainer.toy.digits import IMAGE_SIZE

TEACHER_FILE = Path(_asset_pkg.__file__).resolve().parent / "digits_teacher.safetensors"
TEACHER_JSON = TEACHER_FILE.with_name("teacher.json")


def teacher_path() -> Path:
    return TEACHER_FILE


def load_toy_teacher(dtype: torch.dtype = torch.float32):
    """The bundled teacher, loaded like any user checkpoint."""
    from trainer.models.loading import load_sdxl

    return load_sdxl(TEACHER_FILE, dtype=dtype)


@torch.no_grad()
def sample_teacher(model, digits: Sequence[int] | Tensor, *, steps: int = 50, cfg_scale: float = 2.0, seed: int = 0,
                   batch_size: int = 250, resolution: int = IMAGE_SIZE) -> Tensor:
    """Teacher samples for the given digits: Euler, ``steps`` steps, CFG ``cfg_scale``; images [N, 3, H, W]."""
    from trainer.toy.rows import Row, sample_row

    digits = [int(d) for d in torch.as_tensor(digits).reshape(-1)]
    images, _ = sample_row(model, Row("teacher", steps, cfg_scale), digits, seed=seed, batch_size=batch_size, resolution=resolution)
    return images


def balanced_digits(n: int) -> Tensor:
    """0, 1, ..., 9, 0, 1, ... (n entries): the evaluation's prompt list."""
    return torch.arange(n) % 10
