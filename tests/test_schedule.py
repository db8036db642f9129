"""Noise-schedule math and the shared sampling functions, checked against diffusers' schedulers and ComfyUI's
published sigmas."""
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from trainer import sampling
from trainer.schedule import NoiseSchedule, add_noise, output_to_eps, output_to_x0, training_target, velocity


def _diffusers(prediction_type="epsilon", ztsnr=False, cls=DDPMScheduler):
    return cls(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
               prediction_type=prediction_type, rescale_betas_zero_snr=ztsnr, clip_sample=False)


@pytest.mark.parametrize("ztsnr", [False, True])
def test_alphas_cumprod_match_diffusers(ztsnr):
    ours = NoiseSchedule.sdxl(zero_terminal_snr=ztsnr).alphas_cumprod
    theirs = _diffusers(ztsnr=ztsnr).alphas_cumprod.double()
    if ztsnr:  # diffusers' DDPM keeps an exact 0 at the end; we clamp to 2**-24 like its Euler scheduler
        assert theirs[-1] == 0 and ours[-1] == 2.0**-24
        ours, theirs = ours[:-1], theirs[:-1]
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)


def test_add_noise_and_velocity_match_diffusers():
    sched, ref = NoiseSchedule.sdxl(), _diffusers()
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([0, 500, 999])
    torch.testing.assert_close(add_noise(sched, x0, eps, t), ref.add_noise(x0, eps, t), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(velocity(sched, x0, eps, t), ref.get_velocity(x0, eps, t), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_output_to_x0_and_eps_invert_the_target(prediction_type):
    sched = NoiseSchedule.sdxl(prediction_type=prediction_type)
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([10, 500, 990])
    x_t = add_noise(sched, x0, eps, t)
    target = training_target(sched, x0, eps, t)
    torch.testing.assert_close(output_to_x0(sched, target, x_t, t), x0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(output_to_eps(sched, target, x_t, t), eps, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_output_to_x0_matches_diffusers_step(prediction_type):
    sched = NoiseSchedule.sdxl(prediction_type=prediction_type)
    ref = _diffusers(prediction_type, cls=DDIMScheduler)
    ref.set_timesteps(4)
    g = torch.Generator().manual_seed(2)
    x_t, out = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    for t in ref.timesteps:
        expected = ref.step(out, t, x_t).pred_original_sample
        torch.testing.assert_close(output_to_x0(sched, out, x_t, t.view(1)), expected, rtol=1e-4, atol=1e-4)


def test_dmd2_sigmas_are_comfyui_sigmas():
    sigmas = NoiseSchedule.sdxl().sigmas
    torch.testing.assert_close(sampling.sigmas_for_timesteps(sigmas, [999, 749, 499, 249]),
                               torch.tensor([14.6146, 4.0817, 1.6129, 0.6932, 0.0]), rtol=0, atol=1e-4)
    torch.testing.assert_close(sampling.sigmas_for_timesteps(sigmas, [399]), torch.tensor([1.1606, 0.0]), rtol=0, atol=1e-4)


def test_sigma_to_timestep_is_exact_on_the_table_and_monotone():
    sigmas = NoiseSchedule.sdxl().sigmas
    t = torch.tensor([0, 1, 249, 399, 999])
    torch.testing.assert_close(sampling.sigma_to_timestep(sigmas[t], sigmas), t.double())
    mid = sampling.sigma_to_timestep((sigmas[10] * sigmas[11]).sqrt().view(1), sigmas)
    assert 10 < float(mid) < 11


def test_initial_latent_has_unit_variance_in_unet_space():
    sigma = torch.tensor(1.1606)  # the 1-step student's t = 399
    noise = torch.randn(64, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    x = sampling.initial_latent(noise, sigma)
    assert abs(float((x / (1 + sigma**2).sqrt()).std()) - 1.0) < 0.01
    latent = torch.ones(1, 4, 8, 8)
    torch.testing.assert_close(sampling.initial_latent(noise[:1, :, :8, :8], sigma, latent), latent + sigma * noise[:1, :, :8, :8])


def test_sample_dmd2_calls_denoiser_at_each_sigma_and_renoises_with_fresh_noise():
    sigmas = torch.tensor([14.6, 4.0, 1.6, 0.0])
    seen = []

    def denoise(x, sigma):
        seen.append(float(sigma))
        return torch.full_like(x, 2.0)

    noises = [torch.full((1, 1), float(i + 1)) for i in range(3)]
    out = sampling.sample_dmd2(denoise, torch.zeros(1, 1), sigmas, lambda i: noises[i])
    assert seen == pytest.approx([14.6, 4.0, 1.6])
    assert float(out) == 2.0  # the last step returns x0 itself


def test_sample_euler_is_exact_for_a_point_mass():
    # With x0 fixed, the probability-flow ODE moves x linearly to x0: Euler is exact.
    sigmas = sampling.teacher_sigmas(NoiseSchedule.sdxl().sigmas, 10)
    assert sigmas[-1] == 0 and len(sigmas) == 11 and torch.all(sigmas[:-1] > sigmas[1:])
    out = sampling.sample_euler(lambda x, s: torch.full_like(x, 0.5), torch.randn(2, 3), sigmas)
    torch.testing.assert_close(out, torch.full((2, 3), 0.5))


def test_presets():
    assert sampling.preset_timesteps(4) == (999, 749, 499, 249)
    assert sampling.preset_timesteps(1) == (399,)
    with pytest.raises(ValueError):
        sampling.preset_timesteps(3)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ve_conversion_agrees_with_the_discrete_one(prediction_type):
    """The samplers' VE form (x = x0 + sigma * eps, UNet input x / sqrt(1 + sigma^2)) and the trainer's VP form give
    the same x0 for the same UNet output at a training timestep."""
    from trainer.schedule import ve_output_to_x0

    sched = NoiseSchedule.sdxl(prediction_type=prediction_type)
    g = torch.Generator().manual_seed(3)
    x_vp, out = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    for t in (999, 399, 20):
        sigma = sched.sigmas[t]
        x_ve = x_vp * (1 + sigma**2).sqrt().float()
        expected = output_to_x0(sched, out, x_vp, torch.tensor([t, t]))
        torch.testing.assert_close(ve_output_to_x0(out, x_ve, sigma, prediction_type), expected, rtol=1e-4, atol=1e-4)
