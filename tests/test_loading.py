"""load_sdxl on tiny models: single file vs folder, markers and overrides, pickles, hashing, saving."""
from __future__ import annotations

import hashlib
import json
import shutil
import time

import pytest
import torch

from trainer.errors import ConfigError, ModelLoadError
from trainer.models.loading import SDXLModel, load_sdxl, save_sdxl_single_file
from trainer.models.single_file import sdxl_sgm_state_dict

COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "vae")


def _no_meta(model: SDXLModel) -> None:
    for c in COMPONENTS:
        module = getattr(model, c)
        for name, t in [*module.named_parameters(), *module.named_buffers()]:
            assert not t.is_meta, f"{c}.{name} is on the meta device"


@pytest.fixture(scope="module")
def from_file(tiny_sdxl_file) -> SDXLModel:
    start = time.perf_counter()
    model = load_sdxl(tiny_sdxl_file)
    model.info["_seconds"] = time.perf_counter() - start
    return model


@pytest.fixture(scope="module")
def from_folder(tiny_sdxl_folder) -> SDXLModel:
    start = time.perf_counter()
    model = load_sdxl(tiny_sdxl_folder)
    model.info["_seconds"] = time.perf_counter() - start
    return model


def test_single_file_and_folder_give_identical_models(from_file, from_folder):
    for model in (from_file, from_folder):
        assert model.info["_seconds"] < 10
        _no_meta(model)
    for c in COMPONENTS:
        a, b = getattr(from_file, c).state_dict(), getattr(from_folder, c).state_dict()
        assert a.keys() == b.keys(), c
        for k in a:
            assert torch.equal(a[k], b[k]), f"{c}.{k}"
    public = lambda cfg: {k: v for k, v in cfg.items() if not k.startswith("_")}  # noqa: E731
    assert public(from_file.unet.config) == public(from_folder.unet.config)
    assert public(from_file.vae.config) == public(from_folder.vae.config)
    for c in ("text_encoder", "text_encoder_2"):
        fa, fb = getattr(from_file, c).config.to_dict(), getattr(from_folder, c).config.to_dict()
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act", "projection_dim"):
            assert fa[key] == fb[key], (c, key)
    # different widths, as real SDXL: a CLIP-L/CLIP-G mix-up cannot pass unnoticed
    assert from_file.text_encoder.config.hidden_size == 32 and from_file.text_encoder_2.config.hidden_size == 64
    assert from_file.text_encoder.config.hidden_act == "quick_gelu" and from_file.text_encoder_2.config.hidden_act == "gelu"
    assert from_file.unet.config.addition_embed_type == "text_time" and from_file.unet.config.addition_time_embed_dim == 8
    assert from_file.vae.config.scaling_factor == 0.13025
    assert from_file.prediction_type == "epsilon" and not from_file.schedule.zero_terminal_snr


