"""Sampling rows for the toy evaluation and the demo: the teacher (Euler + CFG) or a student (DMD2 sampler) for a
list of prompted digits, through the same ``trainer.generate`` functions as ``dmd2 generate`` and the trainer's
validation. Image i's noise depends only on (seed, i), never on the batch it is drawn in."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from trainer import generate as gen
from trainer.conditioning import encode_prompts
from trainer.models.roles import Conditioning
from trainer.toy.digits import IMAGE_SIZE, prompts_for


@dataclass(frozen=True)
class Row:
    """One line of the table: the teacher with ``steps`` Euler steps at CFG ``cfg``, or a student at ``timesteps``."""

    name: str
    steps: int
    cfg: float = 1.0
    timesteps: tuple[int, ...] | None = None  # set for students


def digit_conditioning(model, digits: Sequence[int], resolution: int = IMAGE_SIZE) -> Conditioning:
    """Conditioning for "a handwritten digit <word>" per digit (each distinct prompt encoded once)."""
    digits = [int(d) for d in digits]
    unique = sorted(set(digits))
    enc = encode_prompts(model, prompts_for(unique), resolution)
    return enc.index(torch.tensor([unique.index(d) for d in digits]))


@torch.no_grad()
def sample_row(model, row: Row, digits: Sequence[int], *, seed: int = 0, batch_size: int = 250,
               resolution: int = IMAGE_SIZE) -> tuple[Tensor, float]:
    """Images [N, 3, H, W] in [-1, 1] (on the CPU) for ``digits`` and the wall time per image (sampling + VAE decode).
    Sampling runs where the UNet is (the VAE must be there too); the noise is drawn on the CPU, as everywhere."""
    cond_all = digit_conditioning(model, digits, resolution)
    weight = next(model.unet.parameters())
    shape = gen.latent_shape(model.unet, model.vae, resolution)
    call = gen.unet_call(model.unet)
    images = []
    start = time.perf_counter()
    for i in range(0, len(digits), batch_size):
        idx = torch.arange(i, min(i + batch_size, len(digits)))
        cond, seeds = cond_all.index(idx), [seed * 1_000_003 + int(j) for j in idx]
        if row.timesteps is not None:
            lat = gen.sample_student(call, model.schedule, cond, row.timesteps, seeds, shape, device=weight.device, dtype=weight.dtype)
        else:
            lat = gen.sample_teacher(call, model.schedule, cond, cond.zeros_like(), row.steps, row.cfg, seeds, shape,
                                     device=weight.device, dtype=weight.dtype)
        images.append(gen.decode(model.vae, lat).cpu())
    return torch.cat(images), (time.perf_counter() - start) / len(digits)
