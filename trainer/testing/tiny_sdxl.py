"""Tiny random SDXL-architecture models, built in code, for tests and toy teachers.

``python -m trainer.testing.tiny_sdxl --out DIR [--v-pred] [--ztsnr] [--seed N]`` writes DIR/diffusers (a full
diffusers SDXL folder) and DIR/tiny_sdxl.safetensors (the same weights under real sgm key names). Configs come from
``trainer.models.architecture`` (the same functions the single-file loader uses), so both load to the same model.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from trainer.models import architecture as arch

# Norm layers use 32 groups (SDXL's value, not readable from weights): every channel count must be a multiple of 32.
GROUPS = 32


@dataclass
class TinySDXLSpec:
    # UNet
    block_out_channels: tuple[int, ...] = (32, 64)
    layers_per_block: int | tuple[int, ...] = 1
    # Per down level: transformer depth (0 = no attention), or a list with one depth per resnet.
    transformer_layers_per_block: tuple = (0, 1)
    # Per up level (deepest first), one depth per resnet (layers_per_block + 1 each); None mirrors the down levels.
    reverse_transformer_layers_per_block: tuple | None = None
    mid_block: bool = True  # resnet-attention-resnet with the last level's depth (at least 1)
    addition_time_embed_dim: int = 8
    in_channels: int = 4
    sample_size: int = 8  # latent side the UNet is meant for
    # Text encoders (different widths, as SDXL's 768/1280, so a CLIP-L/CLIP-G mix-up cannot go unnoticed)
    text_width: int = 32
    text_layers: int = 2
    text_width_2: int = 64
    text_layers_2: int = 2
    projection_dim_2: int = 64
    vocab_size: int = 49408
    max_positions: int = 77
    # VAE: 4 levels = x8 like SDXL; 3 levels = x4 (32x32 images -> 8x8 latents)
    vae_block_out_channels: tuple[int, ...] = (32, 32, 32, 32)
    vae_layers_per_block: int = 1
    latent_channels: int = 4
    extra: dict = field(default_factory=dict)  # extra UNet config overrides, e.g. {"norm_num_groups": 32}

    @property
    def cross_attention_dim(self) -> int:
        return self.text_width + self.text_width_2  # SDXL concatenates both encoders' hidden states

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae_block_out_channels) - 1)


def _per_level(value, levels: int) -> tuple:
    return tuple(value) if isinstance(value, (list, tuple)) else (value,) * levels


def unet_arch(spec: TinySDXLSpec) -> arch.UNetArch:
    levels = len(spec.block_out_channels)
    layers = _per_level(spec.layers_per_block, levels)
    down = tuple(tuple(d) if isinstance(d, (list, tuple)) else (d,) * layers[i]
                 for i, d in enumerate(_per_level(spec.transformer_layers_per_block, levels)))
    if spec.reverse_transformer_layers_per_block is None:
        up = tuple((down[levels - 1 - u][0],) * (layers[levels - 1 - u] + 1) for u in range(levels))
    else:
        up = tuple(tuple(d) if isinstance(d, (list, tuple)) else (d,) * (layers[levels - 1 - u] + 1)
                   for u, d in enumerate(spec.reverse_transformer_layers_per_block))
    mid = max(1, down[-1][0]) if spec.mid_block else None
    return arch.UNetArch(
        in_channels=spec.in_channels,
        out_channels=spec.in_channels,
        block_out_channels=tuple(spec.block_out_channels),
        layers_per_block=layers,
        down_depths=down,
        up_depths=up,
        mid_depth=mid,
        cross_attention_dim=spec.cross_attention_dim,
        adm_in_channels=spec.projection_dim_2 + arch.NUM_TIME_IDS * spec.addition_time_embed_dim,
        addition_time_embed_dim=spec.addition_time_embed_dim,
        time_embed_dim=4 * spec.block_out_channels[0],
    )


def configs(spec: TinySDXLSpec) -> dict[str, dict]:
    """diffusers/transformers configs of the four components."""
    for name, chans in (("block_out_channels", spec.block_out_channels), ("vae_block_out_channels", spec.vae_block_out_channels)):
        if any(c % GROUPS for c in chans):
            raise ValueError(f"{name} {chans}: every width must be a multiple of {GROUPS} (GroupNorm groups)")
    unet_cfg = arch.unet_config(unet_arch(spec), sample_size=spec.sample_size)
    unet_cfg.update(spec.extra)
    clip_l = arch.CLIPArch(spec.text_width, spec.text_layers, 2 * spec.text_width, spec.max_positions, spec.vocab_size)
    clip_g = arch.CLIPArch(spec.text_width_2, spec.text_layers_2, 2 * spec.text_width_2, spec.max_positions, spec.vocab_size, spec.projection_dim_2)
    vae = arch.VAEArch(tuple(spec.vae_block_out_channels), spec.vae_layers_per_block, spec.latent_channels)
    vae_cfg = arch.vae_config(vae)
    vae_cfg["sample_size"] = spec.sample_size * spec.vae_scale_factor
    return {
        "unet": unet_cfg,
        "text_encoder": arch.clip_config(clip_l, "text_encoder"),
        "text_encoder_2": arch.clip_config(clip_g, "text_encoder_2"),
        "vae": vae_cfg,
    }


def build_tiny_sdxl(spec: TinySDXLSpec | None = None, seed: int = 0):
    """(unet, text_encoder, text_encoder_2, vae) with seeded random weights; norm weights stay 1, biases 0."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = configs(spec or TinySDXLSpec())
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(cfg["unet"])
    te = CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"]))
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(**cfg["text_encoder_2"]))
    vae = AutoencoderKL.from_config(cfg["vae"])
    return tuple(m.eval() for m in (unet, te, te2, vae))


