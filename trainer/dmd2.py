"""One DMD2 iteration, built from the pure objectives (``trainer.objectives``) and the three roles on one UNet
(``trainer.models.roles``). The training loop (``trainer.train``) owns optimisers, logging and checkpoints.

Per iteration: the student makes a sample (with backward simulation for multi-step students); on every
``update_every``-th iteration the student is updated with the DMD loss (+ the GAN generator loss); the critic and the
GAN head are updated on every iteration with the denoising loss on the detached sample (+ the GAN critic loss).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from trainer import objectives as obj
from trainer.models.gan_head import GANHead
from trainer.models.roles import Conditioning, DMD2Roles
from trainer.sampling import cfg
from trainer.schedule import NoiseSchedule, add_noise, output_to_x0, training_target


@dataclass
class DMD2Settings:
    student_timesteps: tuple[int, ...] = (999, 749, 499, 249)
    backward_simulation: bool = True
    guidance_scale: float = 8.0
    dmd_t_range: tuple[int, int] = (20, 980)
    gan_student_weight: float = 5e-3
    gan_critic_weight: float = 1e-2
    use_gan: bool = True
    gan_t_max: int = 999  # the GAN re-noises real and fake at t ~ U[0, gan_t_max]
    dmd_noise_draws: int = 1  # (t, noise) re-noisings per student sample whose DMD gradients are averaged
    critic_loss: str = "target"  # "target": the teacher's own eps/v loss (DMD2); "x0_high_noise": objectives.critic_x0_loss
    dmd_t_below_step: bool = False  # step k > 0: its DMD timestep in dmd_t_range cut at t_k (objectives.window_below)


@dataclass
class StepRandomness:
    """Every random draw of one iteration comes from these generators, seeded from (seed, step[, rank]): a resumed
    run repeats exactly what a straight run would have done. ``shared`` is the same on every rank (the backward
    simulation step k must agree across processes); ``local`` differs per rank (noise, prompts)."""

    local: torch.Generator
    shared: torch.Generator

    def randn(self, shape, like: Tensor) -> Tensor:
        return torch.randn(shape, generator=self.local).to(device=like.device, dtype=like.dtype)

    def timesteps(self, n: int, low: int, high: int, device) -> Tensor:
        return obj.sample_timesteps(n, low, high, self.local, device)


@dataclass
class Losses:
    values: dict[str, float] = field(default_factory=dict)

    def add(self, name: str, value: Tensor) -> Tensor:
        self.values[name] = float(value.detach())
        return value


@torch.no_grad()
def student_input(roles: DMD2Roles, schedule: NoiseSchedule, cond: Conditioning, latent_shape, settings: DMD2Settings,
                  rng: StepRandomness, device, dtype, real_latents: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The noisy input the student is trained on, and its timestep.

    Backward simulation (DMD2 section 4.5): draw k (shared across ranks), start from pure noise and run the current
    student k steps of its own sampler, so step k is trained on what it sees at inference. Without it (ablation),
    step k > 0 sees noised real latents when there are any. The first step's input is always pure noise.
    """
    ts = settings.student_timesteps
    k = int(torch.randint(len(ts), (1,), generator=rng.shared)) if len(ts) > 1 else 0
    batch = len(cond)
    template = torch.empty(0, device=device, dtype=dtype)
    x = rng.randn((batch, *latent_shape), template)  # unit-variance noise: the UNet's input at the first timestep
    if k > 0 and not settings.backward_simulation and real_latents is not None:
        t = torch.full((batch,), ts[k], device=device, dtype=torch.long)
        return add_noise(schedule, real_latents.to(device, dtype), rng.randn(x.shape, x), t), t
    steps = k if settings.backward_simulation else 0
    for i in range(steps):
        t = torch.full((batch,), ts[i], device=device, dtype=torch.long)
        x0 = output_to_x0(schedule, roles.student(x, t, cond), x, t)
        t_next = torch.full((batch,), ts[i + 1], device=device, dtype=torch.long)
        x = add_noise(schedule, x0, rng.randn(x.shape, x), t_next)
    k = steps if settings.backward_simulation else 0
    return x, torch.full((batch,), ts[k], device=device, dtype=torch.long)


