"""`dmd2 generate` and `dmd2 export --merge` from the command line, and the prompt-file formats."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from PIL import Image

from trainer.data import read_prompts
from trainer.errors import DataError
from trainer.export import kohya_state_dict, merge_into_unet, recipe_metadata, save_safetensors_atomic
from trainer.models.loading import load_sdxl
from trainer.models.roles import STUDENT, DMD2Roles, unet_forward


def _dmd2(*args):
    return subprocess.run([sys.executable, "-m", "trainer", *map(str, args)], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def lora_file(tiny_sdxl_file, tmp_path_factory):
    model = load_sdxl(tiny_sdxl_file)
    roles = DMD2Roles(model.unet, rank=4, alpha=2)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in roles.student_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    path = tmp_path_factory.mktemp("lora") / "student.safetensors"
    meta = recipe_metadata(timesteps=[999, 499], rank=4, alpha=2, training_steps=1, teacher="tiny", teacher_hash="0" * 64,
                           prediction_type="epsilon")
    return save_safetensors_atomic(kohya_state_dict(roles.unet, STUDENT, torch.float32), path, meta)


def test_generate_student_and_teacher(tmp_path, tiny_sdxl_file, lora_file):
    student = _dmd2("generate", "--model", tiny_sdxl_file, "--lora", lora_file, "--prompt", "a cat", "--seed", 3, "--out", tmp_path / "s.png")
    assert student.returncode == 0, student.stderr[-1500:]
    assert student.stdout.strip().splitlines()[-1] == str(tmp_path / "s.png")
    teacher = _dmd2("generate", "--model", tiny_sdxl_file, "--teacher-steps", 3, "--cfg", 2, "--prompt", "a cat", "--out", tmp_path / "t.png")
    assert teacher.returncode == 0, teacher.stderr[-1500:]
    a, b = Image.open(tmp_path / "s.png"), Image.open(tmp_path / "t.png")
    assert a.size == b.size and a.size[0] >= 32
    again = _dmd2("generate", "--model", tiny_sdxl_file, "--lora", lora_file, "--prompt", "a cat", "--seed", 3, "--out", tmp_path / "s2.png")
    assert again.returncode == 0 and Image.open(tmp_path / "s2.png").tobytes() == a.tobytes()  # seeded: reproducible
    nothing = _dmd2("generate", "--model", tiny_sdxl_file, "--prompt", "a cat", "--out", tmp_path / "x.png")
    assert nothing.returncode == 2 and nothing.stderr.strip().startswith("error: nothing to sample")


def test_export_merge_writes_a_checkpoint_the_loader_reads(tmp_path, tiny_sdxl_file, lora_file):
    result = _dmd2("export", "--merge", "--model", tiny_sdxl_file, "--lora", lora_file, "--dtype", "fp32", "--out", tmp_path / "merged.safetensors")
    assert result.returncode == 0, result.stderr[-1500:]
    merged = load_sdxl(tmp_path / "merged.safetensors")
    reference = load_sdxl(tiny_sdxl_file)
    from trainer.export import read_lora

    merge_into_unet(reference.unet, read_lora(lora_file)[0])
    from trainer.conditioning import encode_prompts

    cond = encode_prompts(reference, ["a cat"], 32)
    x, t = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([500])
    torch.testing.assert_close(unet_forward(merged.unet, x, t, cond), unet_forward(reference.unet, x, t, cond), rtol=1e-5, atol=1e-5)
    for a, b in ((merged.vae, reference.vae), (merged.text_encoder_2, reference.text_encoder_2)):
        for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
            assert ka == kb and torch.equal(va, vb)


def test_prompt_files(tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n\n  a dog  \n")
    assert read_prompts(tmp_path / "p.txt") == ["a cat", "a dog"]
    (tmp_path / "p.jsonl").write_text('{"prompt": "a cat"}\n{"prompt": "a dog", "seed": 3}\n')
    assert read_prompts(tmp_path / "p.jsonl") == ["a cat", "a dog"]
    (tmp_path / "bad.jsonl").write_text('{"text": "a cat"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:1 is not a JSON object with a \"prompt\" field"):
        read_prompts(tmp_path / "bad.jsonl")
    with pytest.raises(DataError, match="does not exist"):
        read_prompts(tmp_path / "missing.txt")
