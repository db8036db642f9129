"""Reading and writing sgm single-file checkpoints (the layout A1111, ComfyUI and civitai use).

Reading goes through :class:`TensorFile`, which exposes key -> shape from the header first (so a checkpoint can be
classified or refused before any tensor is read) and then reads tensors one at a time. Writing converts diffusers
modules through the same tables the loader uses (``trainer.models.convert``) and replaces the target atomically.
"""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

from safetensors import safe_open

from trainer.errors import ModelLoadError
from trainer.files import atomic_write

# torch is imported only when tensors are read or written: header checks (and so refusals) stay fast.
if TYPE_CHECKING:
    from torch import Tensor

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
V_PRED_KEY, ZTSNR_KEY = "v_pred", "ztsnr"  # ComfyUI's markers: their presence, not their value, carries meaning
_ST_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64", "F8_E4M3": "float8_e4m3fn",
              "F8_E5M2": "float8_e5m2", "I64": "int64", "I32": "int32", "U8": "uint8", "BOOL": "bool"}


class TensorFile:
    """key -> shape and dtype up front, tensors on demand; for ``.safetensors`` and (opt-in) pickles."""

    def __init__(self, path: Path, allow_pickle: bool = False):
        self.path = path
        self.metadata: dict[str, str] = {}
        self._handle = None
        self._tensors: dict[str, Tensor] | None = None
        if path.suffix.lower() == ".safetensors":
            self._open_safetensors()
        elif path.suffix.lower() in PICKLE_SUFFIXES:
            self._open_pickle(allow_pickle)
        else:
            raise ModelLoadError(f"{path} has an unknown extension {path.suffix!r}; pass a .safetensors file, a diffusers folder or a Hub repo id")

    def _corrupt(self, exc: Exception) -> ModelLoadError:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return ModelLoadError(f"{self.path} is not a readable .safetensors file ({reason}): it is truncated or corrupt; download or copy it again")

    def _open_safetensors(self) -> None:
        try:
            header = safe_open(os.fspath(self.path), framework="numpy")  # header only; no torch needed
            self.metadata = dict(header.metadata() or {})
            self.shapes, self.dtypes = {}, {}
            for key in header.keys():
                sl = header.get_slice(key)
                self.shapes[key] = tuple(sl.get_shape())
                self.dtypes[key] = _ST_DTYPES.get(sl.get_dtype(), sl.get_dtype().lower())
        except Exception as exc:  # safetensors raises its own SafetensorError (and OSError) on bad headers
            raise self._corrupt(exc) from None

    def _open_pickle(self, allow_pickle: bool) -> None:
        if not allow_pickle:
            raise ModelLoadError(
                f"{self.path} is a pickle checkpoint, which can run code when loaded; convert it to .safetensors, or pass --allow-pickle (allow_pickle=True) to load it with torch.load(weights_only=True)"
            )
        import torch

        try:
            obj = torch.load(os.fspath(self.path), map_location="cpu", weights_only=True)
        except Exception as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ModelLoadError(f"{self.path} could not be read as a weights-only pickle ({reason}); convert it to .safetensors") from None
        if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
            obj = obj["state_dict"]  # Lightning-style checkpoints nest the weights
        if not isinstance(obj, Mapping):
            raise ModelLoadError(f"{self.path} holds a {type(obj).__name__}, not a state dict of tensors; pass an SDXL checkpoint")
        self._tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        self.shapes = {k: tuple(v.shape) for k, v in self._tensors.items()}
        self.dtypes = {k: str(v.dtype).removeprefix("torch.") for k, v in self._tensors.items()}

    def get(self, key: str) -> Tensor:
        if self._tensors is not None:
            return self._tensors[key]
        try:
            if self._handle is None:
                self._handle = safe_open(os.fspath(self.path), framework="pt", device="cpu")
            return self._handle.get_tensor(key)
        except Exception as exc:
            raise self._corrupt(exc) from None

    def dtype_of(self, prefix: str) -> str | None:
        """The most common dtype among keys under ``prefix``."""
        counts = Counter(d for k, d in self.dtypes.items() if k.startswith(prefix))
        return counts.most_common(1)[0][0] if counts else None

    def close(self) -> None:
        self._handle = None
        self._tensors = None


def _sgm_state(module, table_fn) -> dict[str, Tensor]:
    from trainer.models import convert

    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    return convert.diffusers_to_sgm(state, table_fn(state.keys()))


def sdxl_sgm_state_dict(unet, text_encoder=None, text_encoder_2=None, vae=None) -> dict[str, Tensor]:
    """One sgm-named state dict for the given diffusers/transformers modules (any may be None but the UNet)."""
    from trainer.models import convert

    out = _sgm_state(unet, lambda keys: convert.unet_table(unet.config, keys))
    if text_encoder is not None:
        out.update(_sgm_state(text_encoder, convert.clip_l_table))
    if text_encoder_2 is not None:
        out.update(_sgm_state(text_encoder_2, convert.clip_g_table))
    if vae is not None:
        out.update(_sgm_state(vae, lambda keys: convert.vae_table(vae.config, keys)))
    return out


def save_sdxl_single_file(path, unet, text_encoder, text_encoder_2, vae=None, *, v_pred: bool = False,
                          ztsnr: bool = False, metadata: Mapping[str, str] | None = None) -> Path:
    """Write an sgm single-file checkpoint ComfyUI/A1111 load; atomic (temp file in the same folder + os.replace)."""
    import torch
    from safetensors.torch import save_file

    path = Path(path)
    state = sdxl_sgm_state_dict(unet, text_encoder, text_encoder_2, vae)
    if v_pred:
        state[V_PRED_KEY] = torch.tensor([])
    if ztsnr:
        state[ZTSNR_KEY] = torch.tensor([])
    # Deduplicate storage: safetensors refuses tensors that share memory.
    seen: set[int] = set()
    for key, tensor in state.items():
        if tensor.numel() and tensor.data_ptr() in seen:
            state[key] = tensor.clone()
        seen.add(tensor.data_ptr())
    vae_scale = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 8
    side = int(unet.config.sample_size) * vae_scale
    meta = {"modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": "stable-diffusion-xl-v1-base",
            "modelspec.resolution": f"{side}x{side}"}
    meta.update({str(k): str(v) for k, v in (metadata or {}).items()})
    with atomic_write(path) as tmp:
        save_file(state, tmp, metadata=meta)
    return path
