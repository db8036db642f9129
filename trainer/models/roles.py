"""Teacher, student and critic over ONE frozen UNet.

The student and the critic ("fake score") are two LoRA adapters on the teacher's UNet; the teacher ("real score")
is the same UNet with adapters off. Only one copy of the base weights is in memory, which is what makes SDXL
distillation fit one GPU. ``critic: full`` instead trains a full copy of the UNet as the critic, as DMD2's reference
does (for comparison; it costs a second UNet plus its optimiser state).
"""
from __future__ import annotations

import contextlib
import copy
import warnings
from dataclasses import dataclass

import torch
from peft import LoraConfig
from torch import Tensor, nn

STUDENT, CRITIC = "student", "critic"

# DMD2's LoRA targets: attention, projections, feed-forward, resnet convs, up/down samplers, time embedding.
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2",
                "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")


def critic_adapter_names(count: int) -> list[str]:
    """The critic LoRA adapters' names: "critic" alone, or one per student step ("critic", "critic_1", ...)."""
    return [CRITIC] + [f"{CRITIC}_{i}" for i in range(1, count)]


@dataclass
class Conditioning:
    """SDXL conditioning for a batch: prompt embeds [B,77,D], pooled embeds [B,P], micro-conditioning time ids [B,6]."""

    prompt_embeds: Tensor
    pooled: Tensor
    time_ids: Tensor

    def to(self, device=None, dtype=None) -> "Conditioning":
        return Conditioning(*(v.to(device=device, dtype=dtype) for v in (self.prompt_embeds, self.pooled, self.time_ids)))

    def __len__(self) -> int:
        return self.prompt_embeds.shape[0]

    def index(self, idx) -> "Conditioning":
        return Conditioning(self.prompt_embeds[idx], self.pooled[idx], self.time_ids[idx])

    @staticmethod
    def cat(parts: list["Conditioning"]) -> "Conditioning":
        return Conditioning(*(torch.cat(v) for v in zip(*((p.prompt_embeds, p.pooled, p.time_ids) for p in parts))))

    def zeros_like(self) -> "Conditioning":
        """DMD2's unconditional input for CFG: all-zero prompt and pooled embeddings, same time ids."""
        return Conditioning(torch.zeros_like(self.prompt_embeds), torch.zeros_like(self.pooled), self.time_ids)


