"""The training configuration: nested dataclasses, loaded from YAML, overridden with ``--set a.b=value``.

The top-level keys (``model``, ``prompts``, ``images``, ``output_dir``, ``steps``, ``resolution``, ``batch_size``,
``seed``, ``student.timesteps``, ``lora.rank``, ``lora.alpha``, ``critic``, ``checkpoint_every``, ``validate_every``)
are a user-facing interface: keep them stable. Defaults follow DMD2's SDXL release unless a comment says otherwise.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from trainer.errors import ConfigError


@dataclass
class StudentConfig:
    # The student's timesteps, or a preset: 4 -> [999, 749, 499, 249], 2 -> [999, 499], 1 -> [399] (1-step mode)
    timesteps: list[int] | int = field(default_factory=lambda: [999, 749, 499, 249])
    backward_simulation: bool = True  # train step k on the current student's own k-step samples
    update_every: int = 5  # two time-scale rule: the critic updates every iteration, the student every 5th
    lr: float = 5e-5
    # Samples behind each student update (null: batch_size); the critic still trains on batch_size of them. More
    # samples steady the DMD gradient: on the toy teacher 4x lowered the 4-step student's FID at 1,200 iterations
    # (mean 1.19 against 1.38) for 1.4x the training time, and the long recipe's from 1.09-1.12x the teacher-50 row to
    # 0.95-0.96x at two training seeds (benchmarks/toy/NOTES.md, points 76-77)
    batch_size: int | None = None
    # From this iteration on, keep the mean of the student's weights after each of its updates and export that mean
    # instead of its last weights (null: DMD2's). Late in a run the student drifts around a level that the mean of its
    # weights beats: on the toy teacher the 1-step student's running mean over iterations 7,200-10,800 scored 0.97-1.00
    # at three training seeds where its checkpoints scored 1.15-1.56 (benchmarks/toy/NOTES.md, point 56). It does not
    # rescue a student that is getting worse: the 4-step one peaks near 4,800 (point 57); with its first step read at
    # 799 its mean from 6,000 to 7,200 scored 0.83-0.90 at three training seeds of four (point 59). Checkpoints keep
    # both; training goes on from the last weights
    average_from: int | None = None


@dataclass
class LoRAConfig:
    rank: int = 64
    alpha: float = 8.0
    critic_rank: int | None = None  # default: same as the student
    critic_alpha: float | None = None


@dataclass
class DMDConfig:
    guidance_scale: float = 8.0  # teacher CFG inside the DMD loss
    uncond: str = "zeros"  # "zeros" (DMD2's reference: all-zero prompt and pooled embeddings) or "empty_prompt"
    min_t: float = 0.02
    max_t: float = 0.98
    critic_lr: float = 5e-5
    # (t, noise) re-noisings of each student sample, whose DMD gradients are averaged (DMD2: 1). More lowers the
    # variance of the student's update for the price of teacher and critic passes on student iterations only (no
    # gradients), on noise_draws x the micro-batch at once, so mind the memory on a GPU. On the toy teacher 8 draws
    # did not improve FID averaged over checkpoints (benchmarks/toy/NOTES.md, point 27)
    noise_draws: int = 1
    # One critic LoRA per student step, each modelling only the outputs of its step, instead of one critic for the
    # mixture of all steps' outputs (DMD2's). Costs one critic adapter (and its optimiser state) per step, not compute
    critic_per_step: bool = False
    # The critic's denoising loss: "target" (the teacher's own eps or v loss, DMD2's) or "x0_high_noise" (the x0 error
    # where noise dominates, SNR < 1, the eps loss elsewhere; trainer.objectives.critic_x0_loss)
    critic_loss: str = "target"
    # Draw the DMD loss's timestep for student step k > 0 only up to that step's input timestep t_k (DMD2: the whole
    # [min_t, max_t] window for every step; the first step, which starts from pure noise, keeps it). The idea: a later
    # step cannot redraw the layout it is handed, yet all steps share one LoRA. On the toy teacher this lowered FID a
    # little at batch 16, not at batch 256, and cost accuracy on a weaker teacher (benchmarks/toy/NOTES.md, 37-38)
    t_below_step: bool = False


@dataclass
class GANConfig:
    real_data: str = "auto"  # "images" (needs `images`), "teacher" (generate teacher samples), "none", or "auto"
    student_weight: float = 5e-3
    critic_weight: float = 1e-2
    head_lr: float | None = None  # default: dmd.critic_lr
    max_t: float = 1.0  # real and fake are re-noised at t ~ U[0, max_t * T] (capped at T - 1) before the head (DMD2: all of it)
    teacher_samples: int = 256  # with real_data: teacher
    teacher_steps: int = 50
    teacher_cfg: float = 6.0


@dataclass
class OptimConfig:
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.999
    grad_clip: float = 10.0
    warmup_steps: int = 500  # linear warm-up, then `lr_schedule`
    # Cosine keeps a long run from drifting late: on the toy teacher a 4-step student trained 7,200 iterations at a
    # constant LR got sharper and worse after 3,600-4,800, and with cosine settled at 1.03-1.15x its teacher's toy
    # FID at three training seeds (benchmarks/toy/NOTES.md, point 60)
    lr_schedule: str = "constant"  # "constant" (DMD2's; makes resume-and-extend exact) or "cosine" (to 0 at `steps`)
    optimizer: str = "auto"  # "auto" (from the memory preset), "adamw" or "adamw8bit" (bitsandbytes, CUDA only)


@dataclass
class ValidationConfig:
    prompts: list[str] = field(default_factory=list)  # default: the first 4 training prompts
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    teacher_steps: int = 50
    teacher_cfg: float = 6.0


@dataclass
class DataConfig:
    skip_unreadable_images: bool = False  # `dmd2 train` refuses unreadable images unless true; `dmd2 prepare` always skips
    encode_batch_size: int = 32
    cache_dir: str | None = None  # encoded prompts/latents/teacher samples; default: <output_dir>/cache
    buckets: bool = True  # real images go to SDXL's aspect-ratio buckets (scaled to `resolution`); false: centre crop
    generate_batch_size: int = 8  # teacher samples per batch (and per resumable cache part) for gan.real_data=teacher


@dataclass
class TrainConfig:
    model: str = ""
    prompts: str = ""
    images: str | None = None
    output_dir: str = "outputs/dmd2"
    steps: int = 1000
    resolution: int = 1024
    batch_size: int = 1
    seed: int = 0
    critic: str = "lora"  # "lora" (second adapter on the one UNet) or "full" (trainable copy, like the reference)
    checkpoint_every: int = 500
    validate_every: int = 250
    keep_checkpoints: int = 2
    prediction_type: str | None = None  # override the loader's detection: "epsilon" or "v_prediction"
    zero_terminal_snr: bool | None = None
    mixed_precision: str = "auto"  # "auto" (bf16 on CUDA, fp32 on CPU), "no", "bf16", "fp16"
    memory: str = "auto"  # "auto" (by accelerator memory; CPU: 80gb), "12gb", "24gb", "80gb": see trainer/memory.py
    gradient_checkpointing: bool | None = None  # default: from the memory preset
    micro_batch_size: int | None = None  # default: from the memory preset (gradients accumulated over micro-batches)
    allow_pickle: bool = False
    student: StudentConfig = field(default_factory=StudentConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    dmd: DMDConfig = field(default_factory=DMDConfig)
    gan: GANConfig = field(default_factory=GANConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def validate(self) -> "TrainConfig":
        if not self.model:
            raise ConfigError("no teacher model: set `model` to a .safetensors file, a diffusers folder or a Hub id")
        if not self.prompts:
            raise ConfigError("no prompts: set `prompts` to a .txt (one prompt per line) or .jsonl file")
        if self.critic not in ("lora", "full"):
            raise ConfigError(f"critic must be 'lora' or 'full', got {self.critic!r}")
        if isinstance(self.student.timesteps, int):
            from trainer.sampling import DMD2_PRESETS

            if self.student.timesteps not in DMD2_PRESETS:
                raise ConfigError(f"student.timesteps preset must be one of {sorted(DMD2_PRESETS)}, got {self.student.timesteps}")
            self.student.timesteps = list(DMD2_PRESETS[self.student.timesteps])
        ts = self.student.timesteps
        if not ts or any(not 0 <= t < 1000 for t in ts) or list(ts) != sorted(ts, reverse=True) or len(set(ts)) != len(ts):
            raise ConfigError(f"student.timesteps must be distinct, decreasing and in [0, 999], got {ts}")
        if self.student.average_from is not None and not 0 <= self.student.average_from < self.steps:
            raise ConfigError(f"student.average_from must be an iteration in [0, steps={self.steps}) or null (off), got "
                              f"{self.student.average_from}")
        if self.gan.real_data not in ("auto", "images", "teacher", "none"):
            raise ConfigError(f"gan.real_data must be auto, images, teacher or none, got {self.gan.real_data!r}")
        if self.gan.real_data == "images" and not self.images:
            raise ConfigError("gan.real_data is 'images' but `images` is not set: point it at a folder of images")
        if not 0.0 < self.gan.max_t <= 1.0:
            raise ConfigError(f"gan.max_t must be in (0, 1], got {self.gan.max_t}")
        if self.dmd.uncond not in ("zeros", "empty_prompt"):
            raise ConfigError(f"dmd.uncond must be 'zeros' or 'empty_prompt', got {self.dmd.uncond!r}")
        if self.mixed_precision not in ("auto", "no", "bf16", "fp16"):
            raise ConfigError(f"mixed_precision must be auto, no, bf16 or fp16, got {self.mixed_precision!r}")
        for name in ("steps", "resolution", "batch_size", "checkpoint_every", "validate_every"):
            if getattr(self, name) < (0 if name.endswith("_every") else 1):
                raise ConfigError(f"{name} must be a positive number, got {getattr(self, name)}")
        if self.memory not in ("auto", "12gb", "24gb", "80gb"):
            raise ConfigError(f"memory must be auto, 12gb, 24gb or 80gb, got {self.memory!r}")
        if self.optim.optimizer not in ("auto", "adamw", "adamw8bit"):
            raise ConfigError(f"optim.optimizer must be auto, adamw or adamw8bit, got {self.optim.optimizer!r}")
        if self.optim.lr_schedule not in ("constant", "cosine"):
            raise ConfigError(f"optim.lr_schedule must be constant or cosine, got {self.optim.lr_schedule!r}")
        if self.student.batch_size is not None and self.student.batch_size < self.batch_size:
            raise ConfigError(f"student.batch_size ({self.student.batch_size}) must be at least batch_size ({self.batch_size}): "
                              "the critic trains on batch_size of the student's samples; or set it to null")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise ConfigError(f"micro_batch_size must be a positive number, got {self.micro_batch_size}")
        if self.dmd.critic_loss not in ("target", "x0_high_noise"):
            raise ConfigError(f"dmd.critic_loss must be target or x0_high_noise, got {self.dmd.critic_loss!r}")
        if self.dmd.critic_per_step and self.critic != "lora":
            raise ConfigError("dmd.critic_per_step needs LoRA critics: set critic: lora or dmd.critic_per_step: false")
        if self.dmd.noise_draws < 1:
            raise ConfigError(f"dmd.noise_draws must be a positive number, got {self.dmd.noise_draws}")
        if self.resolution % 8:
            raise ConfigError(f"resolution must be a multiple of 8, got {self.resolution}")
        return self

    @property
    def gan_real_data(self) -> str:
        """The GAN's real data after resolving ``auto``: real images when given, otherwise the GAN is off."""
        if self.gan.real_data == "auto":
            return "images" if self.images else "none"
        return self.gan.real_data


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def _build(cls, data: dict, where: str = ""):
    hints = get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown config key {where}{unknown[0]}: see `dmd2 train --print-config` for every option")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        value, hint = data[f.name], hints[f.name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}{f.name} must be a mapping of options, got {value!r}")
            value = _build(hint, value, f"{where}{f.name}.")
        kwargs[f.name] = _coerce(value, hint, f"{where}{f.name}")
    return cls(**kwargs)


