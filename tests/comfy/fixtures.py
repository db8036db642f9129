"""Test data for the ComfyUI tests, built in the project's venv (diffusers, peft) and read by the checks that run
inside ComfyUI's venv. ``python tests/comfy/fixtures.py DIR`` (idempotent: a complete DIR is kept).

DIR/unet/diffusers, DIR/unet/comfy_test_unet.safetensors   the ComfyUI-detectable SDXL-family test UNet
DIR/loras/dmd2_test_lora.safetensors        kohya LoRA from the trainer's exporter, recipe metadata (2 steps)
DIR/loras/dmd2_test_lora_nometa.safetensors the same tensors, no metadata
DIR/loras/sd15_lora.safetensors             kohya keys of an SD1.5 UNet (must be refused on SDXL)
DIR/loras/peft_lora.safetensors             PEFT/diffusers keys (unet.<path>.lora_A/B; must be refused)
DIR/reference.pt                            conditioning, seeds and the library sampler's outputs
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

VERSION = "1"
LORA_RANK, LORA_ALPHA = 8, 4.0
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj"]
RECIPE_TIMESTEPS = [999, 499]
LATENT_SHAPE = (1, 4, 16, 16)
SEED = 1234
TIME_IDS = [128.0, 128.0, 0.0, 0.0, 128.0, 128.0]  # original h, w, crop top, left, target h, w


def diffusers_denoiser(unet, context, pooled, time_ids):
    """The library side: a diffusers UNet as ``denoise(x, sigma) -> x0`` in VE space (x_in = x / sqrt(1 + sigma^2),
    the timestep of sigma, eps -> x0)."""
    from trainer import sampling
    from trainer.schedule import NoiseSchedule

    table = NoiseSchedule.sdxl().sigmas

    @torch.no_grad()
    def denoise(x, sigma):
        sigma = torch.as_tensor(sigma, dtype=torch.float32).reshape(1)
        t = sampling.sigma_to_timestep(sigma, table).expand(x.shape[0])
        x_in = x / (1 + sigma**2).sqrt()
        eps = unet(x_in, t, encoder_hidden_states=context,
                   added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        return x - sigma * eps

    return denoise


def library_sample(unet, cond, timesteps, seed, latent=None, shape=LATENT_SHAPE):
    """``dmd2 generate``'s way for one image: starting noise and step noises from one generator seeded with seed."""
    from trainer import sampling
    from trainer.schedule import NoiseSchedule

    sigmas = sampling.sigmas_for_timesteps(NoiseSchedule.sdxl().sigmas, timesteps)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    x = sampling.initial_latent(noise, sigmas[0], latent)
    return sampling.sample_dmd2(diffusers_denoiser(unet, *cond), x, sigmas, sampling.seeded_step_noise(seed, shape))


def _lora_tensors(unet, seed: int) -> dict[str, torch.Tensor]:
    """A peft LoRA on the diffusers UNet with random (non-zero) A and B, exported by the trainer's exporter."""
    from peft import LoraConfig

    from trainer.export import kohya_state_dict

    unet.add_adapter(LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, target_modules=LORA_TARGETS, init_lora_weights=False),
                     adapter_name="student")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    tensors = kohya_state_dict(unet, "student")
    unet.delete_adapters("student")
    return tensors


