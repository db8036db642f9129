"""Text encoders and a VAE for the ComfyUI server test, written with ComfyUI's own model classes (run it in ComfyUI's
venv): ``python tests/comfy/comfy_assets.py COMFYUI_DIR OUT_DIR`` (idempotent).

ComfyUI builds SDXL's CLIP-L and CLIP-G from fixed configs (a smaller encoder fails to load), so these are full-size
(~820M parameters, ~1.6 GB in fp16) with random weights: std 0.02, layer norms 1, biases 0. The VAE is TAESD-XL
(``VAELoader`` "taesdxl": ~2.4M parameters), random as well. Layout:
  OUT_DIR/text_encoders/dmd2_test_clip_l.safetensors, dmd2_test_clip_g.safetensors   (DualCLIPLoader, type sdxl)
  OUT_DIR/vae_approx/taesdxl_encoder.safetensors, taesdxl_decoder.safetensors
"""
from __future__ import annotations

import sys
from pathlib import Path

VERSION = "2"


def _fill(name: str, shape, gen):
    import torch

    if name.endswith("bias"):
        return torch.zeros(shape, dtype=torch.float16)
    if "layer_norm" in name or "final_layer_norm" in name:
        return torch.ones(shape, dtype=torch.float16)
    return (torch.randn(shape, generator=gen, dtype=torch.float32) * 0.02).half()


def write_text_encoders(out: Path) -> None:
    import torch
    from safetensors.torch import save_file

    import comfy.sd1_clip
    import comfy.sdxl_clip

    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    for fname, build in (("dmd2_test_clip_l.safetensors", lambda: comfy.sd1_clip.SDClipModel(device="meta")),
                         ("dmd2_test_clip_g.safetensors", lambda: comfy.sdxl_clip.SDXLClipG(device="meta"))):
        if (out / fname).exists():
            continue
        shapes = {k: tuple(v.shape) for k, v in build().transformer.state_dict().items()}
        tensors = {k: _fill(k, s, gen) for k, s in shapes.items()}
        save_file(tensors, out / f".{fname}.tmp")
        (out / f".{fname}.tmp").replace(out / fname)


def write_taesdxl(out: Path) -> None:
    import torch
    from safetensors.torch import save_file

    from comfy.taesd.taesd import TAESD

    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    taesd = TAESD(latent_channels=4)  # ComfyUI's layers skip weight init: fill every tensor ourselves
    for part in ("encoder", "decoder"):
        sd = {}
        for k, v in getattr(taesd, f"taesd_{part}").state_dict().items():
            if k.endswith("bias"):
                sd[k] = torch.zeros(v.shape)
            else:  # He init for the ReLU convs, halved so the residual blocks keep activations O(1)
                fan_in = v[0].numel()
                sd[k] = torch.randn(v.shape, generator=gen) * (0.5 * (2.0 / fan_in) ** 0.5)
        save_file(sd, out / f"taesdxl_{part}.safetensors")


def _locked(out: Path):
    """An exclusive lock beside ``out``, so that test runs started side by side build it once."""
    import fcntl

    out.parent.mkdir(parents=True, exist_ok=True)
    handle = open(out.parent / f".{out.name}.lock", "w")
    fcntl.flock(handle, fcntl.LOCK_EX)
    return handle


def main(comfy_dir: str, out_dir: str) -> None:
    out = Path(out_dir)
    marker = out / f".complete-v{VERSION}"
    with _locked(out):
        if not marker.exists():
            _write(comfy_dir, out)
            marker.touch()


def _write(comfy_dir: str, out: Path) -> None:
    sys.path.insert(0, comfy_dir)
    argv, sys.argv = sys.argv, [sys.argv[0], "--cpu"]
    import comfy.options

    comfy.options.enable_args_parsing()
    import comfy.model_management  # noqa: F401  (reads --cpu)

    sys.argv = argv
    write_text_encoders(out / "text_encoders")
    write_taesdxl(out / "vae_approx")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
