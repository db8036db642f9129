"""SDXL-family architectures: read them off tensor shapes, and turn them into diffusers / transformers configs.

A single-file checkpoint carries no config, only weights, so everything that changes a weight's shape (channels per
level, resnets per level, transformer depth per block, context and adm widths, CLIP widths and depths, VAE levels)
is read from the shapes here; what shapes cannot tell (activation functions, norm groups, the VAE scaling factor,
head counts) comes from the shipped SDXL configs in ``trainer/configs/sdxl``. Head counts follow one rule,
``head_dim = min(64, channels)``, which reproduces SDXL exactly (5/10/20 UNet heads, 12 and 20 CLIP heads) and gives
tiny models one head. The tiny-model generator builds its configs through the same functions, so a folder and a
single file of the same model always get the same config.
"""
from __future__ import annotations

import copy
import functools
import json
from dataclasses import dataclass
from importlib import resources
from typing import Mapping

from trainer.errors import UnsupportedModelError

Shapes = Mapping[str, tuple]

UNET_PREFIX = "model.diffusion_model."
CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
CLIP_G_PREFIX = "conditioner.embedders.1.model."
VAE_PREFIX = "first_stage_model."
SDXL_ADDITION_TIME_EMBED_DIM = 256  # used when the pooled width is unknown (no CLIP-G in the file)
NUM_TIME_IDS = 6  # original size (2), crop top-left (2), target size (2)


@functools.lru_cache(maxsize=None)
def _shipped(name: str) -> dict:
    text = resources.files("trainer.configs.sdxl").joinpath(f"{name}.json").read_text(encoding="utf-8")
    return json.loads(text)


def shipped_config(name: str) -> dict:
    """A fresh copy of one shipped SDXL base config: unet, text_encoder, text_encoder_2, vae, scheduler, model_index."""
    return copy.deepcopy(_shipped(name))


def attention_heads(channels: int) -> int:
    """Head counts are not stored in weights; SDXL uses 64-wide heads, narrower layers get one head."""
    return channels // min(64, channels)


def _children(shapes: Shapes, prefix: str) -> list[int]:
    """The numeric child indices directly under ``prefix`` (e.g. the block numbers of ``input_blocks.``)."""
    found = set()
    for key in shapes:
        if key.startswith(prefix):
            head = key[len(prefix):].split(".", 1)[0]
            if head.isdigit():
                found.add(int(head))
    return sorted(found)


def _has_prefix(shapes: Shapes, prefix: str) -> bool:
    return any(k.startswith(prefix) for k in shapes)


# ----------------------------------------------------------------------------------------------------------- UNet
@dataclass(frozen=True)
class UNetArch:
    in_channels: int
    out_channels: int
    block_out_channels: tuple[int, ...]
    layers_per_block: tuple[int, ...]  # resnets per down level
    down_depths: tuple[tuple[int, ...], ...]  # transformer depth after each down resnet (0 = no attention)
    up_depths: tuple[tuple[int, ...], ...]  # per up level, deepest first; layers_per_block + 1 entries each
    mid_depth: int | None  # None: no mid block; 0: one resnet, no attention; >0: resnet-attention-resnet
    cross_attention_dim: int
    adm_in_channels: int
    addition_time_embed_dim: int
    time_embed_dim: int
    use_linear_projection: bool = True

    @property
    def depth_pattern(self) -> list[int]:
        """ComfyUI's ``transformer_depth`` list (one entry per down resnet), used to name known variants."""
        return [d for level in self.down_depths for d in level]


def _transformer_depth(shapes: Shapes, prefix: str) -> int:
    return len(_children(shapes, prefix + "transformer_blocks."))


