"""``dmd2 export``: write the student LoRA from a run's checkpoint (``--run OUTPUT_DIR``), or merge a LoRA into the
teacher and write a single-file checkpoint in the sgm layout (``--merge --model M --lora L``)."""
from __future__ import annotations

import argparse
from pathlib import Path

from trainer.errors import ConfigError

DTYPES = ("fp16", "bf16", "fp32")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", help="a training output_dir (its newest checkpoint) or a checkpoints/step-N folder")
    parser.add_argument("--merge", action="store_true", help="merge --lora into --model and write a full checkpoint")
    parser.add_argument("--model", help="with --merge: the teacher the LoRA was trained on")
    parser.add_argument("--lora", help="with --merge: the LoRA file")
    parser.add_argument("--strength", type=float, default=1.0, help="with --merge: LoRA strength")
    parser.add_argument("--dtype", choices=DTYPES, default="fp16", help="tensor precision of the written file")
    parser.add_argument("--out", required=True, help="output .safetensors")


def run(args) -> int:
    import torch

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    if args.merge:
        if not (args.model and args.lora):
            raise ConfigError("--merge needs --model (the teacher) and --lora (the student LoRA)")
        return _merge(args, dtype)
    if not args.run:
        raise ConfigError("pass --run OUTPUT_DIR to export a run's LoRA, or --merge --model M --lora L")
    return _export_run(args, dtype)


def _export_run(args, dtype) -> int:
    from trainer.checkpoint import find_checkpoint
    from trainer.export import lora_from_checkpoint, save_safetensors_atomic

    run_dir = Path(args.run)
    ckpt = find_checkpoint(run_dir, "latest") if (run_dir / "checkpoints").is_dir() else find_checkpoint(run_dir.parent.parent, str(run_dir))
    tensors, meta = lora_from_checkpoint(ckpt, dtype)
    print(save_safetensors_atomic(tensors, args.out, meta))
    return 0


def _merge(args, dtype) -> int:
    from trainer.export import merge_into_unet, read_lora
    from trainer.generate import place
    from trainer.models.loading import load_sdxl
    from trainer.models.single_file import save_sdxl_single_file

    tensors, meta = read_lora(args.lora)
    model = load_sdxl(args.model)
    n = merge_into_unet(model.unet, tensors, args.strength)
    parts = [place(m, dtype=dtype) if m is not None else None for m in (model.unet, model.text_encoder, model.text_encoder_2, model.vae)]
    keep = {k: v for k, v in meta.items() if k.startswith("dmd2.")}
    keep["dmd2.merged_strength"] = str(args.strength)
    path = save_sdxl_single_file(args.out, *parts, v_pred=model.prediction_type == "v_prediction",
                                 ztsnr=model.schedule.zero_terminal_snr, metadata=keep)
    print(f"merged {n} LoRA modules into {model.name}")
    print(path)
    return 0
