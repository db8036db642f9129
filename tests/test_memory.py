"""Memory presets: resolution of `memory`, the optimiser fallback, and gradient checkpointing that gives the same
update as no checkpointing although student and critic are adapters switched on one UNet; and the DMD loss's
no-guidance shortcut."""
from __future__ import annotations

import torch

from trainer.config import load_config
from trainer.memory import PRESETS, make_optimizer, resolve
from trainer.models.roles import Conditioning
from trainer.prepare import RealData
from trainer.schedule import NoiseSchedule


def _unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=1, cross_attention_dim=32,
                                attention_head_dim=4, norm_num_groups=16, addition_embed_type="text_time", addition_time_embed_dim=8,
                                projection_class_embeddings_input_dim=6 * 8 + 16, sample_size=8)


def _setup(checkpointing: bool, micro: int = 2):
    from trainer.train import build_training

    cfg = load_config(base={"model": "m", "prompts": "p", "resolution": 64, "batch_size": 2, "seed": 4, "lora": {"rank": 4, "alpha": 4},
                            "student": {"update_every": 1}, "gan": {"real_data": "teacher"}})
    g = torch.Generator().manual_seed(1)
    cond = Conditioning(torch.randn(4, 77, 32, generator=g), torch.randn(4, 16, generator=g), torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 4))
    real = RealData([(64, 64)], [torch.randn(4, 4, 8, 8, generator=g)], [cond])
    plan = resolve("80gb", "cpu", batch_size=2, gradient_checkpointing=checkpointing, micro_batch_size=micro)
    return build_training(cfg, _unet(), NoiseSchedule.sdxl(), cond=cond, uncond=cond.index([0]).zeros_like(), real=real,
                          latent_shape=(4, 8, 8), device="cpu", weight_dtype=torch.float32, plan=plan)


def test_presets_resolve_on_cpu():
    plan = resolve("auto", "cpu", batch_size=4)
    assert plan.preset == "80gb" and not plan.gradient_checkpointing and plan.optimizer == "adamw"
    assert plan.micro_batch_size == 4  # no accelerator memory to ration: the batch stays in one pass
    assert resolve("auto", "cpu", batch_size=4, micro_batch_size=2).micro_batch_size == 2  # an explicit choice wins
    assert resolve("80gb", "cpu", batch_size=4).micro_batch_size == 2  # a named preset is taken as it is
    plan = resolve("12gb", "cpu", batch_size=4)
    assert plan.gradient_checkpointing and plan.optimizer == "adamw8bit" and plan.micro_batch_size == 1
    assert resolve("24gb", "cpu", batch_size=1).micro_batch_size == 1  # never larger than the batch
    assert set(PRESETS) == {"12gb", "24gb", "80gb"}


def test_8bit_falls_back_to_torch_adamw_without_cuda(capsys):
    opt = make_optimizer([torch.nn.Parameter(torch.zeros(3))], kind="adamw8bit", lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0, device="cpu")
    assert type(opt) is torch.optim.AdamW
    assert "8-bit optimizer states unavailable (no CUDA device)" in capsys.readouterr().out


def _student_grads(setup) -> list[torch.Tensor]:
    """Gradients of the student loss (DMD + GAN generator term through the critic's features), with the two adapters
    made clearly different first, so that recomputing a block with the wrong adapter would show."""
    from trainer.dmd2 import Losses, StepRandomness, student_input, student_losses
    from trainer.schedule import output_to_x0

    g = torch.Generator().manual_seed(7)
    for p in setup.student_params + setup.critic_params:
        p.data = torch.randn(p.shape, generator=g) * 0.1
    rng = StepRandomness(torch.Generator().manual_seed(1), torch.Generator().manual_seed(3))
    cond = setup.cond.index([0, 1])
    x_in, t = student_input(setup.roles, setup.schedule, cond, setup.latent_shape, setup.settings, rng, "cpu", torch.float32)
    x0 = output_to_x0(setup.schedule, setup.roles.student(x_in, t, cond), x_in, t)
    loss = student_losses(setup.roles, setup.head, setup.schedule, x0, cond, setup.uncond.index([0, 0]), setup.settings, rng, Losses())
    loss.backward(inputs=setup.student_params)
    return [p.grad.clone() for p in setup.student_params]


def test_checkpointing_gives_the_same_gradients_as_without():
    """The student's graph is differentiated after the critic ran (GAN term): plain checkpointing would recompute the
    student's blocks with the critic's adapter active. The adapter-aware checkpointing restores the right one."""
    plain, ckpt = _student_grads(_setup(False)), _student_grads(_setup(True))
    assert max(float((a - b).abs().max()) for a, b in zip(plain, ckpt)) < 1e-5
    assert max(float(a.abs().max()) for a in plain) > 1e-3


def test_checkpointed_training_matches_plain_training():
    from trainer.train import train_iteration

    plain, ckpt = _setup(False), _setup(True)
    for step in range(2):
        a, b = train_iteration(plain, step), train_iteration(ckpt, step)
        assert a.values.keys() == b.values.keys()
    for p, q in zip(plain.student_params + plain.critic_params, ckpt.student_params + ckpt.critic_params):
        assert torch.allclose(p, q, atol=1e-6, rtol=1e-5)


def test_micro_batches_accumulate_to_a_finite_update():
    from trainer.train import train_iteration

    setup = _setup(False, micro=1)
    losses = train_iteration(setup, 0)
    assert {"student/dmd", "student/gan", "critic/denoise", "critic/gan", "critic/grad_norm", "student/grad_norm"} <= set(losses.values)
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values.values())


def test_bf16_state_adamw_follows_torch_adamw():
    from trainer.memory import AdamWBF16States

    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(64, 32))
    b = torch.nn.Parameter(a.detach().clone())
    ours = AdamWBF16States([a], lr=1e-2, weight_decay=0.01)
    ref = torch.optim.AdamW([b], lr=1e-2, weight_decay=0.01)
    for _ in range(5):
        g = torch.randn(64, 32)
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    assert ours.state[a]["exp_avg"].dtype == torch.bfloat16
    assert torch.allclose(a, b, atol=2e-3) and not torch.equal(a, b)
    ours.load_state_dict(ours.state_dict())  # checkpointable


def test_dmd_without_guidance_skips_the_unconditional_pass_with_the_same_result():
    """At DMD CFG 1 the teacher runs once (cond only); the result must equal the two-pass CFG formula's."""
    import dataclasses

    from trainer.dmd2 import Losses, StepRandomness, student_losses

    s = _setup(False)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # move the critic away from the teacher, so the DMD gradient is not zero
        for p in s.roles.critic_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    cond = s.cond.index([0, 1])
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    values = []
    for w in (1.0, 1.0 + 1e-6):  # the second goes through cond + uncond and cfg()
        rng = StepRandomness(torch.Generator().manual_seed(7), torch.Generator().manual_seed(8))
        losses = Losses()
        student_losses(s.roles, None, s.schedule, x0, cond, cond.zeros_like(), dataclasses.replace(s.settings, guidance_scale=w), rng, losses)
        values.append(losses.values["student/dmd"])
    assert values[0] > 0
    assert abs(values[0] - values[1]) <= 1e-4 * values[0]
