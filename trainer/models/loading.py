"""One entry point for SDXL-family models: ``load_sdxl(source)``.

``source`` is a single-file checkpoint (``.safetensors`` with sgm keys, optionally a pickle with explicit opt-in), a
diffusers folder (with ``model_index.json``) or a Hub repo id. Files and folders load offline: single files get
their architecture from tensor shapes (``architecture``) and their keys converted by our own tables (``convert``).
"""
from __future__ import annotations

import itertools
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from typing import TYPE_CHECKING

import torch

from trainer.errors import ConfigError, ModelLoadError
from trainer.models import architecture as arch
from trainer.models import convert
from trainer.models.detect import check_sdxl_family, check_source
from trainer.models.hashing import content_hash
from trainer.models.single_file import PICKLE_SUFFIXES, V_PRED_KEY, ZTSNR_KEY, TensorFile, save_sdxl_single_file
from trainer.schedule import PREDICTION_TYPES, NoiseSchedule

# diffusers and transformers take seconds to import: they are imported only once a checkpoint has passed the
# family checks, so refusals (SD1.5, LoRA, corrupt file, ...) come back fast.
if TYPE_CHECKING:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

__all__ = ["SDXLModel", "load_sdxl", "save_sdxl_single_file"]

COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "vae")


@dataclass
class SDXLModel:
    unet: UNet2DConditionModel
    text_encoder: CLIPTextModel | None
    text_encoder_2: CLIPTextModelWithProjection | None
    tokenizer: CLIPTokenizer
    tokenizer_2: CLIPTokenizer
    vae: AutoencoderKL | None
    schedule: NoiseSchedule  # carries prediction_type and zero_terminal_snr
    source: str
    name: str
    content_hash: str
    info: dict = field(default_factory=dict)  # what `dmd2 inspect` prints

    @property
    def prediction_type(self) -> str:
        return self.schedule.prediction_type


# ---------------------------------------------------------------------------------------------------- helpers
def _check_overrides(prediction_type: str | None) -> None:
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise ConfigError(f"prediction type {prediction_type!r} is not one of {', '.join(PREDICTION_TYPES)}; pass epsilon or v_prediction")


def _resolve_prediction(found_v: bool, found_ztsnr: bool, prediction_type, zero_terminal_snr, marker_source: str):
    pt = prediction_type or ("v_prediction" if found_v else "epsilon")
    z = found_ztsnr if zero_terminal_snr is None else bool(zero_terminal_snr)
    origin = "override" if prediction_type else (marker_source if found_v else "default")
    return pt, z, origin


def _assert_materialised(model: torch.nn.Module, what: str, where: str) -> None:
    for name, t in itertools.chain(model.named_parameters(), model.named_buffers()):
        if t.is_meta:
            raise ModelLoadError(f"{where}: {what} weight {name} was not loaded (still on the meta device); the file is incomplete")


def _finish(model: torch.nn.Module, what: str, where: str) -> None:
    """Eval mode, frozen, every weight loaded, and none at an unaligned address."""
    model.eval().requires_grad_(False)
    _assert_materialised(model, what, where)
    # safetensors (0.8.0 here) hands out tensors that live in the file's memory map, at the file's byte offsets. CPU
    # kernels take other code paths for unaligned memory, so the same weights loaded from a single file and from a
    # folder gave outputs that differed in the last bits. A copy gives such a weight its own (64-byte aligned) memory.
    with torch.no_grad():
        for t in itertools.chain(model.parameters(), model.buffers()):
            if t.data_ptr() % 64:
                t.data = t.data.clone()