def _coerce(value, hint, key):
    """Light type checking with YAML's natural conversions (an int where a float is expected is fine)."""
    if dataclasses.is_dataclass(hint) or value is None:
        return value
    text = str(hint)
    if text.startswith("list") and not isinstance(value, list) and not (text.endswith("| int") and isinstance(value, int)):
        raise ConfigError(f"{key} must be a list, got {value!r}")
    if hint in (int, float) or text in ("int | None", "float | None"):
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (hint is int or text == "int | None") and value != int(value):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value) if "float" in text or hint is float else int(value)
    if hint is str and isinstance(value, bool):  # YAML 1.1 reads the word `no` (mixed_precision: no) as false
        return "no" if value is False else "yes"
    if hint is bool or text == "bool | None":
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
    return value


def apply_override(data: dict, assignment: str) -> None:
    """``a.b=value`` -> ``data["a"]["b"] = yaml(value)``."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set expects key=value, got {assignment!r}")
    *parents, leaf = key.strip().split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: {part} is not a section")
    node[leaf] = yaml.safe_load(raw) if raw.strip() else None


def load_config(path: str | Path | None = None, overrides: list[str] = (), base: dict | None = None) -> TrainConfig:
    data: dict[str, Any] = dict(base or {})
    if path:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist: pass --config run.yaml (see `dmd2 train --print-config`)")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML ({str(exc).splitlines()[0]}): fix the syntax") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must be a mapping of options")
        # Relative data paths in a config file are relative to that file, as users expect.
        for key in ("prompts", "images"):
            if isinstance(loaded.get(key), str) and not Path(loaded[key]).is_absolute() and (path.parent / loaded[key]).exists():
                loaded[key] = str(path.parent / loaded[key])
        _deep_update(data, loaded)
    for assignment in overrides:
        apply_override(data, assignment)
    return _build(TrainConfig, data)


def _deep_update(target: dict, source: dict) -> None:
    for k, v in source.items():
        if isinstance(v, dict) and isinstance(target.get(k), dict):
            _deep_update(target[k], v)
        else:
            target[k] = v


def dump_yaml(cfg: TrainConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None)
