"""Memory presets: one config key (``memory: auto | 12gb | 24gb | 80gb``) that chooses how training trades speed for
accelerator memory, plus the pieces that apply it (gradient checkpointing that is safe with adapter switching, the
optimiser factory with optional 8-bit states).

What lives on the accelerator during training is always only the frozen UNet (in bf16/fp16), the two fp32 LoRA
adapters with their gradients and optimiser states, the GAN head and the activations: text encoders and the VAE
stay on the CPU (prompts and images are encoded once by ``dmd2 prepare`` into an on-disk cache), and the VAE visits
the accelerator only to decode validation images.

For SDXL at 1024x1024, batch 1, LoRA rank 64 on DMD2's targets (about 197 M parameters per adapter) and DMD2's GAN
head (about 105 M parameters), the fixed part is roughly: base 4.8 GiB, adapters 1.5 GiB, AdamW states 2.9 GiB
(0.7 GiB in 8 bit), head with its state 1.2 GiB (0.6 GiB in 8 bit), gradients of the adapter being updated 0.7 GiB.
Activations without checkpointing are the largest part (tens of GiB); with checkpointing about 1 GiB per sample.
Measured on an H200 (benchmarks/train_cycle.py, one DMD2 cycle): peak 10.4 GiB for ``12gb`` (8-bit states),
13.2 GiB for ``24gb`` and 28.6 GiB for ``80gb``. The ``12gb`` preset with bf16 states (no bitsandbytes) was not
measured; the estimate above puts it about 1 GiB higher.

| preset | gradient checkpointing | optimiser states | micro-batch | meant for |
| ------ | ---------------------- | ---------------- | ----------- | --------- |
| 12gb   | on                     | 8-bit (bitsandbytes AdamW8bit; without it on CUDA: bf16 states; on CPU: fp32) | 1 | 12-16 GB cards |
| 24gb   | on                     | fp32 AdamW       | 4           | 24-40 GB cards |
| 80gb   | off                    | fp32 AdamW       | 2           | 48-80+ GB cards (fastest) |
| auto   | the preset for the accelerator's memory (<20 GiB: 12gb, <48 GiB: 24gb, else 80gb); on a CPU: 80gb, batch unsplit |

``micro-batch`` splits ``batch_size`` into chunks whose gradients are accumulated before each optimiser step (less
activation memory; each chunk draws its own noise, timesteps and backward-simulation step, so the update equals the
full batch's in expectation, not bit for bit). Small models should not be split: every chunk pays the per-layer
overhead again (the toy demo at batch 16 ran 3x faster unsplit on a CPU). Individual settings can be overridden in
the config: ``gradient_checkpointing: true|false``, ``micro_batch_size: N``, ``optim.optimizer: adamw|adamw8bit``.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from trainer.errors import ConfigError

GIB = 2**30


@dataclass(frozen=True)
class MemoryPreset:
    name: str
    gradient_checkpointing: bool
    optimizer: str  # "adamw" or "adamw8bit"
    micro_batch_size: int
    decode_batch_size: int  # validation images decoded per VAE call


PRESETS = {
    "12gb": MemoryPreset("12gb", gradient_checkpointing=True, optimizer="adamw8bit", micro_batch_size=1, decode_batch_size=1),
    "24gb": MemoryPreset("24gb", gradient_checkpointing=True, optimizer="adamw", micro_batch_size=4, decode_batch_size=2),
    "80gb": MemoryPreset("80gb", gradient_checkpointing=False, optimizer="adamw", micro_batch_size=2, decode_batch_size=8),
}
CHOICES = ("auto", *PRESETS)


@dataclass(frozen=True)
class MemoryPlan:
    """A preset after ``auto`` and the config's overrides are resolved: what the trainer actually does."""

    preset: str
    gradient_checkpointing: bool
    optimizer: str
    micro_batch_size: int
    decode_batch_size: int

    def describe(self) -> str:
        return (f"memory preset {self.preset}: gradient checkpointing {'on' if self.gradient_checkpointing else 'off'}, "
                f"optimizer {self.optimizer}, micro-batch {self.micro_batch_size}")


def auto_preset(device) -> str:
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return "80gb"
    total = torch.cuda.get_device_properties(device).total_memory / GIB
    return "12gb" if total < 20 else "24gb" if total < 48 else "80gb"


