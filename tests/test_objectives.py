"""The DMD2 objectives against hand computation."""
import torch

from trainer import objectives as obj


def test_dmd_gradient_normalises_per_sample():
    x = torch.tensor([[[[1.0, 3.0]]], [[[0.0, 0.0]]]])  # [2,1,1,2]
    p_real = torch.tensor([[[[0.0, 1.0]]], [[[2.0, -2.0]]]])
    p_fake = torch.tensor([[[[1.0, 1.0]]], [[[0.0, 0.0]]]])
    # sample 0: mean|x - p_real| = (1 + 2) / 2 = 1.5 ; sample 1: (2 + 2) / 2 = 2
    expected = torch.tensor([[[[1 / 1.5, 0.0]]], [[[-1.0, 1.0]]]])
    torch.testing.assert_close(obj.dmd_gradient(x, p_real, p_fake), expected)


def test_dmd_loss_value_and_gradient():
    x = torch.tensor([[[[1.0, 3.0]]], [[[0.0, 0.0]]]], requires_grad=True)
    p_real = torch.tensor([[[[0.0, 1.0]]], [[[2.0, -2.0]]]])
    p_fake = torch.tensor([[[[1.0, 1.0]]], [[[0.0, 0.0]]]])
    grad = obj.dmd_gradient(x.detach(), p_real, p_fake)
    loss = obj.dmd_loss(x, p_real, p_fake)
    # 0.5 * mean((x - (x - g))^2) = 0.5 * mean(g^2)
    torch.testing.assert_close(loss, 0.5 * (grad**2).mean())
    loss.backward()
    # d/dx 0.5 * mean((x - c)^2) = (x - c) / N = g / N
    torch.testing.assert_close(x.grad, grad / x.numel())


def test_dmd_loss_averages_the_gradients_of_several_draws():
    x = torch.tensor([[[[1.0, 3.0]]], [[[0.0, 0.0]]]], requires_grad=True)
    # two re-noisings of each sample, stacked draw by draw: rows 0-1 are draw 1, rows 2-3 draw 2
    p_real = torch.tensor([[[[0.0, 1.0]]], [[[2.0, -2.0]]], [[[1.0, 2.0]]], [[[1.0, 1.0]]]])
    p_fake = torch.tensor([[[[1.0, 1.0]]], [[[0.0, 0.0]]], [[[3.0, 3.0]]], [[[0.0, 2.0]]]])
    first = obj.dmd_gradient(x.detach(), p_real[:2], p_fake[:2])
    second = obj.dmd_gradient(x.detach(), p_real[2:], p_fake[2:])
    # draw 2 by hand: sample 0 weight (0 + 1) / 2 = 0.5, sample 1 weight (1 + 1) / 2 = 1
    torch.testing.assert_close(second, torch.tensor([[[[4.0, 2.0]]], [[[-1.0, 1.0]]]]))
    obj.dmd_loss(x, p_real, p_fake).backward()
    torch.testing.assert_close(x.grad, (first + second) / 2 / x.numel())


def test_dmd_gradient_zero_weight_is_finite():
    x = torch.zeros(1, 1, 2, 2)
    g = obj.dmd_gradient(x, x.clone(), torch.ones_like(x))
    assert torch.isfinite(g).all()


def test_gan_losses_by_hand():
    fake = torch.tensor([0.0, 2.0])
    real = torch.tensor([1.0, -1.0])
    sp = lambda v: torch.log1p(torch.exp(torch.tensor(v)))  # noqa: E731
    torch.testing.assert_close(obj.gan_student_loss(fake), (sp(-0.0) + sp(-2.0)) / 2)
    expected = (sp(0.0) + sp(2.0)) / 2 + (sp(-1.0) + sp(1.0)) / 2
    torch.testing.assert_close(obj.gan_critic_loss(fake, real), expected)


def test_critic_denoising_loss_is_mse():
    pred, target = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, 0.0, 0.0])
    torch.testing.assert_close(obj.critic_denoising_loss(pred, target), torch.tensor((0 + 4 + 9) / 3))


def test_critic_x0_loss_is_the_eps_loss_at_high_snr_and_the_x0_loss_at_low():
    """For an eps prediction, x0_hat - x0 = -(eps_hat - eps) / sqrt(SNR): weighted by max(SNR, 1) the x0 error is the
    eps error where SNR >= 1, and stays the plain x0 error where SNR < 1 (the high-noise end)."""
    from trainer.schedule import NoiseSchedule, add_noise, output_to_x0

    schedule = NoiseSchedule.sdxl()
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    eps_hat = eps + 0.1 * torch.randn(2, 4, 8, 8, generator=g)
    for t_value, high_noise in ((100, False), (900, True)):
        t = torch.full((2,), t_value)
        s, n = schedule.coefficients(t, x0)
        snr = (s / n) ** 2
        assert bool((snr < 1).all()) == high_noise
        x0_hat = output_to_x0(schedule, eps_hat, add_noise(schedule, x0, eps, t), t)
        loss = obj.critic_x0_loss(x0_hat, x0, snr)
        expected = (x0_hat - x0).pow(2).mean() if high_noise else (eps_hat - eps).pow(2).mean()
        torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-6)


def test_timestep_window_and_sampling_bounds():
    assert obj.timestep_range(1000) == (20, 980)
    assert obj.timestep_range(1000, 0.0, 1.0) == (0, 999) and obj.timestep_range(1000, 0.0, 0.5) == (0, 500)
    g = torch.Generator().manual_seed(0)
    t = obj.sample_timesteps(10_000, 20, 980, g)
    assert t.min() >= 20 and t.max() <= 980 and t.dtype == torch.int64
    assert t.min() == 20 and t.max() == 980  # inclusive at both ends


def test_window_below_a_student_step_input():
    assert obj.window_below((20, 980), 999) == (20, 980)  # t_k above the window: the window unchanged
    assert obj.window_below((20, 980), 499) == (20, 499)
    assert obj.window_below((20, 980), 10) == (20, 20)  # never empty, never below the window's floor
