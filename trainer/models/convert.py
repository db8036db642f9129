"""Key conversion between diffusers/transformers state dicts and sgm single files (A1111, ComfyUI, civitai).

Each component gets ONE table of rows ``(diffusers key, sgm key, transform)``, built from the component's config and
its diffusers state-dict keys; both directions read the same table, so load and export cannot drift apart.

Transforms (how the sgm tensor relates to the diffusers one):
- ``id``: same tensor.
- ``conv1x1``: sgm stores a 1x1 conv ``[out, in, 1, 1]`` where diffusers has a linear ``[out, in]`` (VAE mid attention).
- ``T``: transposed (open_clip's ``text_projection`` is ``[width, proj]``, used as ``x @ P``).
- ``q``/``k``/``v``: one third of open_clip's fused ``in_proj_weight``/``in_proj_bias`` (rows q, then k, then v).
"""
from __future__ import annotations

from typing import Callable, Iterable, Mapping, NamedTuple

import torch
from torch import Tensor

from trainer.models.architecture import CLIP_G_PREFIX, CLIP_L_PREFIX, UNET_PREFIX, VAE_PREFIX


class Row(NamedTuple):
    diffusers: str
    sgm: str
    transform: str = "id"


_QKV = ("q", "k", "v")

# diffusers ResnetBlock2D -> sgm ResBlock parameter names (UNet only; the VAE keeps the diffusers names but one).
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _per_level(value, levels: int) -> list[int]:
    return list(value) if isinstance(value, (list, tuple)) else [value] * levels


def _rename_head(rest: str, renames: Mapping[str, str]) -> str:
    """Rename the module at the head of ``rest`` (``conv1.weight`` -> ``in_layers.2.weight``)."""
    for old, new in renames.items():
        if rest.startswith(old + "."):
            return new + rest[len(old):]
    return rest


def _map_by_prefix(keys: Iterable[str], prefixes: Mapping[str, tuple[str, Mapping[str, str]]], sgm_prefix: str,
                   transform: Callable[[str, str], str] = lambda d, s: "id") -> list[Row]:
    """Rows for ``keys`` through a module-prefix table; the longest matching diffusers prefix wins."""
    ordered = sorted(prefixes, key=len, reverse=True)
    rows = []
    for key in keys:
        for dp in ordered:
            if key.startswith(dp):
                sp, renames = prefixes[dp]
                sgm = sgm_prefix + sp + _rename_head(key[len(dp):], renames)
                rows.append(Row(key, sgm, transform(key, sgm)))
                break
        else:
            raise KeyError(f"no sgm name for diffusers key {key!r}")  # a bug in the table, not bad input
    return rows


def unet_table(config: Mapping, keys: Iterable[str], sgm_prefix: str = UNET_PREFIX) -> list[Row]:
    """UNet2DConditionModel <-> ``model.diffusion_model.*`` (input_blocks / middle_block / output_blocks)."""
    levels = len(config["block_out_channels"])
    per_level = _per_level(config["layers_per_block"], levels)
    up_attn = [t.startswith("CrossAttn") for t in config["up_block_types"]]
    same: dict = {}
    p: dict[str, tuple[str, Mapping[str, str]]] = {
        "conv_in.": ("input_blocks.0.0.", same),
        "time_embedding.linear_1.": ("time_embed.0.", same),
        "time_embedding.linear_2.": ("time_embed.2.", same),
        "add_embedding.linear_1.": ("label_emb.0.0.", same),
        "add_embedding.linear_2.": ("label_emb.0.2.", same),
        "conv_norm_out.": ("out.0.", same),
        "conv_out.": ("out.2.", same),
        "mid_block.resnets.0.": ("middle_block.0.", _UNET_RESNET),
        "mid_block.attentions.0.": ("middle_block.1.", same),
        "mid_block.resnets.1.": ("middle_block.2.", _UNET_RESNET),
    }
    n = 1  # sgm numbers every down resnet(+attention) and every downsampler consecutively after conv_in
    for i in range(levels):
        for j in range(per_level[i]):
            p[f"down_blocks.{i}.resnets.{j}."] = (f"input_blocks.{n}.0.", _UNET_RESNET)
            p[f"down_blocks.{i}.attentions.{j}."] = (f"input_blocks.{n}.1.", same)
            n += 1
        if i < levels - 1:
            p[f"down_blocks.{i}.downsamplers.0.conv."] = (f"input_blocks.{n}.0.op.", same)
            n += 1
    n = 0
    for u, layers in enumerate(reversed(per_level)):
        for j in range(layers + 1):
            p[f"up_blocks.{u}.resnets.{j}."] = (f"output_blocks.{n}.0.", _UNET_RESNET)
            p[f"up_blocks.{u}.attentions.{j}."] = (f"output_blocks.{n}.1.", same)
            if j == layers and u < levels - 1:  # the upsampler sits after the attention when there is one
                p[f"up_blocks.{u}.upsamplers.0.conv."] = (f"output_blocks.{n}.{2 if up_attn[u] else 1}.conv.", same)
            n += 1
    return _map_by_prefix(keys, p, sgm_prefix)