def unet_forward(unet, x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
    added = {"text_embeds": cond.pooled, "time_ids": cond.time_ids}
    return unet(x, t, encoder_hidden_states=cond.prompt_embeds, added_cond_kwargs=added, return_dict=False)[0]


def unet_mid_features(unet, x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
    """The UNet's forward up to and including the mid block (the GAN head's input); the decoder half is skipped."""
    added = {"text_embeds": cond.pooled, "time_ids": cond.time_ids}
    emb = unet.time_embedding(unet.get_time_embed(sample=x, timestep=t), None)
    aug = unet.get_aug_embed(emb=emb, encoder_hidden_states=cond.prompt_embeds, added_cond_kwargs=added)
    emb = emb + aug if aug is not None else emb
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    h = unet.conv_in(x)
    for block in unet.down_blocks:
        if getattr(block, "has_cross_attention", False):
            h, _ = block(hidden_states=h, temb=emb, encoder_hidden_states=cond.prompt_embeds)
        else:
            h, _ = block(hidden_states=h, temb=emb)
    if getattr(unet.mid_block, "has_cross_attention", False):
        return unet.mid_block(h, emb, encoder_hidden_states=cond.prompt_embeds)
    return unet.mid_block(h, emb)


def lora_config(rank: int, alpha: float, targets=LORA_TARGETS) -> LoraConfig:
    # Gaussian A, zero B: every adapter starts as the identity, so student and critic both start as the teacher.
    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(targets), init_lora_weights="gaussian")


class DMD2Roles(nn.Module):
    """Holds the UNet (with adapters), the optional full critic copy and the GAN head; switches between roles."""

    def __init__(self, unet, *, rank: int, alpha: float, critic: str = "lora", critic_rank: int | None = None,
                 critic_alpha: float | None = None, critics: int = 1, targets=LORA_TARGETS):
        super().__init__()
        unet.requires_grad_(False)
        self.full_critic = None
        if critic == "full":
            if critics != 1:
                raise ValueError("one critic per student step needs LoRA critics (critic: lora)")
            self.full_critic = copy.deepcopy(unet).float().requires_grad_(True)
        elif critic != "lora":
            raise ValueError(f"critic must be 'lora' or 'full', got {critic!r}")
        # Critic i models the outputs of the student's step i (``critics`` > 1), or one critic models them all.
        self.critic_names = [] if self.full_critic is not None else critic_adapter_names(critics)
        with warnings.catch_warnings():  # peft warns that a second adapter is being added: that is the design
            warnings.filterwarnings("ignore", message=".*multiple adapters.*")
            unet.add_adapter(lora_config(rank, alpha, targets), adapter_name=STUDENT)
            for name in self.critic_names:
                unet.add_adapter(lora_config(critic_rank or rank, critic_alpha or alpha, targets), adapter_name=name)
        self.unet = unet
        from peft.tuners.tuners_utils import BaseTunerLayer

        self._lora_layers = [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]
        self._student_params = self.adapter_parameters(STUDENT)
        self._critic_params = [p for name in self.critic_names for p in self.adapter_parameters(name)]
        for p in self._student_params + self._critic_params:
            p.requires_grad_(True)
        self._adapter_state = None
        self._activate(STUDENT)

    # -- parameters -------------------------------------------------------------------------------------------
    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        return [p for n, p in self.unet.named_parameters() if f".{name}." in n and "lora_" in n]

    def student_parameters(self) -> list[nn.Parameter]:
        return list(self._student_params)

    def critic_parameters(self) -> list[nn.Parameter]:
        return list(self.full_critic.parameters()) if self.full_critic is not None else list(self._critic_params)

    def critic_state(self) -> dict[str, Tensor]:
        """The critic's trained weights by name: the full copy's state dict, or every critic adapter's LoRA tensors."""
        if self.full_critic is not None:
            return self.full_critic.state_dict()
        return {n: p for n, p in self.unet.named_parameters() if any(f".{name}." in n for name in self.critic_names)}

    def _set_adapter_state(self, active: str, disabled: bool) -> None:
        """Switch every LoRA layer to ``active`` (or off). Done on the layers directly rather than with diffusers'
        set_adapter/disable_adapters, which walk the whole model and flip requires_grad (both adapters train here,
        each with its own optimiser): switching happens several times per iteration."""
        if self._adapter_state == (active, disabled):
            return
        for layer in self._lora_layers:
            layer._active_adapter = active
            layer._disable_adapters = disabled
        self._adapter_state = (active, disabled)

    def _critic_name(self, which: int) -> str:
        """The adapter that judges student step ``which``'s samples: its own critic, or the only one."""
        return self.critic_names[which if len(self.critic_names) > 1 else 0]

    def _activate(self, name: str):
        self._set_adapter_state(name, False)

    # -- roles ------------------------------------------------------------------------------------------------
    def student(self, x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        self._activate(STUDENT)
        return unet_forward(self.unet, x, t, cond)

    def critic(self, x: Tensor, t: Tensor, cond: Conditioning, which: int = 0) -> Tensor:
        """The fake score of the samples made by student step ``which`` (one critic for all steps unless one per step)."""
        if self.full_critic is not None:
            return unet_forward(self.full_critic, x, t, cond)
        self._activate(self._critic_name(which))
        return unet_forward(self.unet, x, t, cond)

    def critic_features(self, x: Tensor, t: Tensor, cond: Conditioning, which: int = 0) -> Tensor:
        if self.full_critic is not None:
            return unet_mid_features(self.full_critic, x, t, cond)
        self._activate(self._critic_name(which))
        return unet_mid_features(self.unet, x, t, cond)

    @torch.no_grad()
    def teacher(self, x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        with self.adapters_off():
            return unet_forward(self.unet, x, t, cond)

    @contextlib.contextmanager
    def adapters_off(self):
        previous = self._adapter_state
        self._set_adapter_state(previous[0], True)
        try:
            yield
        finally:
            self._set_adapter_state(*previous)
