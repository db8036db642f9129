"""`dmd2 inspect` through the real CLI: the report, and every refusal as one `error:` line with a non-zero exit."""
from __future__ import annotations

import os
import random
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[1]
UNET = "model.diffusion_model."


def dmd2(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "trainer", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def _unet_keys(context: int, adm: int | None) -> dict[str, torch.Tensor]:
    """A minimal sgm UNet: what the family check reads (conv_in, one cross-attention, optional label_emb)."""
    sd = {
        UNET + "input_blocks.0.0.weight": torch.zeros(32, 4, 3, 3),
        UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(32, context),
        UNET + "out.2.weight": torch.zeros(4, 32, 3, 3),
    }
    if adm:
        sd[UNET + "label_emb.0.0.weight"] = torch.zeros(128, adm)
    return sd


def _bad_files(root: Path, tiny_file: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, text the error line must contain)."""
    files: dict[str, tuple[dict | bytes, str]] = {
        "sd15.safetensors": (_unet_keys(768, None), "SD1.5 checkpoint (UNet context dim 768"),
        "sd2.safetensors": (_unet_keys(1024, None), "SD2 checkpoint (UNet context dim 1024"),
        "refiner.safetensors": (_unet_keys(1280, 2560) | {"conditioner.embedders.0.model.ln_final.weight": torch.ones(1280)}, "SDXL refiner"),
        "flux.safetensors": ({"double_blocks.0.img_attn.qkv.weight": torch.zeros(6, 2), "single_blocks.0.linear1.weight": torch.zeros(2, 2)}, "Flux"),
        "sd3.safetensors": ({UNET + "joint_blocks.0.x_block.attn.qkv.weight": torch.zeros(6, 2)}, "SD3"),
        "lora_kohya.safetensors": ({"lora_unet_down_blocks_1_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8),
                                    "lora_unet_down_blocks_1_attentions_0_proj_in.lora_up.weight": torch.zeros(8, 4),
                                    "lora_unet_down_blocks_1_attentions_0_proj_in.alpha": torch.tensor(4.0)}, "is a LoRA"),
        "lora_peft.safetensors": ({"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.zeros(4, 8)}, "is a LoRA"),
        "truncated.safetensors": (tiny_file.read_bytes()[: tiny_file.stat().st_size // 2], "truncated or corrupt"),
        "random.safetensors": (bytes(random.Random(0).randrange(256) for _ in range(4096)), "truncated or corrupt"),
    }
    out = {}
    for name, (content, expected) in files.items():
        path = root / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            save_file(content, path)
        out[name] = (path, expected)
    pickle = root / "model.ckpt"
    torch.save(_unet_keys(2048, 2816), pickle)
    out["pickle"] = (pickle, "--allow-pickle")
    out["missing"] = (root / "does-not-exist.safetensors", "does not exist")
    return out


def test_inspect_reports_tiny_single_file(tiny_sdxl_file):
    result = dmd2("inspect", str(tiny_sdxl_file))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for expected in ("family:", "SDXL", "single file (.safetensors, sgm keys)", "prediction:", "epsilon (from: default)",
                     "text_encoder_2 (CLIP-G)", "unet 212", "dtype:", "float32", "sha256:"):
        assert expected in out, expected
    assert "Traceback" not in result.stderr


def test_inspect_prediction_type_override_on_folder(tiny_sdxl_folder, capsys):
    from trainer.cli import main  # in-process: the subprocess path is covered above and costs a full import

    assert main(["inspect", str(tiny_sdxl_folder), "--prediction-type", "v_prediction"]) == 0
    out = capsys.readouterr().out
    assert "v_prediction (from: override)" in out and "diffusers folder" in out and "unet 212" in out


def test_every_refusal_is_one_error_line(tmp_path, tiny_sdxl_file):
    cases = _bad_files(tmp_path, tiny_sdxl_file)
    with ThreadPoolExecutor(max_workers=2) as pool:  # each run pays a torch import; two at a time
        results = dict(zip(cases, pool.map(lambda case: dmd2("inspect", str(case[0])), cases.values())))
    for name, (path, expected) in cases.items():
        result = results[name]
        lines = result.stderr.strip().splitlines()
        assert result.returncode != 0, name
        assert "Traceback" not in result.stderr, (name, result.stderr)
        assert len(lines) == 1 and lines[0].startswith("error: "), (name, result.stderr)
        assert expected in lines[0], (name, lines[0])
        assert str(path) in lines[0], (name, lines[0])


def test_allow_pickle_opt_in_reaches_the_loader(tmp_path):
    path = tmp_path / "sd15.ckpt"
    torch.save({"state_dict": _unet_keys(768, None)}, path)  # read with weights_only=True, then refused as SD1.5
    result = dmd2("inspect", str(path), "--allow-pickle")
    assert result.returncode != 0 and result.stderr.startswith("error: ") and "SD1.5" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_prediction_type_is_refused_by_argparse(tiny_sdxl_file):
    result = dmd2("inspect", str(tiny_sdxl_file), "--prediction-type", "flow")
    assert result.returncode != 0 and "invalid choice" in result.stderr