def vae_table(config: Mapping, keys: Iterable[str], sgm_prefix: str = VAE_PREFIX) -> list[Row]:
    """AutoencoderKL <-> ``first_stage_model.*``; decoder levels are numbered from the bottom (``up.{n-1-i}``)."""
    levels = len(config["block_out_channels"])
    same: dict = {}
    p: dict[str, tuple[str, Mapping[str, str]]] = {"quant_conv.": ("quant_conv.", same), "post_quant_conv.": ("post_quant_conv.", same)}
    for part in ("encoder", "decoder"):
        p[f"{part}.conv_in."] = (f"{part}.conv_in.", same)
        p[f"{part}.conv_out."] = (f"{part}.conv_out.", same)
        p[f"{part}.conv_norm_out."] = (f"{part}.norm_out.", same)
        p[f"{part}.mid_block.resnets.0."] = (f"{part}.mid.block_1.", _VAE_RESNET)
        p[f"{part}.mid_block.resnets.1."] = (f"{part}.mid.block_2.", _VAE_RESNET)
        p[f"{part}.mid_block.attentions.0."] = (f"{part}.mid.attn_1.", _VAE_ATTENTION)
    for i in range(levels):
        p[f"encoder.down_blocks.{i}.resnets."] = (f"encoder.down.{i}.block.", same)
        p[f"encoder.down_blocks.{i}.downsamplers.0.conv."] = (f"encoder.down.{i}.downsample.conv.", same)
        p[f"decoder.up_blocks.{i}.resnets."] = (f"decoder.up.{levels - 1 - i}.block.", same)
        p[f"decoder.up_blocks.{i}.upsamplers.0.conv."] = (f"decoder.up.{levels - 1 - i}.upsample.conv.", same)
    rows = _map_by_prefix(keys, p, sgm_prefix, _vae_transform)
    # conv_shortcut lives one level below "resnets.<j>." so rename it here
    return [r._replace(sgm=r.sgm.replace(".conv_shortcut.", ".nin_shortcut.")) for r in rows]


def _vae_transform(dkey: str, skey: str) -> str:
    is_attn_matrix = ".mid.attn_1." in skey and skey.endswith(".weight") and not skey.endswith("norm.weight")
    return "conv1x1" if is_attn_matrix else "id"


def clip_l_table(keys: Iterable[str], sgm_prefix: str = CLIP_L_PREFIX) -> list[Row]:
    """CLIPTextModel <-> ``conditioner.embedders.0.transformer.text_model.*`` (HF names on both sides).

    transformers 5 drops the ``text_model.`` level from CLIPTextModel state dicts; sgm files always have it.
    """
    rows = []
    for key in keys:
        rest = key[len("text_model."):] if key.startswith("text_model.") else key
        rows.append(Row(key, sgm_prefix + "text_model." + rest))
    return rows


