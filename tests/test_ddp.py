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
import yaml
from PIL import Image

pytestmark = pytest.mark.slow


def _run(args, digests: Path, cwd: Path):
    env = dict(os.environ, DMD2_DEBUG_RANK_DIGESTS=str(digests), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "trainer", *map(str, args)], capture_output=True, text=True, env=env, cwd=cwd, timeout=600)


def _digests(folder: Path, step: int) -> list[dict]:
    return [json.loads((folder / f"rank-{r}-step-{step}.json").read_text()) for r in (0, 1)]


def test_two_processes_keep_identical_adapters_and_resume(tmp_path, tiny_sdxl_file):
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "prompts.txt").write_text("a red square\na blue circle\na green triangle\n")
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray((rng.random((40, 48, 3)) * 255).astype("uint8")).save(data / "images" / f"img{i}.png")
    cfg = {"model": str(tiny_sdxl_file), "prompts": str(data / "prompts.txt"), "images": str(data / "images"),
           "output_dir": str(tmp_path / "run"), "steps": 4, "resolution": 32, "batch_size": 1, "seed": 5,
           "lora": {"rank": 4, "alpha": 2}, "checkpoint_every": 2, "validate_every": 4, "keep_checkpoints": 3,
           "optim": {"warmup_steps": 2}, "student": {"update_every": 2}, "validation": {"teacher_steps": 2, "seeds": [0]}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))

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