def _empty(build):
    """Build a module without allocating or initialising parameters (they are assigned from the file next)."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        return build()


def _fill(model: torch.nn.Module, state: dict, dtype: torch.dtype, what: str, where: str) -> None:
    state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise ModelLoadError(f"{where}: the {what} weights do not fit the inferred architecture ({' '.join(first[:2])[:300]}); the checkpoint is not a standard SDXL-family file") from None
    _finish(model, what, where)


# ------------------------------------------------------------------------------------------------ single files
def _load_component(reader: TensorFile, model, rows, what: str, dtype, where: str) -> None:
    missing = [r.sgm for r in rows if r.sgm not in reader.shapes]
    if missing:
        raise ModelLoadError(f"{where} lacks {len(missing)} {what} weights the architecture needs (e.g. {missing[0]}); the file is incomplete or not a standard sgm SDXL checkpoint")
    _fill(model, convert.sgm_to_diffusers(reader.get, rows), dtype, what, where)


def _sample_size(reader: TensorFile, vae_arch: arch.VAEArch | None) -> int:
    """The UNet's native latent size: from modelspec.resolution if the file has it, else SDXL's 128."""
    match = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*", reader.metadata.get("modelspec.resolution", ""))
    if not match:
        return 128
    scale = 2 ** (len(vae_arch.block_out_channels) - 1) if vae_arch else 8
    return max(1, int(match.group(1)) // scale)


def _load_single_file(path: Path, *, prediction_type, zero_terminal_snr, allow_pickle, dtype, load_text_encoders, load_vae):
    where = os.fspath(path)
    reader = TensorFile(path, allow_pickle=allow_pickle)
    try:
        shapes = reader.shapes
        unet_prefix = check_sdxl_family(shapes, where)
        present = {
            "unet": True,
            "text_encoder": any(k.startswith(arch.CLIP_L_PREFIX) for k in shapes),
            "text_encoder_2": any(k.startswith(arch.CLIP_G_PREFIX) for k in shapes),
            "vae": any(k.startswith(arch.VAE_PREFIX) for k in shapes),
        }
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

        g_arch = arch.clip_g_arch_from_sgm(shapes) if present["text_encoder_2"] else None
        l_arch = arch.clip_l_arch_from_sgm(shapes) if present["text_encoder"] else None
        vae_arch = arch.vae_arch_from_sgm(shapes) if present["vae"] else None
        unet_arch = arch.unet_arch_from_sgm(shapes, unet_prefix, pooled_dim=g_arch.projection_dim if g_arch else None)
        unet_cfg = arch.unet_config(unet_arch, sample_size=_sample_size(reader, vae_arch))

        unet = _empty(lambda: UNet2DConditionModel.from_config(unet_cfg))
        rows = {"unet": convert.unet_table(unet.config, unet.state_dict().keys(), unet_prefix)}
        _load_component(reader, unet, rows["unet"], "UNet", dtype, where)
        te = te2 = vae = None
        if l_arch and load_text_encoders:
            te = _empty(lambda: CLIPTextModel._from_config(CLIPTextConfig(**arch.clip_config(l_arch, "text_encoder"))))
            rows["text_encoder"] = convert.clip_l_table(te.state_dict().keys())
            _load_component(reader, te, rows["text_encoder"], "CLIP-L text encoder", dtype, where)
        if g_arch and load_text_encoders:
            te2 = _empty(lambda: CLIPTextModelWithProjection._from_config(CLIPTextConfig(**arch.clip_config(g_arch, "text_encoder_2"))))
            rows["text_encoder_2"] = convert.clip_g_table(te2.state_dict().keys())
            _load_component(reader, te2, rows["text_encoder_2"], "CLIP-G text encoder", dtype, where)
        if vae_arch and load_vae:
            vae_cfg = arch.vae_config(vae_arch)
            vae_cfg["sample_size"] = unet_cfg["sample_size"] * 2 ** (len(vae_arch.block_out_channels) - 1)
            vae = _empty(lambda: AutoencoderKL.from_config(vae_cfg))
            rows["vae"] = convert.vae_table(vae.config, vae.state_dict().keys())
            _load_component(reader, vae, rows["vae"], "VAE", dtype, where)

        prefixes = {"unet": unet_prefix, "text_encoder": arch.CLIP_L_PREFIX, "text_encoder_2": arch.CLIP_G_PREFIX, "vae": arch.VAE_PREFIX}
        key_counts = {c: sum(k.startswith(p) for k in shapes) for c, p in prefixes.items() if present[c]}
        found_v, found_z = V_PRED_KEY in shapes, ZTSNR_KEY in shapes
        pt, z, origin = _resolve_prediction(found_v, found_z, prediction_type, zero_terminal_snr, f"'{V_PRED_KEY}' key in the file")
        info = {
            "format": "single file (.safetensors, sgm keys)" if path.suffix.lower() == ".safetensors" else f"single file ({path.suffix} pickle, sgm keys)",
            "variant": arch.variant_name(unet_arch),
            "components": present,
            "key_counts": key_counts,
            "other_keys": len(shapes) - sum(key_counts.values()),
            "dtype": reader.dtype_of(unet_prefix),
            "markers": [k for k in (V_PRED_KEY, ZTSNR_KEY) if k in shapes],
            "prediction_type_origin": origin,
            "architecture": _unet_summary(unet_arch, l_arch, g_arch, vae_arch),
        }
        return (unet, te, te2, vae), (pt, z), info, NoiseSchedule.sdxl
    finally:
        reader.close()


def _unet_summary(u: arch.UNetArch, l: arch.CLIPArch | None, g: arch.CLIPArch | None, v: arch.VAEArch | None) -> dict:
    out = {
        "unet_channels": list(u.block_out_channels),
        "unet_layers_per_block": list(u.layers_per_block),
        "transformer_depth": u.depth_pattern,
        "transformer_depth_output": [d for level in u.up_depths for d in level],
        "transformer_depth_middle": "no mid block" if u.mid_depth is None else u.mid_depth,
        "context_dim": u.cross_attention_dim,
        "adm_in_channels": u.adm_in_channels,
    }
    if l:
        out["clip_l"] = f"width {l.width}, {l.layers} layers"
    if g:
        out["clip_g"] = f"width {g.width}, {g.layers} layers, projection {g.projection_dim}"
    if v:
        out["vae_channels"] = list(v.block_out_channels)
    return out


# ----------------------------------------------------------------------------------------------------- folders
def _read_json(path: Path, where: str) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{where}: cannot read {path.name} ({type(exc).__name__}); the diffusers folder is incomplete") from None


def _folder_weights_ok(sub: Path, allow_pickle: bool, where: str) -> None:
    names = [p.name for p in sub.iterdir()] if sub.is_dir() else []
    if any(n.endswith(".safetensors") for n in names):
        return
    if any(n.endswith(PICKLE_SUFFIXES) for n in names) and not allow_pickle:
        raise ModelLoadError(f"{where}/{sub.name} has only pickle weights (.bin), which can run code when loaded; convert them to .safetensors or pass --allow-pickle")
    if not any(n.endswith(PICKLE_SUFFIXES) for n in names):
        raise ModelLoadError(f"{where}/{sub.name} has no weight file; the diffusers folder is incomplete")


def _load_folder(folder: Path, *, prediction_type, zero_terminal_snr, allow_pickle, dtype, load_text_encoders, load_vae):
    where = os.fspath(folder)
    unet_cfg = _read_json(folder / "unet" / "config.json", where)  # layout and family were checked by check_source
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    present = {c: (folder / c / "config.json").is_file() for c in COMPONENTS}
    sched = _read_json(folder / "scheduler" / "scheduler_config.json", where) if (folder / "scheduler" / "scheduler_config.json").is_file() else {}

    def load(component, cls):
        _folder_weights_ok(folder / component, allow_pickle, where)
        # diffusers takes torch_dtype, transformers 5 takes dtype
        kw = {"dtype": dtype} if cls in (CLIPTextModel, CLIPTextModelWithProjection) else {"torch_dtype": dtype}
        try:
            model = cls.from_pretrained(folder / component, local_files_only=True, **kw)
        except (OSError, ValueError, RuntimeError) as exc:
            raise ModelLoadError(f"{where}/{component} could not be loaded ({str(exc).splitlines()[0][:200]}); the folder is incomplete or corrupt") from None
        _finish(model, component, where)
        return model

    unet = load("unet", UNet2DConditionModel)
    te = load("text_encoder", CLIPTextModel) if present["text_encoder"] and load_text_encoders else None
    te2 = load("text_encoder_2", CLIPTextModelWithProjection) if present["text_encoder_2"] and load_text_encoders else None
    vae = load("vae", AutoencoderKL) if present["vae"] and load_vae else None

    found_v = sched.get("prediction_type") == "v_prediction"
    found_z = bool(sched.get("rescale_betas_zero_snr", False))
    pt, z, origin = _resolve_prediction(found_v, found_z, prediction_type, zero_terminal_snr, "scheduler config")
    betas = {k: sched[k] for k in ("beta_start", "beta_end", "num_train_timesteps") if k in sched}

    headers = {c: _folder_header(folder / c) for c in COMPONENTS if present[c]}

    info = {
        "format": "diffusers folder",
        "variant": _folder_variant(unet_cfg),
        "components": present,
        "key_counts": {c: h[0] for c, h in headers.items()},
        "dtype": headers["unet"][1] or str(next(unet.parameters()).dtype).removeprefix("torch."),
        "markers": [f"scheduler prediction_type={sched.get('prediction_type', 'epsilon')}"] + (["rescale_betas_zero_snr"] if found_z else []),
        "prediction_type_origin": origin,
        "architecture": {
            "unet_channels": unet_cfg.get("block_out_channels"),
            "transformer_layers_per_block": unet_cfg.get("transformer_layers_per_block"),
            "context_dim": unet_cfg.get("cross_attention_dim"),
            "adm_in_channels": unet_cfg.get("projection_class_embeddings_input_dim"),
        },
    }
    schedule = lambda prediction_type, zero_terminal_snr: NoiseSchedule.sdxl(prediction_type, zero_terminal_snr, **betas)  # noqa: E731
    return (unet, te, te2, vae), (pt, z), info, schedule


def _folder_header(sub: Path) -> tuple[int | None, str | None]:
    """(key count, most common stored dtype) of a component's .safetensors files; only headers are read."""
    files = sorted(sub.glob("*.safetensors"))
    if not files:
        return None, None
    readers = [TensorFile(f) for f in files]
    count = sum(len(r.shapes) for r in readers)
    dtypes = [r.dtype_of("") for r in readers]
    for r in readers:
        r.close()
    return count, dtypes[0]