_CLIP_G_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "self_attn.out_proj": "attn.out_proj",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}


def clip_g_table(keys: Iterable[str], sgm_prefix: str = CLIP_G_PREFIX) -> list[Row]:
    """CLIPTextModelWithProjection <-> open_clip names under ``conditioner.embedders.1.model.*``."""
    rows = []
    for key in keys:
        rest = key[len("text_model."):] if key.startswith("text_model.") else key
        transform = "id"
        if rest == "embeddings.token_embedding.weight":
            sgm = "token_embedding.weight"
        elif rest == "embeddings.position_embedding.weight":
            sgm = "positional_embedding"
        elif rest.startswith("final_layer_norm."):
            sgm = "ln_final." + rest.split(".", 1)[1]
        elif rest == "text_projection.weight":
            sgm, transform = "text_projection", "T"
        elif rest.startswith("encoder.layers."):
            idx, tail = rest[len("encoder.layers."):].split(".", 1)
            base = f"transformer.resblocks.{idx}."
            if tail.startswith("self_attn.") and tail.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
                which, param = tail.split(".")[1][0], tail.rsplit(".", 1)[1]
                sgm, transform = f"{base}attn.in_proj_{param}", which
            else:
                sgm = base + _rename_head(tail, _CLIP_G_LAYER)
        else:
            raise KeyError(f"no open_clip name for CLIP-G key {key!r}")
        rows.append(Row(key, sgm_prefix + sgm, transform))
    return rows


# ----------------------------------------------------------------------------------------------- apply the table
def sgm_tensor_to_diffusers(row: Row, tensor: Tensor, diffusers_shape: tuple | None = None) -> Tensor:
    t = row.transform
    if t == "id":
        return tensor
    if t == "T":
        return tensor.t().contiguous()
    if t == "conv1x1":
        return tensor.reshape(diffusers_shape) if diffusers_shape is not None else tensor.reshape(tensor.shape[:2])
    if t in _QKV:
        return tensor.chunk(3, dim=0)[_QKV.index(t)].contiguous()
    raise ValueError(f"unknown transform {t!r}")


def sgm_to_diffusers(get: Callable[[str], Tensor], rows: list[Row], shapes: Mapping[str, tuple] | None = None) -> dict[str, Tensor]:
    """diffusers state dict from an sgm tensor getter; a fused tensor is read once for its q, k and v rows."""
    cache: dict[str, Tensor] = {}
    out = {}
    for row in rows:
        if row.transform in _QKV:
            if row.sgm not in cache:
                cache[row.sgm] = get(row.sgm)
            src = cache[row.sgm]
        else:
            src = get(row.sgm)
        out[row.diffusers] = sgm_tensor_to_diffusers(row, src, None if shapes is None else shapes.get(row.diffusers))
    return out


def diffusers_to_sgm(state: Mapping[str, Tensor], rows: list[Row]) -> dict[str, Tensor]:
    """sgm state dict from a diffusers one; q, k and v rows are concatenated back into ``in_proj_*``."""
    out: dict[str, Tensor] = {}
    fused: dict[str, dict[str, Tensor]] = {}
    for row in rows:
        tensor = state[row.diffusers]
        if row.transform == "id":
            out[row.sgm] = tensor
        elif row.transform == "T":
            out[row.sgm] = tensor.t().contiguous()
        elif row.transform == "conv1x1":
            out[row.sgm] = tensor.reshape(*tensor.shape, 1, 1) if tensor.ndim == 2 else tensor
        elif row.transform in _QKV:
            fused.setdefault(row.sgm, {})[row.transform] = tensor
        else:
            raise ValueError(f"unknown transform {row.transform!r}")
    for key, parts in fused.items():
        out[key] = torch.cat([parts[x] for x in _QKV], dim=0)
    return out
