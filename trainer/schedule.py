"""The discrete noise schedule and every conversion between x0, eps, v and the model's output.

Conventions (DDPM/VP, as diffusers): ``x_t = sqrt(a_t) * x0 + sqrt(1 - a_t) * eps`` with ``a_t = alphas_cumprod[t]``,
``v = sqrt(a_t) * eps - sqrt(1 - a_t) * x0``. ComfyUI and k-diffusion use the equivalent VE form
``x = x0 + sigma * eps`` with ``sigma_t = sqrt((1 - a_t) / a_t)``; the UNet sees ``x / sqrt(1 + sigma^2)``.
Coefficients are computed in float64 (as DMD2's reference does) and cast to the tensor's dtype.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

PREDICTION_TYPES = ("epsilon", "v_prediction")
# diffusers clamps the terminal alpha of a zero-terminal-SNR schedule to this to keep eps -> x0 finite.
ZTSNR_TERMINAL_ALPHA_CUMPROD = 2.0**-24


def scaled_linear_betas(beta_start: float = 0.00085, beta_end: float = 0.012, num_train_timesteps: int = 1000) -> Tensor:
    """SDXL's (and SD's) beta schedule."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Lin et al. 2023, algorithm 1: shift and scale sqrt(alphas_cumprod) so the last step has SNR 0."""
    sqrt_ac = torch.cumprod(1.0 - betas.double(), 0).sqrt()
    first, last = sqrt_ac[0].clone(), sqrt_ac[-1].clone()
    sqrt_ac = (sqrt_ac - last) * first / (first - last)
    ac = sqrt_ac**2
    alphas = torch.cat([ac[:1], ac[1:] / ac[:-1]])
    return 1.0 - alphas


@dataclass(frozen=True)
class NoiseSchedule:
    alphas_cumprod: Tensor  # [T], float64
    prediction_type: str = "epsilon"
    zero_terminal_snr: bool = False

    def __post_init__(self):
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {self.prediction_type!r}")

    @classmethod
    def sdxl(cls, prediction_type: str = "epsilon", zero_terminal_snr: bool = False, **beta_kwargs) -> "NoiseSchedule":
        betas = scaled_linear_betas(**beta_kwargs)
        if zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        ac = torch.cumprod(1.0 - betas, 0)
        if zero_terminal_snr:
            ac[-1] = ZTSNR_TERMINAL_ALPHA_CUMPROD
        return cls(ac, prediction_type, zero_terminal_snr)

    @property
    def num_train_timesteps(self) -> int:
        return self.alphas_cumprod.shape[0]

    @property
    def sigmas(self) -> Tensor:
        """VE sigma of every training timestep (float64)."""
        return ((1 - self.alphas_cumprod) / self.alphas_cumprod).sqrt()

    def coefficients(self, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        """(sqrt(a_t), sqrt(1 - a_t)) for integer timesteps ``t`` [B], shaped to broadcast against ``like``."""
        a = self.alphas_cumprod.to(like.device)[t.long().to(like.device)]
        shape = (-1,) + (1,) * (like.ndim - 1)
        return a.sqrt().view(shape), (1 - a).sqrt().view(shape)


def add_noise(schedule: NoiseSchedule, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
    s, n = schedule.coefficients(t, x0)
    return (s * x0.double() + n * eps.double()).to(x0.dtype)


def velocity(schedule: NoiseSchedule, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
    s, n = schedule.coefficients(t, x0)
    return (s * eps.double() - n * x0.double()).to(x0.dtype)


def training_target(schedule: NoiseSchedule, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
    """What the UNet is trained to output at (x_t, t): eps or v."""
    return eps if schedule.prediction_type == "epsilon" else velocity(schedule, x0, eps, t)


def output_to_x0(schedule: NoiseSchedule, output: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
    """The UNet's output at (x_t, t) -> predicted clean sample x0."""
    s, n = schedule.coefficients(t, x_t)
    out, x = output.double(), x_t.double()
    x0 = (x - n * out) / s if schedule.prediction_type == "epsilon" else s * x - n * out
    return x0.to(output.dtype)


def output_to_eps(schedule: NoiseSchedule, output: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
    """The UNet's output at (x_t, t) -> predicted noise eps."""
    if schedule.prediction_type == "epsilon":
        return output
    s, n = schedule.coefficients(t, x_t)
    return (n * x_t.double() + s * output.double()).to(output.dtype)



def ve_output_to_x0(output: Tensor, x: Tensor, sigma: Tensor, prediction_type: str) -> Tensor:
    """The UNet's output -> x0 in the VE form used by the samplers: ``x = x0 + sigma * eps`` and the UNet saw
    ``x / sqrt(1 + sigma^2)``. Works for any (also fractional) sigma, since ``a = 1 / (1 + sigma^2)``."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1, *([1] * (x.ndim - 1)))
    out, xd = output.double(), x.double()
    if prediction_type == "epsilon":
        x0 = xd - sigma * out
    else:  # v: x0 = sqrt(a) * x_in - sqrt(1 - a) * v, with x_in = x * sqrt(a)
        a = 1.0 / (1.0 + sigma**2)
        x0 = a * xd - (1 - a).sqrt() * out
    return x0.to(output.dtype)