def _folder_variant(cfg: dict) -> str:
    tl = cfg.get("transformer_layers_per_block", 1)
    if cfg.get("block_out_channels") == [320, 640, 1280] and cfg.get("cross_attention_dim") == 2048 and tl == [1, 2, 10]:
        return "SDXL"
    return "SDXL-architecture (custom)"


# ---------------------------------------------------------------------------------------------------------- hub
def _download(repo_id: str) -> Path:
    """A local path for a Hub repo: the diffusers layout if it has one, else its only .safetensors file."""
    try:
        from huggingface_hub import HfApi, hf_hub_download, snapshot_download

        files = HfApi().list_repo_files(repo_id)
        if "model_index.json" in files:
            patterns = ["model_index.json", "*/config.json", "scheduler/*.json", "*/diffusion_pytorch_model.safetensors", "*/model.safetensors"]
            return Path(snapshot_download(repo_id, allow_patterns=patterns))
        singles = [f for f in files if f.endswith(".safetensors") and "/" not in f]
        if len(singles) != 1:
            raise ModelLoadError(f"Hub repo {repo_id} has no model_index.json and {len(singles)} top-level .safetensors files; download the checkpoint you want and pass its path")
        return Path(hf_hub_download(repo_id, singles[0]))
    except ModelLoadError:
        raise
    except Exception as exc:  # offline, unknown repo, gated repo, ...
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise ModelLoadError(f"{repo_id} is not a local path and could not be fetched from the Hub ({reason}); check the path, or the repo id and your network") from None


