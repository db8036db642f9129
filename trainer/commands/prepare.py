"""``dmd2 prepare --config run.yaml [--set key=value ...]``: encode prompts, real images and (without images) the
teacher's GAN samples once into the on-disk cache that ``dmd2 train`` reuses. Unreadable images are skipped and
listed. Running it again is a no-op while the cache is current."""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="the same YAML file `dmd2 train` takes")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override any option, e.g. --set data.cache_dir=/fast/cache")


def run(args) -> int:
    import torch

    from trainer import generate as gen
    from trainer.config import load_config
    from trainer.models.loading import load_sdxl
    from trainer.prepare import prepare

    cfg = load_config(args.config, args.overrides).validate()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    mp = cfg.mixed_precision if cfg.mixed_precision != "auto" else ("bf16" if device.type == "cuda" else "no")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mp, torch.float32)
    model = load_sdxl(cfg.model, prediction_type=cfg.prediction_type, zero_terminal_snr=cfg.zero_terminal_snr, allow_pickle=cfg.allow_pickle)
    data = prepare(cfg, model, device=device, dtype=dtype, skip_unreadable=True,
                   teacher_call=lambda: gen.unet_call(gen.place(model.unet, device, dtype)))
    real = data.real
    summary = f"{len(data.prompts)} prompt(s)"
    if real is not None:
        summary += f", {len(real)} GAN real sample(s) ({real.source}) in {len(real.buckets)} bucket(s)"
    if data.skipped:
        summary += f", {len(data.skipped)} image(s) skipped"
    print(f"cache ready: {data.cache_dir} ({summary})")
    return 0
