"""Sampling a diffusers UNet with the shared sampler functions: the DMD2 student (few steps, fresh noise, no CFG)
and the teacher (Euler, many steps, CFG). Used by ``dmd2 generate``, the trainer's validation grids and the
toy benchmark, so every place samples the same way (and the same way as the ComfyUI nodes)."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from PIL import Image
from torch import Tensor

from trainer import sampling
from trainer.files import atomic_write
from trainer.models.roles import Conditioning, unet_forward
from trainer.schedule import NoiseSchedule, ve_output_to_x0

UNetCall = Callable[[Tensor, Tensor, Conditioning], Tensor]


def place(module, device=None, dtype=None):
    """``module.to(device, dtype)`` without diffusers' ModelMixin warning about fp32 modules (we cast whole models on
    purpose: the frozen base in bf16/fp16, trainable adapters in fp32)."""
    return torch.nn.Module.to(module, device=device, dtype=dtype)


def unet_call(unet) -> UNetCall:
    return lambda x, t, cond: unet_forward(unet, x, t, cond)


def make_denoiser(call: UNetCall, schedule: NoiseSchedule, cond: Conditioning, *, guidance_scale: float = 1.0,
                  uncond: Conditioning | None = None) -> sampling.Denoiser:
    """Wrap a UNet as ``denoise(x, sigma) -> x0`` in VE space, with optional classifier-free guidance."""
    table = schedule.sigmas

    def denoise(x: Tensor, sigma: Tensor) -> Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float32)
        t = sampling.sigma_to_timestep(sigma.reshape(1), table).to(x.device).expand(x.shape[0])
        x_in = (x / (1 + sigma.double() ** 2).sqrt()).to(x.dtype)
        if uncond is not None and guidance_scale != 1.0:
            both = call(torch.cat([x_in, x_in]), torch.cat([t, t]), Conditioning.cat([cond, uncond]))
            out = sampling.cfg(both[len(x):], both[: len(x)], guidance_scale)
        else:
            out = call(x_in, t, cond)
        return ve_output_to_x0(out, x, sigma, schedule.prediction_type)

    return denoise


def seeded_noise(seeds: Sequence[int], shape, device="cpu", dtype=torch.float32) -> Callable[..., Tensor]:
    """A function that draws the next noise batch [len(seeds), *shape], each call fresh: one CPU generator per seed,
    so an image's noise does not depend on what else is in the batch or on the device."""
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    return lambda *_: torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device=device, dtype=dtype)


@torch.no_grad()
def sample_student(call: UNetCall, schedule: NoiseSchedule, cond: Conditioning, timesteps: Sequence[int],
                   seeds: Sequence[int], latent_shape, *, device="cpu", dtype=torch.float32) -> Tensor:
    """DMD2 sampling at the student's trained timesteps; one generator per seed, so an image does not depend on
    what else is in the batch."""
    noise = seeded_noise(seeds, latent_shape, device, dtype)
    sigmas = sampling.sigmas_for_timesteps(schedule.sigmas, timesteps)
    x = sampling.initial_latent(noise(), sigmas[0])
    denoise = make_denoiser(call, schedule, cond.to(device, dtype))
    return sampling.sample_dmd2(denoise, x, sigmas, noise)


@torch.no_grad()
def sample_teacher(call: UNetCall, schedule: NoiseSchedule, cond: Conditioning, uncond: Conditioning, steps: int,
                   guidance_scale: float, seeds: Sequence[int], latent_shape, *, device="cpu", dtype=torch.float32) -> Tensor:
    """The teacher with ``steps`` Euler steps and CFG (the many-step reference the student is compared with)."""
    sigmas = sampling.teacher_sigmas(schedule.sigmas, steps)
    x = sampling.initial_latent(seeded_noise(seeds, latent_shape, device, dtype)(), sigmas[0])
    denoise = make_denoiser(call, schedule, cond.to(device, dtype), guidance_scale=guidance_scale, uncond=uncond.to(device, dtype))
    return sampling.sample_euler(denoise, x, sigmas)


@torch.no_grad()
def decode(vae, latents: Tensor) -> Tensor:
    """Latents -> images in [-1, 1] (float32, on the VAE's device)."""
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    z = latents.to(vae.device, vae.dtype) / vae.config.scaling_factor + shift
    return vae.decode(z, return_dict=False)[0].float().clamp(-1, 1)


@torch.no_grad()
def encode(vae, images: Tensor) -> Tensor:
    """Images in [-1, 1] -> scaled latents (the posterior mean: deterministic, so caches are reproducible)."""
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    dist = vae.encode(images.to(vae.device, vae.dtype)).latent_dist
    return ((dist.mean - shift) * vae.config.scaling_factor).float()


def to_pil(images: Tensor) -> list[Image.Image]:
    arr = ((images.float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a.squeeze(-1) if a.shape[-1] == 1 else a) for a in arr]


def grid(rows: list[list[Image.Image]], pad: int = 2, min_cell: int = 96) -> Image.Image:
    """Rows of equally sized images -> one image (white padding); small images are enlarged (nearest neighbour) to
    at least ``min_cell`` pixels so a toy model's 32x32 samples stay visible."""
    scale = max(1, min_cell // rows[0][0].width)
    if scale > 1:
        rows = [[im.resize((im.width * scale, im.height * scale), Image.NEAREST) for im in row] for row in rows]
    w, h = rows[0][0].size
    cols = max(len(r) for r in rows)
    out = Image.new("RGB", (cols * (w + pad) + pad, len(rows) * (h + pad) + pad), "white")
    for i, row in enumerate(rows):
        for j, im in enumerate(row):
            out.paste(im.convert("RGB"), (pad + j * (w + pad), pad + i * (h + pad)))
    return out


def latent_shape(unet, vae, resolution: int) -> tuple[int, int, int]:
    factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 8
    return (unet.config.in_channels, resolution // factor, resolution // factor)


def save_png_atomic(image: Image.Image, path) -> None:
    with atomic_write(path) as tmp:
        image.save(tmp, format="PNG")

