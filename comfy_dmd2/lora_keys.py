"""Which modules of a LoRA file land on the model, decided before anything is patched. Pure Python (shapes only):
the ComfyUI node feeds it ComfyUI's own key map, so "mapped" means exactly what ComfyUI will apply.

ComfyUI itself only logs ``lora key not loaded`` for keys it cannot place; a DMD2 LoRA with half its layers missing
samples garbage at 4 steps, so the DMD2 LoRA Loader refuses such a file with one message instead.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from math import prod
from typing import Callable, Mapping

from ._shared import errors

# Per-module tensor suffixes of the LoRA formats ComfyUI reads (kohya, PEFT/diffusers, LyCORIS variants).
_SUFFIXES = (
    ".lora_down.weight", ".lora_up.weight", ".lora_mid.weight", ".alpha", ".dora_scale",
    ".lora_A.weight", ".lora_B.weight", ".lora.down.weight", ".lora.up.weight",
    ".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b", ".hada_t1", ".hada_t2",
    ".lokr_w1", ".lokr_w2", ".lokr_w1_a", ".lokr_w1_b", ".lokr_w2_a", ".lokr_w2_b", ".lokr_t2",
    ".diff", ".diff_b", ".w_norm", ".b_norm", ".set_weight", ".reshape_weight",
)
_TEXT_ENCODER_PREFIXES = ("lora_te_", "lora_te1_", "lora_te2_", "lora_te3_", "text_encoder.", "text_encoder_2.",
                          "text_encoders.")


def module_of(key: str) -> str | None:
    for suffix in _SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)]
    return None


def lora_format(keys) -> str:
    """"peft" (diffusers ``save_lora_weights``: ``unet.<path>.lora_A.weight``), "kohya" (``lora_unet_*``), or "other"."""
    keys = list(keys)
    if any(".lora_A." in k or ".lora_B." in k for k in keys) or any(k.startswith(("unet.", "base_model.model.")) for k in keys):
        return "peft"
    if any(k.startswith("lora_unet_") for k in keys):
        return "kohya"
    return "other"


@dataclass
class MappingReport:
    fmt: str
    modules: int  # LoRA modules in the file (text-encoder ones excluded)
    mapped: dict[str, str] = field(default_factory=dict)  # LoRA module -> model weight key
    unmapped: list[str] = field(default_factory=list)  # no layer of this model has that name
    mismatched: list[str] = field(default_factory=list)  # a layer has that name but another shape
    text_encoder: int = 0  # modules for the text encoders, which this loader does not apply
    stray_keys: list[str] = field(default_factory=list)  # tensors that belong to no LoRA module

    @property
    def ok(self) -> bool:
        return self.fmt != "peft" and self.modules > 0 and not self.unmapped and not self.mismatched

    def summary(self) -> str:
        s = f"{len(self.mapped)} of {self.modules} LoRA modules mapped onto the model"
        if self.text_encoder:
            s += f"; {self.text_encoder} text-encoder modules ignored (use a CLIP LoRA loader for those)"
        return s


def _delta_shape(tensors: Mapping, module: str):
    """(out, in * kernel) of the weight change a LoRA module makes, when it is a plain down/up pair."""
    for down_s, up_s in ((".lora_down.weight", ".lora_up.weight"), (".lora_A.weight", ".lora_B.weight")):
        down, up = tensors.get(module + down_s), tensors.get(module + up_s)
        if down is not None and up is not None:
            return int(up.shape[0]), int(prod(down.shape[1:]))
    return None


def analyze(tensors: Mapping, key_map: Mapping[str, object], weight_shape: Callable[[str], tuple | None]) -> MappingReport:
    """``tensors``: the LoRA file (name -> anything with ``.shape``); ``key_map``: LoRA module name -> model weight
    key, as ComfyUI builds it (a value may be a tuple whose first item is the key); ``weight_shape(key)``: the
    model weight's shape."""
    modules: dict[str, None] = {}
    stray = []
    for key in tensors:
        mod = module_of(key)
        if mod is None:
            stray.append(key)
        else:
            modules.setdefault(mod)
    report = MappingReport(fmt=lora_format(tensors), modules=0, stray_keys=stray)
    for mod in modules:
        if mod.startswith(_TEXT_ENCODER_PREFIXES):
            report.text_encoder += 1
            continue
        report.modules += 1
        target = key_map.get(mod)
        if isinstance(target, tuple):
            target = target[0]
        if target is None:
            report.unmapped.append(mod)
            continue
        delta = _delta_shape(tensors, mod)
        shape = weight_shape(target) if delta is not None else None
        if delta is not None and shape is not None and (int(shape[0]), int(prod(shape[1:]))) != delta:
            report.mismatched.append(mod)
            continue
        report.mapped[mod] = target
    return report


def check(report: MappingReport, lora_name: str) -> None:
    """Raise one clear :class:`LoRAFormatError` unless every UNet module of the file lands on the model."""
    if report.fmt == "peft":
        raise errors.LoRAFormatError(
            f"{lora_name} is a PEFT/diffusers-format LoRA (keys like unet.<layer>.lora_A.weight): ComfyUI would "
            "silently drop its attention layers. Use a kohya-format file (lora_unet_*.lora_down/lora_up/alpha), "
            "as `dmd2 export` writes.")
    if report.modules == 0:
        what = "only text-encoder layers" if report.text_encoder else "no LoRA layers ComfyUI can read"
        raise errors.LoRAFormatError(f"{lora_name} has {what}: a DMD2 LoRA adapts the UNet (lora_unet_* keys).")
    bad = report.unmapped + report.mismatched
    if bad:
        kind = "name no layer of" if report.unmapped else "do not fit the shapes of"
        raise errors.LoRAFormatError(
            f"{lora_name}: {len(bad)} of {report.modules} LoRA modules {kind} this model (e.g. {bad[0]}); "
            "it was made for another architecture (an SD1.5 LoRA on SDXL?). Load a LoRA trained on this model's family.")
