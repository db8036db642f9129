"""A small random UNet that ComfyUI itself classifies as SDXL-family, for tests of the ComfyUI nodes.

``python -m trainer.testing.comfy_unet --out DIR [--seed N]`` writes
  DIR/diffusers/          the UNet in diffusers layout (``UNet2DConditionModel.save_pretrained``, fp16)
  DIR/comfy_test_unet.safetensors   the same fp16 weights under sgm keys (``model.diffusion_model.*``), loadable
                          with ComfyUI's UNETLoader (or as the UNet part of a checkpoint).

ComfyUI detects SDXL-family UNets by model_channels=320, context_dim=2048, adm_in_channels=2816, linear transformer
projections and a known input transformer-depth pattern; channel multipliers and block counts are not checked. This
one uses KOALA-700M's pattern [0, 2, 5] (one resnet per level, 320 channels on all three levels), KOALA's missing
mid block, one transformer per up-block resnet on the two deeper levels, 5 heads of 64: ~74M parameters (~150 MB
in fp16). Norm weights are 1 and biases 0 (diffusers' init), other weights PyTorch's default init from ``--seed``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from trainer.files import atomic_write
from trainer.models import convert
from trainer.models.architecture import UNET_PREFIX

SINGLE_FILE = "comfy_test_unet.safetensors"

UNET_CONFIG = {
    "sample_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "mid_block_type": None,
    "block_out_channels": [320, 320, 320],
    "layers_per_block": 1,
    "transformer_layers_per_block": [0, 2, 5],  # ComfyUI's transformer_depth for KOALA-700M
    "reverse_transformer_layers_per_block": [[1, 1], [1, 1], [0, 0]],
    "attention_head_dim": [5, 5, 5],  # diffusers' name for the head count: 5 heads of 64 channels, as SDXL
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,  # pooled CLIP-G 1280 + 6 time ids x 256
    "norm_num_groups": 32,
}


def build_unet(seed: int = 0, dtype: torch.dtype = torch.float16):
    """The diffusers UNet with seeded random weights, rounded to ``dtype`` (so both files hold identical values)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(dict(UNET_CONFIG))
    return unet.to(dtype).eval()


def sgm_state_dict(unet) -> dict[str, torch.Tensor]:
    state = {k: v.detach().contiguous() for k, v in unet.state_dict().items()}
    rows = convert.unet_table(dict(unet.config), state.keys(), UNET_PREFIX)
    return convert.diffusers_to_sgm(state, rows)


def write_comfy_unet(out_dir, seed: int = 0) -> dict[str, Path]:
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    unet = build_unet(seed)
    folder = out / "diffusers"
    unet.save_pretrained(folder, safe_serialization=True)
    single = out / SINGLE_FILE
    with atomic_write(single) as tmp:
        save_file(sgm_state_dict(unet), tmp, metadata={"comfy_dmd2.test_unet_seed": str(seed),
                                                        "comfy_dmd2.unet_config": json.dumps(UNET_CONFIG)})
    return {"diffusers": folder, "single_file": single}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.testing.comfy_unet", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for kind, path in write_comfy_unet(args.out, seed=args.seed).items():
        print(f"{kind}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