def resolve(memory: str, device, *, batch_size: int, gradient_checkpointing: bool | None = None,
            micro_batch_size: int | None = None, optimizer: str = "auto") -> MemoryPlan:
    if memory not in CHOICES:
        raise ConfigError(f"memory must be one of {', '.join(CHOICES)}, got {memory!r}")
    preset = PRESETS[auto_preset(device) if memory == "auto" else memory]
    # The presets' micro-batches ration accelerator memory; a CPU run under `auto` has none to ration, and each chunk
    # would pay the per-layer overhead again.
    unsplit = memory == "auto" and torch.device(device).type != "cuda"
    micro = micro_batch_size or (batch_size if unsplit else preset.micro_batch_size)
    return MemoryPlan(preset=preset.name,
                      gradient_checkpointing=preset.gradient_checkpointing if gradient_checkpointing is None else gradient_checkpointing,
                      optimizer=preset.optimizer if optimizer == "auto" else optimizer,
                      micro_batch_size=max(1, min(micro, batch_size)), decode_batch_size=preset.decode_batch_size)


# -- gradient checkpointing that survives adapter switching -------------------------------------------------------
def _lora_layers(module) -> list:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in module.modules() if isinstance(m, BaseTunerLayer)]


def _adapter_checkpoint(module, *args):
    """Checkpoint one block, recomputing it in backward with the adapter state it had in forward.

    The student and the critic are adapters on one UNet, switched per call. Plain checkpointing recomputes a block
    during backward with whatever adapter is active *then* (e.g. the critic, when the student's graph is
    differentiated after the GAN term ran the critic): silently wrong gradients. This records which adapter was
    active (and whether adapters were off) and restores exactly that state around the recomputation."""
    layers = _lora_layers(module) if torch.is_grad_enabled() else []
    if not layers:
        return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False)
    active, disabled = layers[0]._active_adapter, layers[0]._disable_adapters

    def run(*inner):
        saved = [(layer._active_adapter, layer._disable_adapters) for layer in layers]
        for layer in layers:
            layer._active_adapter, layer._disable_adapters = active, disabled
        try:
            return module(*inner)
        finally:
            for layer, (a, d) in zip(layers, saved):
                layer._active_adapter, layer._disable_adapters = a, d

    return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False)


def enable_gradient_checkpointing(unet) -> None:
    """diffusers' block-level checkpointing with the adapter-aware recomputation above."""
    unet.enable_gradient_checkpointing(gradient_checkpointing_func=_adapter_checkpoint)


# -- optimisers ---------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _bnb_adamw8bit():
    try:
        import bitsandbytes as bnb  # noqa: PLC0415

        return bnb.optim.AdamW8bit
    except Exception:  # not installed, or installed without a usable CUDA binary
        return None


class AdamWBF16States(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias correction) with fp32 master weights and both moment estimates stored in
    bfloat16: half the optimiser memory of torch's AdamW. The 12gb preset's fallback on CUDA when bitsandbytes is not
    installed (8-bit states save more). The update itself is computed in fp32, one tensor at a time."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.01):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.bfloat16)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.bfloat16)
                state["step"] += 1
                t = float(state["step"])
                g = p.grad.float()
                m = state["exp_avg"].float().lerp_(g, 1 - b1)
                v = state["exp_avg_sq"].float().mul_(b2).addcmul_(g, g, value=1 - b2)
                state["exp_avg"].copy_(m)
                state["exp_avg_sq"].copy_(v)
                p.mul_(1 - lr * wd)
                denom = (v / (1 - b2**t)).sqrt_().add_(eps)
                p.addcdiv_(m, denom, value=-lr / (1 - b1**t))
        return loss


_noted: set[str] = set()


def _note(message: str, quiet: bool) -> None:
    if not quiet and message not in _noted:
        _noted.add(message)
        print(f"info: {message}")


def make_optimizer(params, *, kind: str, lr: float, betas, weight_decay: float, device, quiet: bool = False) -> torch.optim.Optimizer:
    """AdamW as DMD2 uses it. ``adamw8bit``: bitsandbytes' AdamW8bit when importable and on CUDA, otherwise torch's
    AdamW with one info line. On CUDA torch's AdamW runs fused (one kernel per step, no per-tensor temporaries)."""
    device = torch.device(device)
    if kind not in ("adamw", "adamw8bit"):
        raise ConfigError(f"optim.optimizer must be auto, adamw or adamw8bit, got {kind!r}")
    if kind == "adamw8bit":
        cls = _bnb_adamw8bit() if device.type == "cuda" else None
        if cls is not None:
            return cls(params, lr=lr, betas=betas, weight_decay=weight_decay)
        if device.type == "cuda":
            _note("8-bit optimizer states unavailable (bitsandbytes is not installed: pip install 'comfy-dmd2[8bit]'): "
                  "using AdamW with bf16 states", quiet)
            return AdamWBF16States(params, lr=lr, betas=betas, weight_decay=weight_decay)
        _note("8-bit optimizer states unavailable (no CUDA device): using torch AdamW with fp32 states", quiet)
    extra = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, **extra)