def write_tiny_sdxl(out_dir, spec: TinySDXLSpec | None = None, seed: int = 0, v_pred: bool = False, ztsnr: bool = False) -> dict[str, Path]:
    """Write DIR/diffusers and DIR/tiny_sdxl.safetensors; returns {"diffusers": folder, "single_file": file}."""
    from trainer.models.single_file import save_sdxl_single_file
    from trainer.models.tokenizers import sdxl_tokenizers

    spec = spec or TinySDXLSpec()
    out = Path(out_dir)
    folder = out / "diffusers"
    unet, te, te2, vae = build_tiny_sdxl(spec, seed)
    for name, model in (("unet", unet), ("text_encoder", te), ("text_encoder_2", te2), ("vae", vae)):
        model.save_pretrained(folder / name, safe_serialization=True)
    tok, tok2 = sdxl_tokenizers()
    tok.save_pretrained(folder / "tokenizer")
    tok2.save_pretrained(folder / "tokenizer_2")
    sched = arch.shipped_config("scheduler")
    sched.update(prediction_type="v_prediction" if v_pred else "epsilon", rescale_betas_zero_snr=bool(ztsnr))
    if ztsnr:
        sched["timestep_spacing"] = "trailing"  # what zero-terminal-SNR schedules are sampled with
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched, indent=2), encoding="utf-8")
    (folder / "model_index.json").write_text(json.dumps(arch.shipped_config("model_index"), indent=2), encoding="utf-8")
    single = save_sdxl_single_file(out / "tiny_sdxl.safetensors", unet, te, te2, vae, v_pred=v_pred, ztsnr=ztsnr,
                                   metadata={"comfy_dmd2.tiny_seed": str(seed)})
    return {"diffusers": folder, "single_file": single}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.testing.tiny_sdxl", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--v-pred", action="store_true", help="mark the model as v-prediction")
    parser.add_argument("--ztsnr", action="store_true", help="mark the model as zero-terminal-SNR")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    paths = write_tiny_sdxl(args.out, seed=args.seed, v_pred=args.v_pred, ztsnr=args.ztsnr)
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