# ------------------------------------------------------------------------------------------------- entry point
def load_sdxl(source, *, prediction_type: str | None = None, zero_terminal_snr: bool | None = None, allow_pickle: bool = False,
              dtype: torch.dtype = torch.float32, load_text_encoders: bool = True, load_vae: bool = True) -> SDXLModel:
    """Load an SDXL-family model from a single file, a diffusers folder or a Hub repo id.

    ``prediction_type`` / ``zero_terminal_snr`` override what the model declares (a ``v_pred``/``ztsnr`` key in a
    single file, or the folder's scheduler config). Raises ModelLoadError / UnsupportedModelError / ConfigError.
    """
    _check_overrides(prediction_type)
    text = os.fspath(source)
    check_source(text, allow_pickle=allow_pickle)
    path = Path(text).expanduser()
    if not path.exists():
        path = _download(text)
        check_source(path, allow_pickle=allow_pickle)
    kwargs = dict(prediction_type=prediction_type, zero_terminal_snr=zero_terminal_snr, allow_pickle=allow_pickle,
                  dtype=dtype, load_text_encoders=load_text_encoders, load_vae=load_vae)
    loader = _load_folder if path.is_dir() else _load_single_file
    (unet, te, te2, vae), (pt, z), info, make_schedule = loader(path, **kwargs)
    from trainer.models.tokenizers import sdxl_tokenizers

    digest = content_hash(path)
    tok, tok2 = sdxl_tokenizers()
    name = text if not Path(text).expanduser().exists() else (path.stem if path.is_file() else path.resolve().name)
    info = {"family": "SDXL", "source": text, "name": name, **info, "prediction_type": pt, "zero_terminal_snr": z,
            "content_hash": digest, "loaded": [c for c, m in zip(COMPONENTS, (unet, te, te2, vae)) if m is not None]}
    return SDXLModel(unet=unet, text_encoder=te, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok2, vae=vae,
                     schedule=make_schedule(prediction_type=pt, zero_terminal_snr=z), source=text, name=name,
                     content_hash=digest, info=info)
