"""Data parallelism on CPU: two gloo processes through `dmd2 train --num-processes 2` (which runs `accelerate launch`).
Adapters, critic and GAN head must stay bit-identical on both ranks, checkpoints and the LoRA are written once, and a
resumed two-process run ends exactly where the straight one did."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

pytestmark = pytest.mark.slow


def _run(args, digests: Path, cwd: Path):
    env = dict(os.environ, DMD2_DEBUG_RANK_DIGESTS=str(digests), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "trainer", *map(str, args)], capture_output=True, text=True, env=env, cwd=cwd, timeout=600)


def _digests(folder: Path, step: int) -> list[dict]:
    return [json.loads((folder / f"rank-{r}-step-{step}.json").read_text()) for r in (0, 1)]


def _config(tmp_path: Path, tiny_sdxl_file: Path, **extra) -> Path:
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "prompts.txt").write_text("a red square\na blue circle\na green triangle\n")
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray((rng.random((40, 48, 3)) * 255).astype("uint8")).save(data / "images" / f"img{i}.png")
    cfg = {"model": str(tiny_sdxl_file), "prompts": str(data / "prompts.txt"), "images": str(data / "images"),
           "output_dir": str(tmp_path / "run"), "steps": 4, "resolution": 32, "batch_size": 1, "seed": 5,
           "lora": {"rank": 4, "alpha": 2}, "checkpoint_every": 2, "validate_every": 4, "keep_checkpoints": 3,
           "optim": {"warmup_steps": 2}, "student": {"update_every": 2}, "validation": {"teacher_steps": 2, "seeds": [0]}, **extra}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    return tmp_path / "run.yaml"


def test_two_processes_keep_identical_adapters_and_resume(tmp_path, tiny_sdxl_file):
    _config(tmp_path, tiny_sdxl_file)
    result = _run(["train", "--config", tmp_path / "run.yaml", "--num-processes", "2"], tmp_path / "d1", tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    straight = _digests(tmp_path / "d1", 4)
    assert straight[0]["world"] == 2 and straight[0] == straight[1], "ranks diverged"
    assert result.stdout.count("LoRA: ") == 1  # reported (and written) once
    run = tmp_path / "run"
    assert len(list(run.glob("*.safetensors"))) == 1
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000002", "step-00000004"]
    assert sorted(p.name for p in (run / "validation").iterdir()) == ["step-00000004.png"]  # main process only

    # Resume the same run from its step-2 checkpoint, again with two processes: same end state, bit for bit.
    shutil.rmtree(run / "checkpoints" / "step-00000004")
    result = _run(["train", "--config", tmp_path / "run.yaml", "--num-processes", "2", "--resume", "latest"], tmp_path / "d2", tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "resumed from" in result.stdout and "at step 2" in result.stdout
    resumed = _digests(tmp_path / "d2", 4)
    assert resumed[0] == resumed[1] == straight[0]


def test_two_processes_with_one_critic_per_student_step(tmp_path, tiny_sdxl_file):
    """With a critic per student step, both ranks train the critic of the step they drew (the same one) and leave
    the other critics exactly as they were: an all-reduced zero gradient would still move them (AdamW's weight decay
    and momentum). So from one checkpoint to the next exactly one critic adapter changes."""
    from safetensors.torch import load_file

    from trainer.models.roles import critic_adapter_names

    config = _config(tmp_path, tiny_sdxl_file, steps=4, checkpoint_every=1, keep_checkpoints=10, validate_every=0,
                     dmd={"critic_per_step": True, "critic_loss": "x0_high_noise"})
    result = _run(["train", "--config", config, "--num-processes", "2"], tmp_path / "d1", tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    digests = _digests(tmp_path / "d1", 4)
    assert digests[0] == digests[1], "ranks diverged"
    names = critic_adapter_names(4)
    saved = [load_file(tmp_path / "run" / "checkpoints" / f"step-{s:08d}" / "critic.safetensors") for s in (1, 2, 3, 4)]
    for before, after in zip(saved, saved[1:]):
        changed = [name for name in names if any(not torch.equal(before[k], after[k]) for k in before if f".{name}." in k)]
        assert len(changed) == 1, changed
