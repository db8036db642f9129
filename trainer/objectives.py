"""DMD2's objectives as pure functions of tensors (no models, no optimisers): easy to read and to unit-test.

Notation: ``x`` is the student's sample (x0 space, latents), ``p_real`` / ``p_fake`` the teacher's and the
critic's x0 predictions at a re-noised copy of ``x``. Yin et al. 2024 (DMD2), section 4 and appendix.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def dmd_gradient(x: Tensor, p_real: Tensor, p_fake: Tensor) -> Tensor:
    """The distribution-matching direction ``(p_fake - p_real)``, normalised per sample by the mean absolute
    distance between the sample and the teacher's prediction (DMD's weighting; keeps the step size scale-free)."""
    dims = tuple(range(1, x.ndim))
    weight = (x - p_real).abs().mean(dim=dims, keepdim=True)
    return torch.nan_to_num((p_fake - p_real) / weight)


def dmd_loss(x: Tensor, p_real: Tensor, p_fake: Tensor) -> Tensor:
    """A surrogate whose gradient w.r.t. ``x`` is ``dmd_gradient / x.numel()``: ``0.5 * mse(x, sg(x - grad))``.

    ``p_real`` / ``p_fake`` may hold several re-noisings of each sample, stacked draw by draw (``draws * batch``
    rows: all samples at the first draw, then all at the second, ...); the gradient is then their mean.
    """
    draws = p_real.shape[0] // x.shape[0]
    grads = [dmd_gradient(x.detach(), r, f) for r, f in zip(p_real.detach().chunk(draws), p_fake.detach().chunk(draws))]
    grad = torch.stack(grads).mean(0)
    return 0.5 * F.mse_loss(x.float(), (x - grad).detach().float())


def critic_denoising_loss(prediction: Tensor, target: Tensor) -> Tensor:
    """The fake score's regular diffusion loss on (detached) student samples: MSE to the eps or v target."""
    return F.mse_loss(prediction.float(), target.float())


def critic_x0_loss(x0_prediction: Tensor, x0: Tensor, snr: Tensor) -> Tensor:
    """The fake score's diffusion loss weighted so that it is the eps loss where the signal dominates (SNR >= 1) and
    the x0 loss where the noise does: ``max(SNR, 1) * |x0_hat - x0|^2``. The eps loss weighs an x0 error by SNR, which
    at t = 900 is about 0.02, so it hardly constrains the high-noise x0 predictions that the DMD gradient uses.
    ``snr`` broadcasts against the samples ([B, 1, 1, 1])."""
    return (snr.clamp(min=1.0) * (x0_prediction.double() - x0.double()).pow(2)).mean().float()


def gan_student_loss(fake_logits: Tensor) -> Tensor:
    """Non-saturating generator loss: ``softplus(-D(G(z)))``."""
    return F.softplus(-fake_logits.float()).mean()


def gan_critic_loss(fake_logits: Tensor, real_logits: Tensor) -> Tensor:
    """Discriminator loss: ``softplus(D(fake)) + softplus(-D(real))``."""
    return F.softplus(fake_logits.float()).mean() + F.softplus(-real_logits.float()).mean()


def sample_timesteps(batch: int, low: int, high: int, generator: torch.Generator, device=None) -> Tensor:
    """Integer timesteps uniform in [low, high] (inclusive)."""
    return torch.randint(low, high + 1, (batch,), generator=generator, device=generator.device).to(device)


def timestep_range(num_train_timesteps: int, min_fraction: float = 0.02, max_fraction: float = 0.98) -> tuple[int, int]:
    """An inclusive integer window [min_fraction T, max_fraction T], capped at T - 1. The defaults are DMD's window for
    the distribution-matching loss (20..980 for T = 1000); the GAN's re-noising uses [0, gan.max_t]."""
    return int(min_fraction * num_train_timesteps), min(int(max_fraction * num_train_timesteps), num_train_timesteps - 1)


def window_below(window: tuple[int, int], step_timestep: int) -> tuple[int, int]:
    """DMD's timestep window cut at a later student step's input timestep ``t_k``: [low, min(high, t_k)] (never empty).
    The idea: step k starts from an input at t_k, where what only shows at higher noise (the layout) is already fixed,
    so a DMD gradient drawn above t_k asks the weights all steps share for a change that step cannot make."""
    low, high = window
    return low, max(low, min(high, step_timestep))
