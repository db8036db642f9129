"""The three roles on one UNet, the GAN head, the LoRA export round trip through diffusers' own loader, and the
README's diffusers sampling recipe."""
from __future__ import annotations

import logging
import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from trainer.conditioning import encode_prompts
from trainer.export import kohya_state_dict, merge_into_unet, read_lora, recipe_metadata, save_safetensors_atomic, with_lora
from trainer.models.gan_head import GANHead
from trainer.models.loading import load_sdxl
from trainer.models.roles import STUDENT, DMD2Roles, unet_forward, unet_mid_features


@pytest.fixture
def model(tiny_sdxl_file):
    return load_sdxl(tiny_sdxl_file)


def _inputs(model, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    cond = encode_prompts(model, ["a cat", "a dog"][:batch], 32)
    return torch.randn(batch, 4, 4, 4, generator=g), torch.tensor([999, 400][:batch]), cond


def _randomise_adapters(roles, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in roles.student_parameters() + roles.critic_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def _export_student(roles, path, timesteps=(999, 749, 499, 249), prediction_type="epsilon"):
    """The student adapter written as the trainer writes it: kohya keys, fp32 here, with its recipe metadata."""
    adapter = roles.unet.peft_config[STUDENT]
    meta = recipe_metadata(timesteps=list(timesteps), rank=adapter.r, alpha=adapter.lora_alpha, training_steps=1, teacher="tiny",
                           teacher_hash="0" * 64, prediction_type=prediction_type)
    return save_safetensors_atomic(kohya_state_dict(roles.unet, STUDENT, torch.float32), path, meta)


def test_roles_share_one_unet_and_switch(model):
    x, t, cond = _inputs(model)
    base = unet_forward(model.unet, x, t, cond).detach()
    roles = DMD2Roles(model.unet, rank=4, alpha=2)
    # Zero-initialised up-projections: student and critic start as the teacher.
    torch.testing.assert_close(roles.student(x, t, cond), base)
    torch.testing.assert_close(roles.critic(x, t, cond), base)
    _randomise_adapters(roles)
    s, c, teacher = roles.student(x, t, cond), roles.critic(x, t, cond), roles.teacher(x, t, cond)
    torch.testing.assert_close(teacher, base)  # adapters off = the frozen teacher
    assert not torch.allclose(s, base, atol=1e-4) and not torch.allclose(c, base, atol=1e-4) and not torch.allclose(s, c, atol=1e-4)
    # Only adapters train; the base UNet stays frozen, and both adapters keep their gradients enabled.
    trainable = {n for n, p in roles.unet.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert len(roles.student_parameters()) == len(roles.critic_parameters())
    assert all(p.requires_grad for p in roles.student_parameters() + roles.critic_parameters())


def test_full_critic_is_a_trainable_copy(model):
    x, t, cond = _inputs(model)
    roles = DMD2Roles(model.unet, rank=4, alpha=2, critic="full")
    assert roles.full_critic is not None and all(p.requires_grad for p in roles.critic_parameters())
    assert sum(p.numel() for p in roles.critic_parameters()) == sum(p.numel() for p in roles.full_critic.parameters())
    torch.testing.assert_close(roles.critic(x, t, cond), roles.teacher(x, t, cond))


def test_mid_features_equal_the_full_forward_mid_block_output(model):
    x, t, cond = _inputs(model)
    captured = {}
    handle = model.unet.mid_block.register_forward_hook(lambda m, i, o: captured.setdefault("mid", o))
    unet_forward(model.unet, x, t, cond)
    handle.remove()
    torch.testing.assert_close(unet_mid_features(model.unet, x, t, cond), captured["mid"])


@pytest.mark.parametrize("latent, feature, stages", [(128, 32, 4), (64, 16, 3), (8, 2, 0)])
def test_gan_head_sizes_follow_the_unet(latent, feature, stages):
    class Cfg:  # an SDXL-shaped config (3 levels) with few channels to keep the test light
        block_out_channels = (32, 32, 64)

    head = GANHead.for_unet(type("U", (), {"config": Cfg})(), latent)
    assert len(head.body) == stages  # SDXL at 1024^2: three stride-2 stages and the stride-4 stage, as DMD2
    out = head(torch.randn(2, 64, feature, feature))
    assert out.shape == (2,)


def test_exported_lora_loads_in_diffusers_and_reproduces_the_student(model, tmp_path, caplog):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    x, t, cond = _inputs(model)
    roles = DMD2Roles(model.unet, rank=4, alpha=2)
    _randomise_adapters(roles)
    student = roles.student(x, t, cond).detach()
    path = _export_student(roles, tmp_path / "lora.safetensors")
    fresh = load_sdxl(model.source)
    pipe = StableDiffusionXLPipeline(vae=fresh.vae, text_encoder=fresh.text_encoder, text_encoder_2=fresh.text_encoder_2,
                                     tokenizer=fresh.tokenizer, tokenizer_2=fresh.tokenizer_2, unet=fresh.unet, scheduler=EulerDiscreteScheduler())
    with caplog.at_level(logging.WARNING):
        pipe.load_lora_weights(str(path))
    leftovers = re.compile(r"unexpected keys|not loaded|were not used|unused keys", re.I)
    assert not [r.getMessage() for r in caplog.records if leftovers.search(r.getMessage())]
    from peft.tuners.lora import LoraLayer

    n_modules = sum(1 for k in load_file(path) if k.endswith(".lora_down.weight"))
    assert sum(isinstance(m, LoraLayer) for m in pipe.unet.modules()) == n_modules  # every module mapped
    # Same output as the student: alpha/rank = 0.5 honoured (ignoring alpha would double the LoRA's effect).
    torch.testing.assert_close(unet_forward(pipe.unet, x, t, cond), student, rtol=1e-4, atol=1e-4)
    # And merging the file into a plain UNet (what `dmd2 generate` and `--merge` do) gives the same.
    merged = load_sdxl(model.source)
    tensors, meta = read_lora(path)
    assert merge_into_unet(merged.unet, tensors) == n_modules and meta["dmd2.timesteps"] == "[999, 749, 499, 249]"
    torch.testing.assert_close(unet_forward(merged.unet, x, t, cond), student, rtol=1e-4, atol=1e-4)
    # with_lora (the demo's and the toy table's students): the same, on a copy of the UNet; the base is left as it was
    base = load_sdxl(model.source)
    before = unet_forward(base.unet, x, t, cond)
    copied, meta = with_lora(base, path)
    assert copied.unet is not base.unet and copied.vae is base.vae and copied.text_encoder is base.text_encoder
    assert meta["dmd2.timesteps"] == "[999, 749, 499, 249]"
    torch.testing.assert_close(unet_forward(copied.unet, x, t, cond), student, rtol=1e-4, atol=1e-4)
    assert torch.equal(unet_forward(base.unet, x, t, cond), before) and not torch.allclose(before, student, atol=1e-3)


def test_lora_without_alpha_would_be_wrong(model, tmp_path):
    """Guards the reason we write `.alpha`: loaders assume alpha = rank without it."""
    roles = DMD2Roles(model.unet, rank=4, alpha=2)
    _randomise_adapters(roles)
    tensors = kohya_state_dict(roles.unet, STUDENT, torch.float32)
    assert all(float(v) == 2.0 for k, v in tensors.items() if k.endswith(".alpha"))
    key = next(k for k in tensors if k.endswith(".lora_down.weight")).removesuffix(".lora_down.weight")
    a, b = load_sdxl(model.source), load_sdxl(model.source)
    merge_into_unet(a.unet, tensors)
    merge_into_unet(b.unet, {k: v for k, v in tensors.items() if not k.endswith(".alpha")})
    name = key.removeprefix("lora_unet_")
    wa = dict(a.unet.named_parameters())
    wb = dict(b.unet.named_parameters())
    base = dict(load_sdxl(model.source).unet.named_parameters())
    pname = next(n for n in wa if n.replace(".", "_").startswith(name) and n.endswith("weight"))
    torch.testing.assert_close((wb[pname] - base[pname]), 2 * (wa[pname] - base[pname]), rtol=1e-4, atol=1e-6)


def test_gan_head_keeps_dmd2_groups_at_sdxl_size_and_enough_values_per_group_when_small():
    sdxl = GANHead(1280, 32)  # SDXL at 1024^2: 32 groups in every stage, as the reference
    assert [m.num_groups for m in sdxl.modules() if isinstance(m, torch.nn.GroupNorm)] == [32] * 4
    tiny = GANHead(64, 4)  # the toy teacher's 4x4 mid block: one stage down to 1x1
    assert [m.num_groups for m in tiny.modules() if isinstance(m, torch.nn.GroupNorm)] == [2]


def test_small_gan_head_learns_to_separate_shifted_features():
    torch.manual_seed(0)
    head, g = GANHead(64, 4), torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3)
    for _ in range(150):
        real = torch.randn(32, 64, 4, 4, generator=g)
        fake = torch.randn(32, 64, 4, 4, generator=g) + 0.1  # a small mean shift, the same on every channel
        loss = F.softplus(head(fake)).mean() + F.softplus(-head(real)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.6  # chance is 2 ln 2 = 1.386; 32 groups of 2 values (the old sizing) stay at 0.83


@pytest.mark.parametrize("v_pred, ztsnr, timesteps", [(False, False, (999, 749, 499, 249)), (False, False, (399,)),
                                                       (True, False, (999, 499)), (True, True, (999, 749, 499, 249))])
def test_readme_diffusers_recipe_samples_what_the_dmd2_sampler_samples(tmp_path, v_pred, ztsnr, timesteps):
    """The README's diffusers recipe (load_lora_weights, LCMScheduler from the pipeline's own scheduler config, the
    trained timesteps, guidance 0) gives the same latents as our sampler, fed the same starting and step noise."""
    from diffusers import LCMScheduler, StableDiffusionXLPipeline

    from trainer import sampling
    from trainer.generate import make_denoiser
    from trainer.testing.tiny_sdxl import write_tiny_sdxl

    paths = write_tiny_sdxl(tmp_path / "model", v_pred=v_pred, ztsnr=ztsnr)
    model = load_sdxl(paths["single_file"])
    roles = DMD2Roles(model.unet, rank=4, alpha=2)
    _randomise_adapters(roles)
    lora = _export_student(roles, tmp_path / "lora.safetensors", timesteps, model.schedule.prediction_type)
    pipe = StableDiffusionXLPipeline.from_pretrained(str(paths["diffusers"]))
    pipe.load_lora_weights(str(lora))
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    prompts = ["a cat", "a dog"]
    start = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(5))
    theirs = pipe(prompts, num_inference_steps=len(timesteps), timesteps=list(timesteps), guidance_scale=0, height=32, width=32,
                  latents=start.clone(), generator=torch.Generator().manual_seed(7), output_type="latent").images

    step_noise = torch.Generator().manual_seed(7)  # LCMScheduler draws one batch of noise per step from the generator
    sigmas = sampling.sigmas_for_timesteps(model.schedule.sigmas, timesteps)
    with torch.no_grad():
        denoise = make_denoiser(roles.student, model.schedule, encode_prompts(model, prompts, 32))
        ours = sampling.sample_dmd2(denoise, sampling.initial_latent(start, sigmas[0]), sigmas,
                                    lambda i: torch.randn(start.shape, generator=step_noise))
    assert ours.abs().max() > 1.0  # a real sample, not a vanishing one
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
