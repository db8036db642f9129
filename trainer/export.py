"""LoRA export in the kohya key format that ComfyUI, A1111/Forge and diffusers all load:
``lora_unet_<diffusers module path with '.' -> '_'>.lora_down.weight / .lora_up.weight / .alpha``.

PEFT-style keys (what diffusers' ``save_lora_weights`` writes) lose every attention layer in ComfyUI, and a file
without ``.alpha`` is read as alpha = rank (8x too strong for DMD2's rank 64 / alpha 8), hence this format.
The sampling recipe goes into the safetensors metadata so loaders (our ComfyUI node, ``dmd2 generate``) can apply it.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from trainer.checkpoint import STATE_FILE
from trainer.errors import LoRAFormatError
from trainer.files import atomic_write
from trainer.weight_average import STEM as AVERAGE

PREFIX = "lora_unet_"


def kohya_state_dict(unet, adapter: str, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """The ``adapter`` LoRA of a diffusers UNet (peft layers injected by ``add_adapter``) as kohya keys."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, module in unet.named_modules():
        if not isinstance(module, LoraLayer) or adapter not in module.lora_A:
            continue
        key = PREFIX + name.replace(".", "_")
        down, up = module.lora_A[adapter].weight, module.lora_B[adapter].weight
        out[f"{key}.lora_down.weight"] = down.detach().to("cpu", dtype).contiguous()
        out[f"{key}.lora_up.weight"] = up.detach().to("cpu", dtype).contiguous()
        out[f"{key}.alpha"] = torch.tensor(float(module.lora_alpha[adapter]), dtype=dtype)
    if not out:
        raise LoRAFormatError(f"the UNet has no LoRA adapter named {adapter!r}: nothing to export")
    return out


def recipe_metadata(*, timesteps, rank: int, alpha: float, training_steps: int, teacher: str, teacher_hash: str,
                    prediction_type: str, extra: dict | None = None) -> dict[str, str]:
    """safetensors metadata (str -> str): how to sample this LoRA, and where it came from."""
    meta = {
        "dmd2.timesteps": json.dumps([int(t) for t in timesteps]),
        "dmd2.cfg": "1",
        "dmd2.sampler": "dmd2",  # predict x0, re-noise with fresh noise to the next timestep (LCM-style)
        "dmd2.rank": str(rank),
        "dmd2.alpha": str(alpha),
        "dmd2.steps": str(training_steps),
        "dmd2.teacher": teacher,
        "dmd2.teacher_hash": teacher_hash,
        "dmd2.prediction_type": prediction_type,
        "dmd2.recipe": (f"{len(timesteps)} step(s) at timesteps {list(timesteps)}, CFG 1 (negative prompts do nothing), "
                        "DMD2/LCM sampler: predict x0, add fresh noise to the next timestep. "
                        "ComfyUI: DMD2 KSampler, or KSampler with sampler lcm + scheduler simple for 4 steps."),
        # kohya's keys, which other tools read to show rank/alpha
        "ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(alpha),
        "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
    }
    meta.update({k: str(v) for k, v in (extra or {}).items()})
    return meta


def lora_from_checkpoint(checkpoint: str | Path, dtype: torch.dtype = torch.float16) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A training checkpoint folder (``checkpoints/step-N``) -> the student LoRA in kohya keys and its recipe metadata,
    as ``dmd2 train`` writes them at the end of a run."""
    checkpoint = Path(checkpoint)
    info = json.loads((checkpoint / STATE_FILE).read_text())
    cfg, teacher = info["config"], info.get("teacher", {})
    alpha = cfg["lora"]["alpha"]
    tensors = {}
    # a run with student.average_from exports the mean of the student's weights, and so does its checkpoint
    averaged = (checkpoint / f"{AVERAGE}.safetensors").is_file() and AVERAGE in info
    for key, value in load_file(checkpoint / f"{AVERAGE if averaged else 'student'}.safetensors").items():  # <module>.lora_A.student.weight
        module, _, rest = key.partition(".lora_")
        base = PREFIX + module.replace(".", "_")
        tensors[f"{base}.lora_{'down' if rest.startswith('A') else 'up'}.weight"] = value.to(dtype)
        tensors[f"{base}.alpha"] = torch.tensor(float(alpha), dtype=dtype)
    meta = recipe_metadata(timesteps=cfg["student"]["timesteps"], rank=cfg["lora"]["rank"], alpha=alpha,
                           training_steps=info["step"], teacher=teacher.get("name", cfg["model"]), teacher_hash=teacher.get("hash", ""),
                           prediction_type=teacher.get("prediction_type", cfg.get("prediction_type") or "epsilon"),
                           extra=average_metadata(info[AVERAGE]) if averaged else None)
    return tensors, meta


def average_metadata(average: dict) -> dict[str, str]:
    """Metadata for a LoRA that is the mean of the student's weights (``WeightAverage.info()``)."""
    return {"dmd2.average": f"mean of the student's weights after each of its {average['count']} updates from iteration {average['start']}"}


def save_safetensors_atomic(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    with atomic_write(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)
    return Path(path)


def read_lora(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A kohya-format LoRA file -> (tensors, metadata); a one-line error for anything else."""
    path = Path(path)
    if not path.is_file():
        raise LoRAFormatError(f"LoRA file {path} does not exist: pass the .safetensors file `dmd2 train` wrote")
    try:
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises several types for truncated or foreign files
        raise LoRAFormatError(f"cannot read LoRA file {path} ({str(exc).splitlines()[0]}): is it a complete .safetensors file?") from None
    unet_keys = [k for k in tensors if k.startswith(PREFIX)]
    if not unet_keys:
        sample = next(iter(tensors), "<no keys>")
        raise LoRAFormatError(f"{path} has no kohya `lora_unet_` keys (first key: {sample}): export it with `dmd2 export`")
    return tensors, meta


def merge_into_unet(unet, tensors: dict[str, torch.Tensor], strength: float = 1.0) -> int:
    """Add ``strength * alpha / rank * up @ down`` to each targeted weight of a plain diffusers UNet, in place.
    Returns the number of modules patched; raises when a key names no module of this UNet."""
    modules = dict(unet.named_modules())
    by_key = {PREFIX + name.replace(".", "_"): m for name, m in modules.items() if hasattr(m, "weight")}
    patched = 0
    for key in sorted({k.rsplit(".", 2)[0] for k in tensors if k.endswith(".lora_down.weight")}):
        if key not in by_key:
            raise LoRAFormatError(f"LoRA key {key} matches no layer of this UNet: was the LoRA trained on another architecture?")
        module = by_key[key]
        down, up = tensors[f"{key}.lora_down.weight"].float(), tensors[f"{key}.lora_up.weight"].float()
        rank = down.shape[0]
        alpha = float(tensors.get(f"{key}.alpha", torch.tensor(float(rank))))
        delta = (up.flatten(1) @ down.flatten(1)).reshape(module.weight.shape) * (strength * alpha / rank)
        with torch.no_grad():
            module.weight.add_(delta.to(module.weight.device, module.weight.dtype))
        patched += 1
    return patched


def with_lora(model, path: str | Path):
    """A copy of an ``SDXLModel`` whose UNet (copied) has the LoRA at ``path`` merged in; the text encoders, VAE and
    schedule are shared with ``model``, which is left as it was. Returns (student model, the LoRA's metadata)."""
    import copy
    import dataclasses

    tensors, meta = read_lora(path)
    student = dataclasses.replace(model, unet=copy.deepcopy(model.unet))
    merge_into_unet(student.unet, tensors)
    return student, meta
