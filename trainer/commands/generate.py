"""``dmd2 generate --model M --lora L --prompt "..." --seed S --out img.png`` samples the student with the DMD2
sampler; ``--teacher-steps 50 --cfg 6`` (and no LoRA) samples the teacher for comparison."""
from __future__ import annotations

import argparse
import json

from trainer.errors import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="teacher checkpoint: .safetensors, diffusers folder or Hub id")
    parser.add_argument("--lora", help="student LoRA written by `dmd2 train`")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="output PNG")
    parser.add_argument("--steps", type=int, choices=(1, 2, 4), help="DMD2 preset (default: the timesteps in the LoRA's metadata)")
    parser.add_argument("--timesteps", help="explicit student timesteps, e.g. 999,749,499,249")
    parser.add_argument("--strength", type=float, default=1.0, help="LoRA strength")
    parser.add_argument("--teacher-steps", type=int, help="sample the teacher instead, with this many Euler steps")
    parser.add_argument("--cfg", type=float, default=6.0, help="teacher CFG scale (student sampling always uses CFG 1)")
    parser.add_argument("--resolution", type=int, help="image side in pixels (default: the model's native size)")
    parser.add_argument("--prediction-type", choices=("epsilon", "v_prediction"))
    parser.add_argument("--allow-pickle", action="store_true")


def student_timesteps(args, metadata: dict) -> list[int]:
    from trainer.sampling import preset_timesteps

    if args.timesteps:
        try:
            return [int(t) for t in args.timesteps.split(",")]
        except ValueError:
            raise ConfigError(f"--timesteps must be comma-separated integers, got {args.timesteps!r}") from None
    if args.steps:
        return list(preset_timesteps(args.steps))
    if "dmd2.timesteps" in metadata:
        return json.loads(metadata["dmd2.timesteps"])
    return list(preset_timesteps(4))


def run(args) -> int:
    if not args.lora and not args.teacher_steps:
        raise ConfigError("nothing to sample: pass --lora for the student, or --teacher-steps N (e.g. 50) for the teacher")
    if not args.prompt.strip():
        raise ConfigError("--prompt is empty: give the text to generate")
    import torch

    from trainer import generate as gen
    from trainer.conditioning import encode_prompts
    from trainer.export import merge_into_unet, read_lora
    from trainer.models.loading import load_sdxl

    tensors, metadata = read_lora(args.lora) if args.lora else ({}, {})
    model = load_sdxl(args.model, prediction_type=args.prediction_type or metadata.get("dmd2.prediction_type"), allow_pickle=args.allow_pickle)
    if model.vae is None:
        raise ConfigError(f"{args.model} has no VAE to decode images: use a checkpoint with a baked-in VAE")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    factor = 2 ** (len(model.vae.config.block_out_channels) - 1)
    resolution = args.resolution or model.unet.config.sample_size * factor
    if tensors:
        merge_into_unet(model.unet, tensors, args.strength)
    cond = encode_prompts(model, [args.prompt], resolution)
    gen.place(model.unet, device, dtype)
    shape = gen.latent_shape(model.unet, model.vae, resolution)
    call = gen.unet_call(model.unet)
    if args.teacher_steps:
        latents = gen.sample_teacher(call, model.schedule, cond, cond.zeros_like(), args.teacher_steps, args.cfg, [args.seed], shape, device=device, dtype=dtype)
    else:
        latents = gen.sample_student(call, model.schedule, cond, student_timesteps(args, metadata), [args.seed], shape, device=device, dtype=dtype)
    model.vae.to(device)
    image = gen.to_pil(gen.decode(model.vae, latents))[0]
    gen.save_png_atomic(image, args.out)
    print(args.out)
    return 0
