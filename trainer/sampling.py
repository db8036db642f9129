"""DMD2 sampling as small pure functions, shared by ``dmd2 generate``, the trainer's validation and the ComfyUI nodes.

Everything here works in the VE (k-diffusion / ComfyUI) form ``x = x0 + sigma * eps``: a *denoiser* is a function
``denoise(x, sigma) -> x0``. The caller wraps its UNet so that the UNet sees ``x / sqrt(1 + sigma^2)`` and the
timestep that belongs to ``sigma``; see :func:`sigma_to_timestep`.

The DMD2 sampler: at each trained timestep predict x0, then re-noise it with *fresh* noise to the next sigma
(no ODE step, no CFG). Its first input must be unit-variance in the UNet's space, i.e. ``noise * sqrt(1 + sigma^2)``
in VE space, also when the first timestep is not 999 (the 1-step student at t=399).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

Denoiser = Callable[[Tensor, Tensor], Tensor]
NoiseFn = Callable[[int], Tensor]

# Student timesteps per preset (number of steps -> timesteps), as DMD2 trains them.
DMD2_PRESETS: dict[int, tuple[int, ...]] = {4: (999, 749, 499, 249), 2: (999, 499), 1: (399,)}


def preset_timesteps(steps: int) -> tuple[int, ...]:
    if steps not in DMD2_PRESETS:
        raise ValueError(f"no DMD2 preset for {steps} steps; use one of {sorted(DMD2_PRESETS)} or give timesteps explicitly")
    return DMD2_PRESETS[steps]


def sigmas_for_timesteps(schedule_sigmas: Tensor, timesteps: Sequence[int]) -> Tensor:
    """Sigmas exactly at the given training timesteps, followed by 0 (``len(timesteps) + 1`` values)."""
    picked = schedule_sigmas[torch.as_tensor(list(timesteps), dtype=torch.long)]
    return torch.cat([picked, picked.new_zeros(1)]).float()


def sigma_to_timestep(sigma: Tensor, schedule_sigmas: Tensor) -> Tensor:
    """Continuous timestep for ``sigma``: linear interpolation in log-sigma between the two neighbouring training
    timesteps (as k-diffusion and ComfyUI do), exact at the table's own sigmas."""
    log_table = schedule_sigmas.double().log()
    log_sigma = sigma.double().log().reshape(-1)
    dists = log_sigma[:, None] - log_table[None, :]
    low = (dists >= 0).cumsum(1).argmax(1).clamp(max=log_table.shape[0] - 2)
    high = low + 1
    w = ((log_table[low] - log_sigma) / (log_table[low] - log_table[high])).clamp(0, 1)
    t = (1 - w) * low + w * high
    # A table sigma that went through float32 lands within ~1e-4 of its integer timestep: snap it back.
    t = torch.where((t - t.round()).abs() < 1e-3, t.round(), t)
    return t.reshape(sigma.shape).to(sigma.dtype)


def initial_latent(noise: Tensor, sigma: float | Tensor, latent: Tensor | None = None) -> Tensor:
    """First VE input: from scratch, unit-variance noise in the UNet's space; img2img, ``latent + sigma * noise``."""
    sigma = torch.as_tensor(sigma, dtype=noise.dtype, device=noise.device)
    if latent is None:
        return noise * (1.0 + sigma**2).sqrt()
    return latent + noise * sigma


def dmd2_renoise(x0: Tensor, sigma_next: Tensor, noise: Tensor) -> Tensor:
    """One DMD2 transition: the predicted clean sample, noised afresh to the next sigma (x0 itself at sigma 0)."""
    return x0 + noise * sigma_next if float(sigma_next) > 0 else x0


def sample_dmd2(denoise: Denoiser, x: Tensor, sigmas: Tensor, noise_fn: NoiseFn) -> Tensor:
    """Run the DMD2 sampler. ``noise_fn(i)`` gives the fresh noise used after step ``i``."""
    for i in range(len(sigmas) - 1):
        x0 = denoise(x, sigmas[i])
        x = dmd2_renoise(x0, sigmas[i + 1], noise_fn(i)) if float(sigmas[i + 1]) > 0 else x0
    return x


def teacher_sigmas(schedule_sigmas: Tensor, steps: int) -> Tensor:
    """``steps`` sigmas spaced evenly in timestep from T-1 down to 0 (diffusers' "trailing"-like spacing), then 0."""
    t = torch.linspace(schedule_sigmas.shape[0] - 1, 0, steps, dtype=torch.float64)
    log_table = schedule_sigmas.double().log()
    low, frac = t.floor().long(), t - t.floor()
    high = (low + 1).clamp(max=log_table.shape[0] - 1)
    sig = ((1 - frac) * log_table[low] + frac * log_table[high]).exp()
    return torch.cat([sig, sig.new_zeros(1)]).float()


def sample_euler(denoise: Denoiser, x: Tensor, sigmas: Tensor) -> Tensor:
    """Deterministic Euler on the probability-flow ODE (k-diffusion's ``sample_euler`` without churn)."""
    for i in range(len(sigmas) - 1):
        x0 = denoise(x, sigmas[i])
        d = (x - x0) / sigmas[i]
        x = x + d * (sigmas[i + 1] - sigmas[i])
    return x


def cfg(uncond: Tensor, cond: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance ``u + w (c - u)``. Valid on eps, v or x0 alike: each is affine in the others at a
    fixed (x_t, t), so guiding any of them gives the same result."""
    return uncond + scale * (cond - uncond)


def denoise_timesteps(timesteps: Sequence[int], denoise: float, num_train_timesteps: int = 1000) -> tuple[int, ...]:
    """img2img: the trained timesteps below ``denoise * T`` (the student knows no others), at least the last one.
    ``denoise = 1`` keeps them all; 0.5 keeps [499, 249] of the 4-step preset."""
    if not 0.0 < denoise <= 1.0:
        raise ValueError(f"denoise must be in (0, 1], got {denoise}")
    limit = denoise * num_train_timesteps
    kept = tuple(int(t) for t in timesteps if t < limit)
    return kept or (int(timesteps[-1]),)


def seeded_step_noise(seed: int, shape, *, device=None, dtype=torch.float32) -> NoiseFn:
    """The fresh noises of :func:`sample_dmd2` as ``dmd2 generate`` draws them for one image: a CPU generator
    seeded with ``seed``, whose first draw (of ``shape``) is the starting noise, then one draw per step. Any caller
    that draws its starting noise the same way (ComfyUI's seeded noise does, for a batch of one) gets the same image."""
    gen = torch.Generator().manual_seed(int(seed))
    torch.randn(shape, generator=gen)  # the starting noise, drawn by the caller
    return lambda i: torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