def student_losses(roles: DMD2Roles, head: GANHead | None, schedule: NoiseSchedule, x0: Tensor, cond: Conditioning,
                   uncond: Conditioning, settings: DMD2Settings, rng: StepRandomness, losses: Losses, step_index: int = 0) -> Tensor:
    """DMD loss (+ GAN generator loss) for the student's sample ``x0`` (which carries the student's graph), made by
    the student's step ``step_index`` (which picks the critic when there is one per step).

    With ``dmd_noise_draws`` > 1 each sample is re-noised that many times, all in one no-gradient pass of the teacher
    and of the critic, and the DMD gradients are averaged: a lower-variance update without more student samples.
    """
    batch, draws = x0.shape[0], settings.dmd_noise_draws
    x_clean = x0.detach().repeat(draws, *([1] * (x0.ndim - 1)))
    cond_rows = Conditioning.cat([cond] * draws)
    window = settings.dmd_t_range
    if settings.dmd_t_below_step and step_index > 0:  # the first step draws from pure noise, whatever its t label
        window = obj.window_below(window, settings.student_timesteps[step_index])
    t = rng.timesteps(len(x_clean), *window, x0.device)
    x_t = add_noise(schedule, x_clean, rng.randn(x_clean.shape, x0), t)
    with torch.no_grad():
        if settings.guidance_scale == 1.0:  # no guidance: the unconditional pass would cancel out
            out_real = roles.teacher(x_t, t, cond_rows)
        else:
            rows = len(x_t)
            both = roles.teacher(torch.cat([x_t, x_t]), torch.cat([t, t]), Conditioning.cat([cond_rows] + [uncond] * draws))
            out_real = cfg(both[rows:], both[:rows], settings.guidance_scale)
        p_real = output_to_x0(schedule, out_real, x_t, t).double()
        p_fake = output_to_x0(schedule, roles.critic(x_t, t, cond_rows, step_index), x_t, t).double()
    loss = losses.add("student/dmd", obj.dmd_loss(x0, p_real, p_fake))
    if settings.use_gan and head is not None:
        t_gan = rng.timesteps(batch, 0, settings.gan_t_max, x0.device)
        noisy = add_noise(schedule, x0, rng.randn(x0.shape, x0), t_gan)
        logits = head(roles.critic_features(noisy, t_gan, cond, step_index))
        loss = loss + settings.gan_student_weight * losses.add("student/gan", obj.gan_student_loss(logits))
    return loss


def critic_losses(roles: DMD2Roles, head: GANHead | None, schedule: NoiseSchedule, fake_x0: Tensor, cond: Conditioning,
                  settings: DMD2Settings, rng: StepRandomness, losses: Losses,
                  real_x0: Tensor | None = None, real_cond: Conditioning | None = None, step_index: int = 0) -> Tensor:
    """Denoising loss of the fake score on the detached student samples (full timestep range), plus the GAN critic
    loss with real and fake each re-noised at their own random timestep. ``step_index``: the student step that made
    the samples (its critic trains, when there is one per step)."""
    fake_x0 = fake_x0.detach()
    batch, T = fake_x0.shape[0], schedule.num_train_timesteps
    t = rng.timesteps(batch, 0, T - 1, fake_x0.device)
    eps = rng.randn(fake_x0.shape, fake_x0)
    x_t = add_noise(schedule, fake_x0, eps, t)
    prediction = roles.critic(x_t, t, cond, step_index)
    if settings.critic_loss == "x0_high_noise":
        s, n = schedule.coefficients(t, fake_x0)
        denoise = obj.critic_x0_loss(output_to_x0(schedule, prediction, x_t, t), fake_x0, (s / n).pow(2))
    else:
        denoise = obj.critic_denoising_loss(prediction, training_target(schedule, fake_x0, eps, t))
    loss = losses.add("critic/denoise", denoise)
    if settings.use_gan and head is not None and real_x0 is not None:
        t_fake = rng.timesteps(batch, 0, settings.gan_t_max, fake_x0.device)
        fake_noisy = add_noise(schedule, fake_x0, rng.randn(fake_x0.shape, fake_x0), t_fake)
        t_real = rng.timesteps(real_x0.shape[0], 0, settings.gan_t_max, fake_x0.device)
        real_noisy = add_noise(schedule, real_x0, rng.randn(real_x0.shape, real_x0), t_real)
        if real_noisy.shape[1:] == fake_noisy.shape[1:]:  # one forward for both halves (same bucket)
            both = roles.critic_features(torch.cat([fake_noisy, real_noisy]), torch.cat([t_fake, t_real]), Conditioning.cat([cond, real_cond]),
                                         step_index)
            fake_logits, real_logits = head(both).split([batch, real_x0.shape[0]])
        else:
            fake_logits = head(roles.critic_features(fake_noisy, t_fake, cond, step_index))
            real_logits = head(roles.critic_features(real_noisy, t_real, real_cond, step_index))
        gan = losses.add("critic/gan", obj.gan_critic_loss(fake_logits, real_logits))
        loss = loss + settings.gan_critic_weight * gan
        losses.add("critic/real_logit", real_logits.mean())
        losses.add("critic/fake_logit", fake_logits.mean())
    return loss