def unet_arch_from_sgm(shapes: Shapes, prefix: str = UNET_PREFIX, pooled_dim: int | None = None) -> UNetArch:
    """Infer the UNet from an sgm (``input_blocks/middle_block/output_blocks``) state dict's shapes."""
    conv_in = shapes[prefix + "input_blocks.0.0.weight"]
    levels: list[list[tuple[int, int]]] = [[]]  # per down level: (channels, transformer depth) per resnet
    linear: set[bool] = set()
    context: set[int] = set()

    def note_attention(block: str) -> int:
        depth = _transformer_depth(shapes, block)
        if depth:
            linear.add(len(shapes[block + "proj_in.weight"]) == 2)
            context.add(shapes[block + "transformer_blocks.0.attn2.to_k.weight"][1])
        return depth

    for n in _children(shapes, prefix + "input_blocks."):
        if n == 0:
            continue
        block = f"{prefix}input_blocks.{n}."
        if block + "0.op.weight" in shapes:  # a downsampler closes the level
            levels.append([])
            continue
        channels = shapes[block + "0.out_layers.3.weight"][0]
        levels[-1].append((channels, note_attention(block + "1.")))

    up_levels: list[list[int]] = [[]]
    out_blocks = _children(shapes, prefix + "output_blocks.")
    for n in out_blocks:
        block = f"{prefix}output_blocks.{n}."
        up_levels[-1].append(note_attention(block + "1."))
        if block + "1.conv.weight" in shapes or block + "2.conv.weight" in shapes:  # upsampler closes the level
            up_levels.append([])

    mid_depth: int | None = None
    if _has_prefix(shapes, prefix + "middle_block.0."):
        mid_depth = note_attention(prefix + "middle_block.1.") if _has_prefix(shapes, prefix + "middle_block.1.") else 0
        if mid_depth == 0 and _has_prefix(shapes, prefix + "middle_block.1."):
            raise UnsupportedModelError("the UNet's middle block has two resnets and no attention, which diffusers cannot build")

    block_out = []
    for i, level in enumerate(levels):
        widths = {c for c, _ in level}
        if len(widths) != 1:
            raise UnsupportedModelError(f"UNet down level {i} has resnets of different widths {sorted(widths)}; not an SDXL-family UNet")
        block_out.append(widths.pop())
    if len(linear) > 1 or len(context) > 1:
        raise UnsupportedModelError("the UNet mixes attention layouts (conv and linear proj_in or several context widths); not SDXL-family")
    if not context:
        raise UnsupportedModelError("the UNet has no cross-attention layers; not an SDXL-family text-to-image UNet")

    adm_in = shapes[prefix + "label_emb.0.0.weight"][1]
    if pooled_dim is not None and (adm_in - pooled_dim) > 0 and (adm_in - pooled_dim) % NUM_TIME_IDS == 0:
        time_dim = (adm_in - pooled_dim) // NUM_TIME_IDS
    else:
        time_dim = SDXL_ADDITION_TIME_EMBED_DIM
    return UNetArch(
        in_channels=conv_in[1],
        out_channels=shapes[prefix + "out.2.weight"][0],
        block_out_channels=tuple(block_out),
        layers_per_block=tuple(len(level) for level in levels),
        down_depths=tuple(tuple(d for _, d in level) for level in levels),
        up_depths=tuple(tuple(level) for level in up_levels),
        mid_depth=mid_depth,
        cross_attention_dim=context.pop(),
        adm_in_channels=adm_in,
        addition_time_embed_dim=time_dim,
        time_embed_dim=shapes[prefix + "time_embed.0.weight"][0],
        use_linear_projection=linear.pop(),
    )


def _uniform_or_list(depths: tuple[int, ...]) -> int | list[int]:
    return depths[0] if len(set(depths)) == 1 else list(depths)


def unet_config(arch: UNetArch, sample_size: int = 128) -> dict:
    """A diffusers ``UNet2DConditionModel`` config for ``arch`` (SDXL base's own config for SDXL base's arch)."""
    levels = len(arch.block_out_channels)
    if len(arch.up_depths) != levels or any(len(u) != arch.layers_per_block[levels - 1 - i] + 1 for i, u in enumerate(arch.up_depths)):
        raise UnsupportedModelError(
            f"the UNet's up blocks {[len(u) for u in arch.up_depths]} do not mirror its down blocks {list(arch.layers_per_block)} (+1 each); diffusers cannot build it"
        )
    for name, per_level in (("down", arch.down_depths), ("up", arch.up_depths)):
        for i, depths in enumerate(per_level):
            if 0 in depths and any(depths):
                raise UnsupportedModelError(f"UNet {name} level {i} has attention on only some resnets ({list(depths)}); diffusers cannot build it")

    # Levels without attention get depth 1 (ignored by DownBlock2D), which reproduces SDXL's [1, 2, 10].
    down = [_uniform_or_list(d) if any(d) else 1 for d in arch.down_depths]
    if arch.mid_depth:  # diffusers takes the mid block's depth from the last down level's (first) entry
        last = arch.down_depths[-1]
        if not any(last):
            down[-1] = arch.mid_depth
        elif last[0] != arch.mid_depth:
            raise UnsupportedModelError(
                f"the UNet's middle block depth {arch.mid_depth} differs from its last level's depth {last[0]}; diffusers cannot build it"
            )
    up_default = list(reversed(down))
    up = [_uniform_or_list(u) if any(u) else 1 for u in arch.up_depths]
    needs_reverse = any(isinstance(d, list) for d in down) or any(
        any(u) and up[i] != up_default[i] for i, u in enumerate(arch.up_depths)
    )

    cfg = shipped_config("unet")
    cfg.update(
        in_channels=arch.in_channels,
        out_channels=arch.out_channels,
        block_out_channels=list(arch.block_out_channels),
        layers_per_block=arch.layers_per_block[0] if len(set(arch.layers_per_block)) == 1 else list(arch.layers_per_block),
        down_block_types=["CrossAttnDownBlock2D" if any(d) else "DownBlock2D" for d in arch.down_depths],
        up_block_types=["CrossAttnUpBlock2D" if any(u) else "UpBlock2D" for u in arch.up_depths],
        mid_block_type=None if arch.mid_depth is None else ("UNetMidBlock2DCrossAttn" if arch.mid_depth else "UNetMidBlock2D"),
        transformer_layers_per_block=down,
        attention_head_dim=[attention_heads(c) for c in arch.block_out_channels],  # diffusers reads this as heads
        cross_attention_dim=arch.cross_attention_dim,
        projection_class_embeddings_input_dim=arch.adm_in_channels,
        addition_time_embed_dim=arch.addition_time_embed_dim,
        use_linear_projection=arch.use_linear_projection,
        sample_size=sample_size,
    )
    if needs_reverse:
        cfg["reverse_transformer_layers_per_block"] = [list(u) if any(u) else [1] * len(u) for u in arch.up_depths]
    if arch.time_embed_dim != 4 * arch.block_out_channels[0]:
        cfg["time_embedding_dim"] = arch.time_embed_dim
    return cfg


