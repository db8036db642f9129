"""The DMD2 sampling recipe a LoRA carries in its safetensors metadata, and the node presets. Pure Python + the
torch-only ``trainer.sampling``: no ComfyUI import, so it is unit-testable anywhere.

Metadata keys written by the trainer's exporter: ``dmd2.timesteps`` (JSON list), ``dmd2.cfg``, ``dmd2.sampler``,
``dmd2.rank``, ``dmd2.alpha``, ``dmd2.steps``, ``dmd2.teacher``, ``dmd2.teacher_hash``. Files without them (any
other LoRA, an older export) get the 4-step preset.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field

from ._shared import errors, sampling

DEFAULT_STEPS = 4
# Node-facing preset names -> number of student steps (timesteps from trainer.sampling.DMD2_PRESETS).
PRESETS: dict[str, int] = {"4 steps": 4, "2 steps": 2, "1 step": 1}
FROM_LORA = "from LoRA"
CUSTOM = "custom"
# Where the DMD2 LoRA Loader leaves the recipe on the MODEL it returns (ModelPatcher.model_options, deep-copied on
# clone), so that "from LoRA" in the scheduler and the KSampler can read it without an extra wire.
MODEL_OPTIONS_KEY = "dmd2_recipe"


@dataclass(frozen=True)
class Recipe:
    timesteps: tuple[int, ...] = sampling.DMD2_PRESETS[DEFAULT_STEPS]
    cfg: float = 1.0
    sampler: str = "dmd2"
    rank: int | None = None
    alpha: float | None = None
    training_steps: int | None = None
    teacher: str | None = None
    teacher_hash: str | None = None
    source: str = "default"  # "metadata": read from the file; "default": the file had no (usable) recipe
    notes: tuple[str, ...] = field(default_factory=tuple)

    def as_dict(self) -> dict:
        out = asdict(self)
        out["timesteps"] = list(self.timesteps)
        out["notes"] = list(self.notes)
        return out

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2)


def parse_timesteps(text: str, num_train_timesteps: int = 1000) -> tuple[int, ...]:
    """A custom timestep list, as typed into the node ("999, 749, 499, 249" or "[999, 499]")."""
    parts = [p for p in re.split(r"[\s,;\[\]]+", str(text).strip()) if p]
    if not parts:
        raise errors.ConfigError("custom timesteps are empty: type a list such as 999, 749, 499, 249")
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        raise errors.ConfigError(f"custom timesteps {text!r}: use whole numbers separated by commas, e.g. 999, 749, 499, 249") from None
    return check_timesteps(values, num_train_timesteps)


def check_timesteps(values, num_train_timesteps: int = 1000) -> tuple[int, ...]:
    values = tuple(int(v) for v in values)
    if not values:
        raise errors.ConfigError("the timestep list is empty")
    bad = [v for v in values if not 0 <= v < num_train_timesteps]
    if bad:
        raise errors.ConfigError(f"timesteps {bad} are outside 0..{num_train_timesteps - 1}")
    if any(b >= a for a, b in zip(values, values[1:])):
        raise errors.ConfigError(f"timesteps {list(values)} must be strictly decreasing (e.g. 999, 749, 499, 249)")
    return values


def _num(value, kind):
    try:
        return kind(float(value)) if kind is int else kind(value)
    except (TypeError, ValueError):
        return None


def recipe_from_metadata(metadata: dict | None) -> Recipe:
    """Never raises: a missing or unreadable recipe falls back to the 4-step preset, with a note saying why."""
    meta = dict(metadata or {})
    notes: list[str] = []
    raw = meta.get("dmd2.timesteps")
    timesteps = None
    if raw is None:
        notes.append("no dmd2.timesteps in the file's metadata: using the 4-step preset")
    else:
        try:
            parsed = json.loads(raw) if isinstance(raw, str) else raw
            timesteps = check_timesteps(parsed if isinstance(parsed, (list, tuple)) else [parsed])
        except (ValueError, TypeError, errors.ConfigError) as exc:
            notes.append(f"unreadable dmd2.timesteps {raw!r} ({exc}): using the 4-step preset")
    cfg = _num(meta.get("dmd2.cfg", 1.0), float)
    if cfg is not None and cfg != 1.0:
        notes.append(f"the file asks for cfg {cfg}; DMD2 students sample at cfg 1")
    return Recipe(
        timesteps=timesteps or sampling.DMD2_PRESETS[DEFAULT_STEPS],
        cfg=1.0,
        sampler=str(meta.get("dmd2.sampler", "dmd2")),
        rank=_num(meta.get("dmd2.rank"), int),
        alpha=_num(meta.get("dmd2.alpha"), float),
        training_steps=_num(meta.get("dmd2.steps"), int),
        teacher=meta.get("dmd2.teacher"),
        teacher_hash=meta.get("dmd2.teacher_hash"),
        source="metadata" if timesteps else "default",
        notes=tuple(notes),
    )


def resolve_timesteps(preset: str, custom: str = "", recipe: dict | None = None, denoise: float = 1.0) -> tuple[int, ...]:
    """The timesteps a node samples at: a named preset, a custom list, or the LoRA's recipe (4-step without one);
    then, for img2img (``denoise < 1``), only those below ``denoise * 1000``."""
    if preset in PRESETS:
        ts = sampling.preset_timesteps(PRESETS[preset])
    elif preset == CUSTOM:
        ts = parse_timesteps(custom)
    elif preset == FROM_LORA:
        ts = check_timesteps(recipe["timesteps"]) if recipe and recipe.get("timesteps") else sampling.preset_timesteps(DEFAULT_STEPS)
    else:
        raise errors.ConfigError(f"unknown preset {preset!r}: use one of {[*PRESETS, CUSTOM, FROM_LORA]}")
    if denoise <= 0:
        return ()
    return sampling.denoise_timesteps(ts, min(float(denoise), 1.0))
