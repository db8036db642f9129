"""Sampling rows for the toy evaluation and the demo: the teacher (Euler + CFG) or a student (DMD2 sampler) for a
list of prompted digits, through the same ``trainer.generate`` functions as ``dmd2 generate`` and the trainer's
validation. Image i's noise depends only on (seed, i), never on the batch it is drawn in."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

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
def sample_digits(model, digits: Sequence[int], draw: Callable[[Conditioning, list[int], tuple], Tensor], *, seed: int = 0,
                  batch_size: int = 250, resolution: int = IMAGE_SIZE) -> tuple[Tensor, float]:
    """Images [N, 3, H, W] in [-1, 1] (on the CPU) for ``digits``, from ``draw(cond, noise_seeds, latent_shape) ->
    latents`` in batches, and the wall time per image (sampling + VAE decode). Image i's noise seed depends only on
    (seed, i), never on the batch it is drawn in."""
    cond_all = digit_conditioning(model, digits, resolution)
    shape = gen.latent_shape(model.unet, model.vae, resolution)
    images = []
    start = time.perf_counter()
    for i in range(0, len(digits), batch_size):
        idx = torch.arange(i, min(i + batch_size, len(digits)))
        latents = draw(cond_all.index(idx), [seed * 1_000_003 + int(j) for j in idx], shape)
        images.append(gen.decode(model.vae, latents).cpu())
    return torch.cat(images), (time.perf_counter() - start) / len(digits)


def sample_row(model, row: Row, digits: Sequence[int], *, seed: int = 0, batch_size: int = 250,
               resolution: int = IMAGE_SIZE) -> tuple[Tensor, float]:
    """``sample_digits`` for a table row. Sampling runs where the UNet is (the VAE must be there too); the noise is
    drawn on the CPU, as everywhere."""
    weight = next(model.unet.parameters())
    call, on = gen.unet_call(model.unet), {"device": weight.device, "dtype": weight.dtype}

    def draw(cond: Conditioning, seeds: list[int], shape: tuple) -> Tensor:
        if row.timesteps is not None:
            return gen.sample_student(call, model.schedule, cond, row.timesteps, seeds, shape, **on)
        return gen.sample_teacher(call, model.schedule, cond, cond.zeros_like(), row.steps, row.cfg, seeds, shape, **on)

    return sample_digits(model, digits, draw, seed=seed, batch_size=batch_size, resolution=resolution)
