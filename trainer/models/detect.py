"""Tell what a checkpoint is from its key names and a few shapes, before any model is built.

Refusals are cheap this way: a 7 GB SD1.5 file is rejected after reading its header, without importing torch. Every refusal is an
:class:`UnsupportedModelError` whose one-line message names what was found and what to pass instead.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Mapping

from trainer.errors import ModelLoadError, UnsupportedModelError
from trainer.models.architecture import CLIP_G_PREFIX, CLIP_L_PREFIX, UNET_PREFIX, VAE_PREFIX
from trainer.models.single_file import PICKLE_SUFFIXES, TensorFile

SDXL_ONLY = "comfy-dmd2 distills SDXL-family models only: pass an SDXL checkpoint"
_LORA_PARTS = (".lora_down.", ".lora_up.", ".lora_A.", ".lora_B.", "lora_down.weight", "lora_up.weight")


def _lora_keys(keys) -> list[str]:
    return [k for k in keys if any(p in k for p in _LORA_PARTS) or k.endswith(".alpha") or k.startswith(("lora_unet_", "lora_te"))]


def unet_prefix(keys) -> str | None:
    """Where the sgm UNet lives: a full checkpoint (``model.diffusion_model.``) or a bare UNet file (no prefix)."""
    for prefix in (UNET_PREFIX, ""):
        if prefix + "input_blocks.0.0.weight" in keys:
            return prefix
    return None


def _first(shapes: Mapping[str, tuple], prefix: str, suffix: str) -> tuple | None:
    for key, shape in shapes.items():
        if key.startswith(prefix) and key.endswith(suffix):
            return shape
    return None


def check_sdxl_family(shapes: Mapping[str, tuple], where: str) -> str:
    """Return the UNet key prefix of an SDXL-family sgm checkpoint; raise UnsupportedModelError for anything else."""
    keys = shapes.keys()
    lora = _lora_keys(keys)
    if lora:
        raise UnsupportedModelError(
            f"{where} is a LoRA ({len(lora)} LoRA keys such as {lora[0]!r}), not a model; pass the SDXL base checkpoint as the model and the LoRA separately"
        )
    if any("double_blocks." in k or "single_blocks." in k for k in keys):
        raise UnsupportedModelError(f"{where} is a Flux checkpoint (double_blocks/single_blocks keys); {SDXL_ONLY}")
    if any("joint_blocks." in k for k in keys):
        raise UnsupportedModelError(f"{where} is an SD3 checkpoint (joint_blocks keys); {SDXL_ONLY}")
    prefix = unet_prefix(keys)
    if prefix is None:
        if any(k.startswith(("down_blocks.", "unet.down_blocks.")) for k in keys):
            raise UnsupportedModelError(f"{where} holds diffusers-named UNet weights only; pass the whole diffusers folder (the one with model_index.json) or an sgm single file")
        if any(k.startswith((CLIP_L_PREFIX, CLIP_G_PREFIX, VAE_PREFIX)) for k in keys):
            raise UnsupportedModelError(f"{where} has text encoder/VAE weights but no UNet (model.diffusion_model.*); pass a full SDXL checkpoint")
        raise UnsupportedModelError(f"{where} has no Stable Diffusion UNet (no model.diffusion_model.input_blocks keys); {SDXL_ONLY}")

    to_k = _first(shapes, prefix, ".attn2.to_k.weight")
    context = to_k[1] if to_k else None
    label = shapes.get(prefix + "label_emb.0.0.weight")
    adm = label[1] if label else None
    if context is None:
        raise UnsupportedModelError(f"{where} has a UNet without cross-attention (no attn2 layers); {SDXL_ONLY}")
    if context == 1280 and adm == 2560:
        raise UnsupportedModelError(
            f"{where} is the SDXL refiner (UNet context dim 1280, adm 2560), which is not supported; pass an SDXL base-family checkpoint"
        )
    if adm is None:
        family = {768: "an SD1.5", 1024: "an SD2"}.get(context, "a non-SDXL")
        raise UnsupportedModelError(f"{where} is {family} checkpoint (UNet context dim {context}, no text-time label_emb); {SDXL_ONLY}")
    if context == 1024:
        raise UnsupportedModelError(f"{where} is an SD2 unCLIP checkpoint (UNet context dim 1024); {SDXL_ONLY}")
    return prefix


def check_folder_unet_config(cfg: Mapping, where: str) -> None:
    """The same family refusals as for single files, from a diffusers folder's unet/config.json."""
    ctx = cfg.get("cross_attention_dim")
    ctx = ctx[0] if isinstance(ctx, list) else ctx
    adm = cfg.get("projection_class_embeddings_input_dim")
    if cfg.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
        raise UnsupportedModelError(f"{where} holds a {cfg.get('_class_name')}, not an SDXL UNet; {SDXL_ONLY}")
    if ctx == 1280 and adm == 2560:
        raise UnsupportedModelError(f"{where} is the SDXL refiner (UNet context dim 1280, adm 2560), which is not supported; pass an SDXL base-family model")
    if cfg.get("addition_embed_type") != "text_time":
        family = {768: "an SD1.5", 1024: "an SD2"}.get(ctx, "a non-SDXL")
        raise UnsupportedModelError(f"{where} is {family} model (UNet context dim {ctx}, no text-time conditioning); {SDXL_ONLY}")


_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def looks_like_repo_id(source: str) -> bool:
    return bool(_REPO_ID.match(source)) and not source.lower().endswith((".safetensors",) + PICKLE_SUFFIXES)


def _read_config(path: Path, where: str) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{where}: cannot read {path.parent.name}/{path.name} ({type(exc).__name__}); the diffusers folder is incomplete") from None


def check_source(source, *, allow_pickle: bool = False) -> None:
    """Every check that needs no model and no torch: path, format, pickle opt-in, header, model family.

    A name that is not a local path but looks like a Hub repo id passes (the loader downloads it, then checks it).
    """
    text = os.fspath(source)
    path = Path(text).expanduser()
    if not path.exists():
        if looks_like_repo_id(text):
            return
        raise ModelLoadError(f"{text} does not exist; pass an SDXL .safetensors file, a diffusers folder or a Hub repo id")
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            if (path / "config.json").is_file():
                raise UnsupportedModelError(f"{text} is a single diffusers component folder; pass the pipeline folder above it (the one with model_index.json)")
            raise ModelLoadError(f"{text} is not a diffusers folder (no model_index.json); pass a diffusers SDXL folder or a .safetensors checkpoint")
        check_folder_unet_config(_read_config(path / "unet" / "config.json", text), text)
        return
    reader = TensorFile(path, allow_pickle=allow_pickle)
    try:
        check_sdxl_family(reader.shapes, text)
    finally:
        reader.close()
