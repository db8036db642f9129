"""Sampling the bundled toy teacher (or any SDXL-family model) through the project's shared sampler.

``sample_teacher(model, digits, steps=50, cfg_scale=4.5, seed=0)`` encodes "a handwritten digit <word>" for each
requested digit, runs deterministic Euler (``trainer.sampling.sample_euler``) on ``teacher_sigmas(steps)`` with
classifier-free guidance against DMD2's unconditional input (all-zero prompt and pooled embeddings), decodes with
the model's VAE and returns images [N, 3, H, W] in [-1, 1]. Image i's initial noise depends only on (seed, i), so
results do not depend on the batch size.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

import trainer.assets.toy_teacher as _asset_pkg
from trainer.sampling import cfg, initial_latent, sample_euler, sigma_to_timestep, teacher_sigmas
from trainer.toy.digits import IMAGE_SIZE, prompts_for

TEACHER_FILE = Path(_asset_pkg.__file__).resolve().parent / "digits_teacher.safetensors"
TEACHER_JSON = TEACHER_FILE.with_name("teacher.json")
LATENT_CHANNELS = 4


def teacher_path() -> Path:
    return TEACHER_FILE


def load_toy_teacher(dtype: torch.dtype = torch.float32):
    """The bundled teacher, loaded like any user checkpoint."""
    from trainer.models.loading import load_sdxl

    return load_sdxl(TEACHER_FILE, dtype=dtype)


def vae_downscale(model) -> int:
    return 2 ** (len(model.vae.config.block_out_channels) - 1) if model.vae is not None else 8


def digit_conditioning(model, digits: Sequence[int] | Tensor, *, template: int = 0, resolution: int = IMAGE_SIZE):
    """SDXL conditioning for "a handwritten digit <word>" per digit (each distinct prompt is encoded once)."""
    from trainer.conditioning import encode_prompts

    digits = [int(d) for d in torch.as_tensor(digits).reshape(-1).tolist()]
    unique = sorted(set(digits))
    enc = encode_prompts(model, prompts_for(unique, template), resolution)
    pos = torch.tensor([unique.index(d) for d in digits])
    return enc.index(pos)


def make_denoiser(unet, schedule_sigmas: Tensor, cond, cfg_scale: float):
    """A VE denoiser ``(x, sigma) -> x0`` for an epsilon-prediction UNet with CFG (zero embeddings as uncond)."""
    from trainer.models.roles import unet_forward

    guided = cfg_scale != 1.0
    both = cond.cat([cond.zeros_like(), cond]) if guided else cond

    def denoise(x: Tensor, sigma: Tensor) -> Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float32)
        t = sigma_to_timestep(sigma.reshape(1), schedule_sigmas).to(x.device)
        x_in = x / torch.sqrt(1.0 + sigma.double() ** 2).to(x.dtype)
        if guided:
            eps_u, eps_c = unet_forward(unet, torch.cat([x_in, x_in]), t.expand(2 * x.shape[0]), both).float().chunk(2)
            eps = cfg(eps_u, eps_c, cfg_scale)
        else:
            eps = unet_forward(unet, x_in, t.expand(x.shape[0]), both).float()
        return (x.double() - sigma.double() * eps.double()).to(x.dtype)

    return denoise


def initial_noise(n: int, seed: int, latent_size: int, channels: int = LATENT_CHANNELS) -> Tensor:
    return torch.randn(n, channels, latent_size, latent_size, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def decode_latents(model, latents: Tensor, batch_size: int = 250) -> Tensor:
    """Model latents (already multiplied by the VAE scaling factor) -> images in [-1, 1]."""
    vae = model.vae
    scale = float(vae.config.scaling_factor)
    dtype = next(vae.parameters()).dtype
    out = [vae.decode(z.to(dtype) / scale).sample.float().clamp(-1, 1) for z in latents.split(batch_size)]
    return torch.cat(out)


@torch.no_grad()
def sample_teacher(model, digits: Sequence[int] | Tensor, *, steps: int = 50, cfg_scale: float = 4.5, seed: int = 0,
                   batch_size: int = 250, resolution: int = IMAGE_SIZE, return_latents: bool = False) -> Tensor:
    """Teacher samples for the given digits: Euler, ``steps`` steps, CFG ``cfg_scale``; images [N, 3, H, W]."""
    digits = torch.as_tensor(digits, dtype=torch.long).reshape(-1)
    unet = model.unet
    dtype = next(unet.parameters()).dtype
    sched_sigmas = model.schedule.sigmas.float()
    sigmas = teacher_sigmas(sched_sigmas, steps)
    cond_all = digit_conditioning(model, digits, resolution=resolution).to(dtype=dtype)
    noise = initial_noise(len(digits), seed, resolution // vae_downscale(model))
    latents = []
    for start in range(0, len(digits), batch_size):
        sl = slice(start, start + batch_size)
        cond = cond_all.index(torch.arange(len(digits))[sl])
        x = initial_latent(noise[sl], sigmas[0])
        x = sample_euler(make_denoiser(unet, sched_sigmas, cond, cfg_scale), x.to(dtype), sigmas)
        latents.append(x.float())
    latents = torch.cat(latents)
    return latents if return_latents else decode_latents(model, latents, batch_size)


def balanced_digits(n: int) -> Tensor:
    """0, 1, ..., 9, 0, 1, ... (n entries): the evaluation's prompt list."""
    return torch.arange(n) % 10
