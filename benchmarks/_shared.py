"""Helpers shared by the GPU benchmarks: random-weight models in the full SDXL shape (or a tiny one for CI), device
checks, timing and the RESULTS.md log. Nothing here needs real weights or network access."""
from __future__ import annotations

import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SDXL_CONFIGS = REPO / "trainer" / "configs" / "sdxl"
# The tiny shape: SDXL's layout with narrow channels and one transformer layer per level (CPU, seconds). Same numbers
# as the naive reference's tiny shape, so the two build the same UNet.
TINY_UNET = dict(block_out_channels=[32, 64, 128], transformer_layers_per_block=[1, 1, 1], attention_head_dim=[2, 4, 8],
                 cross_attention_dim=64, addition_time_embed_dim=8, projection_class_embeddings_input_dim=8 * 6 + 32,
                 norm_num_groups=16, layers_per_block=1)
TINY_VAE = dict(block_out_channels=[32, 32, 64, 64], layers_per_block=1, norm_num_groups=16)


def device_and_dtype() -> tuple[torch.device, torch.dtype, str]:
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16, torch.cuda.get_device_name(0)
    return torch.device("cpu"), torch.float32, "cpu"


def unet_config(shape: str) -> dict:
    cfg = json.loads((SDXL_CONFIGS / "unet.json").read_text())
    if shape == "tiny":
        cfg.update(TINY_UNET)
    return cfg


def build_unet(shape: str, device, dtype, seed: int = 0):
    """A randomly initialised UNet2DConditionModel built directly on ``device`` (no CPU copy of 2.6 B parameters)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    cfg = {k: v for k, v in unet_config(shape).items() if not k.startswith("_")}
    with torch.device(device):
        unet = UNet2DConditionModel(**cfg)
    return torch.nn.Module.to(unet, dtype=dtype).requires_grad_(False).eval()


def build_vae(shape: str, device, dtype, seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    cfg = {k: v for k, v in json.loads((SDXL_CONFIGS / "vae.json").read_text()).items() if not k.startswith("_")}
    if shape == "tiny":
        cfg.update(TINY_VAE)
    with torch.device(device):
        vae = AutoencoderKL(**cfg)
    return torch.nn.Module.to(vae, dtype=dtype).requires_grad_(False).eval()


def random_conditioning(unet, batch: int, res: int, seed: int = 1):
    from trainer.conditioning import time_ids
    from trainer.models.roles import Conditioning

    g = torch.Generator().manual_seed(seed)
    ctx = unet.config.cross_attention_dim
    pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    return Conditioning(torch.randn(batch, 77, ctx, generator=g), torch.randn(batch, pooled, generator=g), time_ids(res).expand(batch, 6).clone())


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t0)
    return out


def median(values) -> float:
    return float(statistics.median(values))


def free(device) -> None:
    import gc

    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.device(device).type == "cuda" else None


def append_results(path: Path | None, title: str, lines: list[str], record: dict) -> None:
    """Append one section (human lines + the JSON record) to RESULTS.md."""
    if path is None:
        return
    path = Path(path)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    text = f"\n## {title}: {record.get('device')} ({record.get('shape')}), {stamp}\n\n" + "".join(f"- {ln}\n" for ln in lines)
    text += f"\n```json\n{json.dumps(record)}\n```\n"
    from trainer.files import write_text_atomic

    header = "# Benchmark results\n\nAppended by benchmarks/train_cycle.py and benchmarks/inference.py (see README.md).\n"
    write_text_atomic(path, (path.read_text(encoding="utf-8") if path.exists() else header) + text)
