"""sgm <-> diffusers key conversion and shape inference (trainer.models.convert / architecture)."""
from __future__ import annotations

import pytest
import torch

from trainer.models import architecture as A
from trainer.models import convert as C
from trainer.testing.tiny_sdxl import TinySDXLSpec, build_tiny_sdxl, configs


def _state(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _shapes(sgm: dict) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in sgm.items()}


def _round_trip(state: dict, rows: list[C.Row]) -> tuple[dict, dict]:
    sgm = C.diffusers_to_sgm(state, rows)
    back = C.sgm_to_diffusers(sgm.__getitem__, rows)
    return sgm, back


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def tiny_models():
    return build_tiny_sdxl(TinySDXLSpec(), seed=1)


def test_unet_round_trip_and_config_from_shapes(tiny_models):
    unet = tiny_models[0]
    state = _state(unet)
    sgm, back = _round_trip(state, C.unet_table(unet.config, state.keys()))
    _assert_same(state, back)
    assert all(k.startswith("model.diffusion_model.") for k in sgm)
    for key in ("input_blocks.0.0.weight", "input_blocks.2.0.op.weight", "input_blocks.3.1.proj_in.weight",
                "middle_block.1.transformer_blocks.0.attn2.to_k.weight", "output_blocks.1.2.conv.weight",
                "time_embed.0.weight", "label_emb.0.2.weight", "out.2.weight", "input_blocks.3.0.skip_connection.weight"):
        assert "model.diffusion_model." + key in sgm, key
    # shapes alone give back the config the model was built from (the tiny generator's add-time dim included)
    arch = A.unet_arch_from_sgm(_shapes(sgm), pooled_dim=64)
    assert arch.addition_time_embed_dim == 8
    assert A.unet_config(arch, sample_size=unet.config.sample_size) == configs(TinySDXLSpec())["unet"]


def test_koala_like_unet_with_different_up_depths():
    spec = TinySDXLSpec(block_out_channels=(32, 64, 64), transformer_layers_per_block=(0, 1, 2),
                        reverse_transformer_layers_per_block=((2, 1), (1, 1), (0, 0)))
    unet = build_tiny_sdxl(spec, seed=2)[0]
    assert unet.config.reverse_transformer_layers_per_block == [[2, 1], [1, 1], [1, 1]]
    assert [len(b.transformer_blocks) for b in unet.up_blocks[0].attentions] == [2, 1]
    state = _state(unet)
    sgm, back = _round_trip(state, C.unet_table(unet.config, state.keys()))
    _assert_same(state, back)
    arch = A.unet_arch_from_sgm(_shapes(sgm), pooled_dim=spec.projection_dim_2)
    assert arch.up_depths == ((2, 1), (1, 1), (0, 0)) and arch.mid_depth == 2
    assert A.unet_config(arch, sample_size=spec.sample_size) == configs(spec)["unet"]


def test_clip_l_round_trip(tiny_models):
    te = tiny_models[1]
    state = _state(te)
    sgm, back = _round_trip(state, C.clip_l_table(state.keys()))
    _assert_same(state, back)
    assert "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight" in sgm
    arch = A.clip_l_arch_from_sgm(_shapes(sgm))
    assert (arch.width, arch.layers, arch.vocab, arch.positions) == (32, 2, 49408, 77)


def test_clip_g_round_trip_fuses_qkv_and_transposes_projection(tiny_models):
    te2 = tiny_models[2]
    state = _state(te2)
    sgm, back = _round_trip(state, C.clip_g_table(state.keys()))
    _assert_same(state, back)
    p = "conditioner.embedders.1.model."
    attn = "text_model.encoder.layers.1.self_attn."
    fused = sgm[p + "transformer.resblocks.1.attn.in_proj_weight"]
    assert torch.equal(fused, torch.cat([state[attn + f"{x}_proj.weight"] for x in "qkv"]))
    assert torch.equal(sgm[p + "transformer.resblocks.1.attn.in_proj_bias"][64:128], state[attn + "k_proj.bias"])
    assert torch.equal(sgm[p + "text_projection"], state["text_projection.weight"].t())
    for key in ("token_embedding.weight", "positional_embedding", "ln_final.weight", "transformer.resblocks.0.ln_1.bias",
                "transformer.resblocks.0.mlp.c_fc.weight", "transformer.resblocks.0.attn.out_proj.weight"):
        assert p + key in sgm, key
    arch = A.clip_g_arch_from_sgm(_shapes(sgm))
    assert (arch.width, arch.layers, arch.projection_dim, arch.intermediate) == (64, 2, 64, 128)