# ----------------------------------------------------------------------------------------------------------- CLIP
@dataclass(frozen=True)
class CLIPArch:
    width: int
    layers: int
    intermediate: int
    positions: int = 77
    vocab: int = 49408
    projection_dim: int | None = None  # CLIP-G's text projection; None for CLIP-L


def clip_l_arch_from_sgm(shapes: Shapes, prefix: str = CLIP_L_PREFIX) -> CLIPArch:
    p = prefix + "text_model."
    vocab, width = shapes[p + "embeddings.token_embedding.weight"]
    return CLIPArch(
        width=width,
        layers=len(_children(shapes, p + "encoder.layers.")),
        intermediate=shapes[p + "encoder.layers.0.mlp.fc1.weight"][0],
        positions=shapes[p + "embeddings.position_embedding.weight"][0],
        vocab=vocab,
    )


def clip_g_arch_from_sgm(shapes: Shapes, prefix: str = CLIP_G_PREFIX) -> CLIPArch:
    vocab, width = shapes[prefix + "token_embedding.weight"]
    return CLIPArch(
        width=width,
        layers=len(_children(shapes, prefix + "transformer.resblocks.")),
        intermediate=shapes[prefix + "transformer.resblocks.0.mlp.c_fc.weight"][0],
        positions=shapes[prefix + "positional_embedding"][0],
        vocab=vocab,
        projection_dim=shapes[prefix + "text_projection"][1],  # open_clip stores it as [width, projection]
    )


def clip_config(arch: CLIPArch, which: str) -> dict:
    """A transformers ``CLIPTextConfig`` dict; ``which`` is ``text_encoder`` (CLIP-L) or ``text_encoder_2`` (CLIP-G)."""
    cfg = shipped_config(which)
    cfg.update(
        hidden_size=arch.width,
        num_hidden_layers=arch.layers,
        intermediate_size=arch.intermediate,
        max_position_embeddings=arch.positions,
        vocab_size=arch.vocab,
        num_attention_heads=attention_heads(arch.width),
        projection_dim=arch.projection_dim or arch.width,
    )
    return cfg


# ------------------------------------------------------------------------------------------------------------ VAE
@dataclass(frozen=True)
class VAEArch:
    block_out_channels: tuple[int, ...]
    layers_per_block: int = 2
    latent_channels: int = 4
    in_channels: int = 3
    out_channels: int = 3


def vae_arch_from_sgm(shapes: Shapes, prefix: str = VAE_PREFIX) -> VAEArch:
    enc = prefix + "encoder."
    levels = _children(shapes, enc + "down.")
    channels = tuple(shapes[f"{enc}down.{i}.block.0.conv2.weight"][0] for i in levels)
    dec_levels = _children(shapes, prefix + "decoder.up.")
    if len(dec_levels) != len(levels):
        raise UnsupportedModelError(f"the VAE has {len(levels)} encoder levels but {len(dec_levels)} decoder levels; not an SDXL-family VAE")
    return VAEArch(
        block_out_channels=channels,
        layers_per_block=len(_children(shapes, enc + "down.0.block.")),
        latent_channels=shapes[enc + "conv_out.weight"][0] // 2,  # mean and log-variance
        in_channels=shapes[enc + "conv_in.weight"][1],
        out_channels=shapes[prefix + "decoder.conv_out.weight"][0],
    )


def vae_config(arch: VAEArch) -> dict:
    cfg = shipped_config("vae")
    n = len(arch.block_out_channels)
    cfg.update(
        block_out_channels=list(arch.block_out_channels),
        down_block_types=["DownEncoderBlock2D"] * n,
        up_block_types=["UpDecoderBlock2D"] * n,
        layers_per_block=arch.layers_per_block,
        latent_channels=arch.latent_channels,
        in_channels=arch.in_channels,
        out_channels=arch.out_channels,
    )
    return cfg


# ------------------------------------------------------------------------------------------------ known variants
# ComfyUI's SDXL-family depth patterns (transformer depth per down resnet).
KNOWN_VARIANTS = {
    (0, 0, 2, 2, 10, 10): "SDXL",
    (0, 0, 2, 2, 4, 4): "SSD-1B",
    (0, 0, 1, 1, 2, 2): "Segmind Vega",
    (0, 2, 5): "KOALA",
    (0, 2, 6): "KOALA",
}


def variant_name(arch: UNetArch) -> str:
    if arch.block_out_channels[0] == 320 and arch.cross_attention_dim == 2048:
        name = KNOWN_VARIANTS.get(tuple(arch.depth_pattern))
        if name:
            return name
    return "SDXL-architecture (custom)"