def test_loaded_model_runs_and_file_and_folder_agree(from_file, from_folder):
    torch.manual_seed(0)
    x = torch.randn(1, 4, 8, 8)
    ids = from_file.tokenizer(["a photo"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    outs = []
    for model in (from_file, from_folder):
        with torch.no_grad():
            h1 = model.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
            enc2 = model.text_encoder_2(ids, output_hidden_states=True)
            ctx = torch.cat([h1, enc2.hidden_states[-2]], dim=-1)
            cond = {"text_embeds": enc2.text_embeds, "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
            outs.append(model.unet(x, torch.tensor([500]), ctx, added_cond_kwargs=cond).sample)
    assert outs[0].shape == x.shape and torch.isfinite(outs[0]).all()
    assert torch.equal(outs[0], outs[1])


def test_tokenizers_match_clip():
    from trainer.models.tokenizers import sdxl_tokenizers

    tok, tok2 = sdxl_tokenizers()
    for t in (tok, tok2):
        assert t("a photo of a red circle").input_ids == [49406, 320, 1125, 539, 320, 736, 7117, 49407]
    assert tok2.pad_token_id == 0 and tok.pad_token_id == 49407


def test_v_pred_and_ztsnr_markers_and_overrides(from_file, tmp_path):
    path = save_sdxl_single_file(tmp_path / "vpred.safetensors", from_file.unet, from_file.text_encoder,
                                 from_file.text_encoder_2, from_file.vae, v_pred=True, ztsnr=True)
    marked = load_sdxl(path, load_text_encoders=False, load_vae=False)
    assert marked.prediction_type == "v_prediction" and marked.schedule.zero_terminal_snr
    assert marked.schedule.alphas_cumprod[-1] < 1e-6  # a real zero-terminal-SNR schedule
    assert marked.text_encoder is None and marked.vae is None
    overridden = load_sdxl(path, prediction_type="epsilon", zero_terminal_snr=False, load_text_encoders=False, load_vae=False)
    assert overridden.prediction_type == "epsilon" and not overridden.schedule.zero_terminal_snr
    assert overridden.info["prediction_type_origin"] == "override"
    plain = load_sdxl(from_file.source, prediction_type="v_prediction", load_text_encoders=False, load_vae=False)
    assert plain.prediction_type == "v_prediction"
    with pytest.raises(ConfigError):
        load_sdxl(path, prediction_type="flow")


def test_folder_scheduler_config_declares_prediction_type(tiny_sdxl_folder, tmp_path):
    folder = tmp_path / "vpred-folder"
    shutil.copytree(tiny_sdxl_folder, folder)
    sched_file = folder / "scheduler" / "scheduler_config.json"
    sched = json.loads(sched_file.read_text())
    sched.update(prediction_type="v_prediction", rescale_betas_zero_snr=True)
    sched_file.write_text(json.dumps(sched))
    model = load_sdxl(folder, load_text_encoders=False, load_vae=False)
    assert model.prediction_type == "v_prediction" and model.schedule.zero_terminal_snr
    model = load_sdxl(folder, prediction_type="epsilon", zero_terminal_snr=False, load_text_encoders=False, load_vae=False)
    assert model.prediction_type == "epsilon" and not model.schedule.zero_terminal_snr


def test_pickle_needs_opt_in_and_then_loads_weights_only(from_file, tmp_path):
    path = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": sdxl_sgm_state_dict(from_file.unet, from_file.text_encoder, from_file.text_encoder_2)}, path)
    with pytest.raises(ModelLoadError, match="pickle"):
        load_sdxl(path)
    model = load_sdxl(path, allow_pickle=True)
    assert model.vae is None  # the pickle had no VAE
    for k, v in from_file.unet.state_dict().items():
        assert torch.equal(model.unet.state_dict()[k], v), k


def test_dtype_and_bare_unet_file(from_file, tmp_path):
    model = load_sdxl(from_file.source, dtype=torch.float16, load_text_encoders=False, load_vae=False)
    assert {p.dtype for p in model.unet.parameters()} == {torch.float16}
    # ComfyUI "diffusion_models" files: the UNet alone, sgm names without the model.diffusion_model. prefix
    from safetensors.torch import save_file

    state = {k.removeprefix("model.diffusion_model."): v for k, v in sdxl_sgm_state_dict(from_file.unet).items()}
    save_file(state, tmp_path / "unet_only.safetensors")
    bare = load_sdxl(tmp_path / "unet_only.safetensors")
    assert bare.text_encoder is None and bare.text_encoder_2 is None and bare.vae is None
    assert bare.unet.config.addition_time_embed_dim == 256  # no CLIP-G to read the pooled width from: SDXL's value
    assert bare.unet.config.projection_class_embeddings_input_dim == from_file.unet.config.projection_class_embeddings_input_dim


def test_content_hash_is_sha256_and_cached(from_file, tiny_sdxl_file, monkeypatch):
    assert from_file.content_hash == hashlib.sha256(tiny_sdxl_file.read_bytes()).hexdigest()
    from trainer.models import hashing

    def no_reads(*args, **kwargs):
        raise AssertionError("hashed again instead of using the cache")

    monkeypatch.setattr(hashing.hashlib, "sha256", no_reads)
    assert hashing.content_hash(tiny_sdxl_file) == from_file.content_hash


def test_save_is_atomic_and_round_trips(from_file, tmp_path):
    target = tmp_path / "out.safetensors"
    target.write_bytes(b"old")
    save_sdxl_single_file(target, from_file.unet, from_file.text_encoder, from_file.text_encoder_2, from_file.vae,
                          metadata={"note": "x"})
    assert [p.name for p in tmp_path.iterdir()] == ["out.safetensors"]  # no temp file left behind
    again = load_sdxl(target)
    for c in COMPONENTS:
        for k, v in getattr(from_file, c).state_dict().items():
            assert torch.equal(getattr(again, c).state_dict()[k], v), f"{c}.{k}"
    assert again.unet.config.sample_size == from_file.unet.config.sample_size  # kept through modelspec.resolution


def test_toy_teacher_shape_3_level_vae_and_koala_like_unet(tmp_path):
    """What the toy teacher uses (32x32 images, 8x8 latents, 3-level VAE), with asymmetric up-block depths."""
    from trainer.testing.tiny_sdxl import TinySDXLSpec, build_tiny_sdxl

    spec = TinySDXLSpec(block_out_channels=(32, 64, 64), transformer_layers_per_block=(0, 1, 2),
                        reverse_transformer_layers_per_block=((2, 1), (1, 1), (0, 0)), vae_block_out_channels=(32, 64, 64))
    modules = build_tiny_sdxl(spec, seed=5)
    path = save_sdxl_single_file(tmp_path / "toy.safetensors", *modules)
    model = load_sdxl(path)
    _no_meta(model)
    for name, module in zip(COMPONENTS, modules):
        loaded = getattr(model, name).state_dict()
        for k, v in module.state_dict().items():
            assert torch.equal(loaded[k], v), f"{name}.{k}"
    assert model.unet.config.sample_size == 8 and len(model.vae.config.block_out_channels) == 3
    with torch.no_grad():
        latents = model.vae.encode(torch.zeros(1, 3, 32, 32)).latent_dist.mean
    assert latents.shape == (1, 4, 8, 8)