@pytest.mark.parametrize("channels", [(32, 32, 64, 64), (32, 64, 64)])
def test_vae_round_trip_3_and_4_levels(channels):
    vae = build_tiny_sdxl(TinySDXLSpec(vae_block_out_channels=channels), seed=3)[3]
    state = _state(vae)
    sgm, back = _round_trip(state, C.vae_table(vae.config, state.keys()))
    _assert_same(state, back)
    n = len(channels)
    p = "first_stage_model."
    # decoder levels count from the bottom: diffusers up_blocks.0 (widest) is sgm up.{n-1}
    assert torch.equal(sgm[f"{p}decoder.up.{n - 1}.block.0.conv1.weight"], state["decoder.up_blocks.0.resnets.0.conv1.weight"])
    assert f"{p}decoder.up.{n - 1}.upsample.conv.weight" in sgm and f"{p}decoder.up.0.upsample.conv.weight" not in sgm
    assert sgm[f"{p}encoder.mid.attn_1.q.weight"].shape[2:] == (1, 1)  # 1x1 conv in sgm, linear in diffusers
    widen = next(i for i in range(1, n) if channels[i] != channels[i - 1])
    assert f"{p}encoder.down.{widen}.block.0.nin_shortcut.weight" in sgm
    arch = A.vae_arch_from_sgm(_shapes(sgm))
    assert arch.block_out_channels == channels and arch.latent_channels == 4 and arch.layers_per_block == 1


def test_sdxl_base_architecture_from_shapes_matches_shipped_configs():
    """The real SDXL base layout, built without memory: key counts and configs recovered from shapes."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(A.shipped_config("unet"))
        vae = AutoencoderKL.from_config(A.shipped_config("vae"))
        te = CLIPTextModel(CLIPTextConfig(**A.shipped_config("text_encoder")))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**A.shipped_config("text_encoder_2")))
    shapes = {}
    for module, table in ((unet, lambda k: C.unet_table(unet.config, k)), (vae, lambda k: C.vae_table(vae.config, k)),
                          (te, C.clip_l_table), (te2, C.clip_g_table)):
        state = {k: torch.empty(v.shape, device="meta") for k, v in module.state_dict().items()}
        shapes.update(_shapes(C.diffusers_to_sgm(state, table(state.keys()))))
    count = lambda prefix: sum(k.startswith(prefix) for k in shapes)  # noqa: E731
    # An SDXL base single file has 1680 UNet, 196 CLIP-L (+position_ids), 389 CLIP-G (+logit_scale), 248 VAE keys
    assert (count(A.UNET_PREFIX), count(A.CLIP_L_PREFIX), count(A.CLIP_G_PREFIX), count(A.VAE_PREFIX)) == (1680, 196, 389, 248)
    assert shapes["model.diffusion_model.output_blocks.2.2.conv.weight"] == (1280, 1280, 3, 3)
    assert shapes["model.diffusion_model.label_emb.0.0.weight"] == (1280, 2816)
    assert shapes["conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight"] == (3840, 1280)
    g = A.clip_g_arch_from_sgm(shapes)
    arch = A.unet_arch_from_sgm(shapes, pooled_dim=g.projection_dim)
    assert A.variant_name(arch) == "SDXL"
    assert A.unet_config(arch) == A.shipped_config("unet")
    assert A.clip_config(g, "text_encoder_2") == A.shipped_config("text_encoder_2")
    assert A.clip_config(A.clip_l_arch_from_sgm(shapes), "text_encoder") == A.shipped_config("text_encoder")
    assert A.vae_config(A.vae_arch_from_sgm(shapes)) == A.shipped_config("vae")


def test_head_rule():
    assert [A.attention_heads(c) for c in (320, 640, 1280, 768, 32, 64)] == [5, 10, 20, 12, 1, 1]