def _sd15_lora() -> dict[str, torch.Tensor]:
    """kohya keys and shapes of an SD1.5 UNet (shapes from its config on the meta device; rank 4)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        sd15 = UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8)
    out = {}
    gen = torch.Generator().manual_seed(7)
    for name, module in sd15.named_modules():
        if not any(name.endswith(t) for t in ("attn1.to_q", "attn2.to_k", "proj_in", "conv1")):
            continue
        w = module.weight
        key = "lora_unet_" + name.replace(".", "_")
        down_shape = (4, *w.shape[1:]) if w.ndim == 4 else (4, w.shape[1])
        up_shape = (w.shape[0], 4, 1, 1) if w.ndim == 4 else (w.shape[0], 4)
        out[f"{key}.lora_down.weight"] = torch.randn(down_shape, generator=gen).half()
        out[f"{key}.lora_up.weight"] = torch.randn(up_shape, generator=gen).half()
        out[f"{key}.alpha"] = torch.tensor(4.0).half()
    return out


def _peft_lora(kohya: dict[str, torch.Tensor], module_paths: dict[str, str]) -> dict[str, torch.Tensor]:
    """The same LoRA as diffusers' save_lora_weights writes it (``unet.<path>.lora_A.weight``, no alpha)."""
    out = {}
    for key, tensor in kohya.items():
        mod, kind = key.rsplit(".", 2)[0], key.split(".", 1)[1]
        if kind == "alpha":
            continue
        ab = "lora_A" if kind.startswith("lora_down") else "lora_B"
        out[f"unet.{module_paths[mod]}.{ab}.weight"] = tensor
    return out


def _locked(out: Path):
    """An exclusive lock beside ``out``, so that test runs started side by side build it once."""
    import fcntl

    out.parent.mkdir(parents=True, exist_ok=True)
    handle = open(out.parent / f".{out.name}.lock", "w")
    fcntl.flock(handle, fcntl.LOCK_EX)
    return handle


def build(out_dir) -> Path:
    out = Path(out_dir)
    marker = out / f".complete-v{VERSION}"
    lock = _locked(out)
    if marker.exists():
        lock.close()
        return out
    try:
        _build(out)
        marker.touch()
    finally:
        lock.close()
    return out


def _build(out: Path) -> None:
    from safetensors.torch import save_file

    from trainer.export import merge_into_unet, recipe_metadata
    from trainer.testing.comfy_unet import build_unet, write_comfy_unet

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    write_comfy_unet(out / "unet", seed=0)
    unet = build_unet(seed=0).float()
    loras = out / "loras"
    loras.mkdir(parents=True, exist_ok=True)
    kohya = _lora_tensors(unet, seed=1)
    meta = recipe_metadata(timesteps=RECIPE_TIMESTEPS, rank=LORA_RANK, alpha=LORA_ALPHA, training_steps=100,
                           teacher="comfy_test_unet", teacher_hash="0" * 16, prediction_type="epsilon")
    save_file(kohya, loras / "dmd2_test_lora.safetensors", metadata=meta)
    save_file(kohya, loras / "dmd2_test_lora_nometa.safetensors")
    save_file(_sd15_lora(), loras / "sd15_lora.safetensors")
    paths = {"lora_unet_" + n.replace(".", "_"): n for n, _ in unet.named_modules()}
    save_file(_peft_lora(kohya, paths), loras / "peft_lora.safetensors")

    gen = torch.Generator().manual_seed(99)
    context = torch.randn(1, 77, 2048, generator=gen)
    pooled = torch.randn(1, 1280, generator=gen)
    time_ids = torch.tensor([TIME_IDS])
    cond = (context, pooled, time_ids)
    img2img_latent = torch.randn(LATENT_SHAPE, generator=gen) * 0.8
    ref = {"context": context, "pooled": pooled, "time_ids": time_ids, "seed": SEED, "latent_shape": LATENT_SHAPE,
           "img2img_latent": img2img_latent, "samples": {}}
    for name, ts in {"4 steps": [999, 749, 499, 249], "2 steps": [999, 499], "1 step": [399]}.items():
        ref["samples"][name] = library_sample(unet, cond, ts, SEED)
    # img2img at denoise 0.5 with the 4-step preset: timesteps 499, 249 from latent + sigma * noise
    ref["samples"]["img2img 0.5"] = library_sample(unet, cond, [499, 249], SEED, latent=img2img_latent)
    # the LoRA merged into the weights (strength 1), sampled with its recipe
    merge_into_unet(unet, kohya, strength=1.0)
    ref["samples"]["lora recipe"] = library_sample(unet, cond, RECIPE_TIMESTEPS, SEED)
    torch.save(ref, out / "reference.pt")


if __name__ == "__main__":
    print(build(sys.argv[1]))
