"""DMD2's GAN classifier head, which reads the critic UNet's mid-block features.

As in DMD2 (1280 channels at 32x32 for SDXL at 1024^2): three Conv4x4/s2 + GroupNorm + SiLU, one Conv4x4/s4 + GroupNorm
+ SiLU, then a 1x1 conv to one logit per location, averaged. Sized from the UNet's config so tiny models work: each
stride-2 stage is kept only while the feature map is still large enough, and the s4 stage becomes a 4x4 conv with
no stride when the map is already small.
"""
from __future__ import annotations

import torch
from torch import nn


MIN_GROUP_VALUES = 32


def norm_groups(channels: int, out_size: int) -> int:
    """GroupNorm groups for a ``channels`` x ``out_size``^2 map: DMD2's 32 where each group still normalises at least
    32 values (SDXL's 1x1 last stage: 40 channels per group), fewer on a small model's small map. A group of 2 values
    normalises every pair to +-1 and erases what the head should see (measured: a 64-channel toy head stayed at
    chance, loss 1.386, on features a 2-group head separated to 0.6)."""
    return max(g for g in (32, 16, 8, 4, 2, 1) if channels % g == 0 and (g == 1 or channels // g * out_size ** 2 >= MIN_GROUP_VALUES))


def _stage(channels: int, stride: int, out_size: int) -> nn.Sequential:
    conv = nn.Conv2d(channels, channels, 4, stride, 1 if stride == 2 else 0)
    return nn.Sequential(conv, nn.GroupNorm(norm_groups(channels, out_size), channels), nn.SiLU())


class GANHead(nn.Module):
    """Sized for the square training resolution's mid-block map (``feature_size``); maps of non-square aspect-ratio
    buckets with a shorter side are padded (edge replication) up to it, so every stage has room. Square inputs are
    untouched."""

    def __init__(self, channels: int, feature_size: int):
        super().__init__()
        self.min_size = feature_size
        stages, size = [], feature_size
        for _ in range(3):  # Conv4x4 stride 2, padding 1: size -> size / 2
            if size < 8:
                break
            size //= 2
            stages.append(_stage(channels, 2, size))
        if size >= 4:
            stages.append(_stage(channels, 4, (size - 4) // 4 + 1))  # Conv4x4 stride 4, no padding
        self.body = nn.Sequential(*stages)
        self.to_logit = nn.Conv2d(channels, 1, 1)

    @classmethod
    def for_unet(cls, unet, latent_size: int) -> "GANHead":
        """Head for a diffusers UNet2DConditionModel whose input latents are ``latent_size`` wide."""
        channels = unet.config.block_out_channels[-1]
        feature_size = latent_size // 2 ** (len(unet.config.block_out_channels) - 1)
        return cls(channels, feature_size)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] mid-block features -> [B] logits."""
        h, w = features.shape[-2:]
        ph, pw = max(0, self.min_size - h), max(0, self.min_size - w)
        if ph or pw:
            features = nn.functional.pad(features, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), mode="replicate")
        return self.to_logit(self.body(features)).mean(dim=(1, 2, 3))
