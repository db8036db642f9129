"""`dmd2 prepare` and the training data cache: reuse without re-encoding, corrupt images skipped and reported,
SDXL aspect-ratio buckets with their micro-conditioning, resumable teacher samples."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from trainer.config import load_config
from trainer.data import buckets_for
from trainer.prepare import prepare


@pytest.fixture(scope="module")
def tiny_model(tiny_sdxl_file):
    from trainer.models.loading import load_sdxl

    return load_sdxl(tiny_sdxl_file)


def _images(folder: Path, sizes: dict[str, tuple[int, int]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for name, (h, w) in sizes.items():
        Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8")).save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(f"a picture called {name}")
    return folder


def _cfg(tmp_path: Path, model, **extra) -> dict:
    (tmp_path / "prompts.txt").write_text("a red square\na blue circle\n")
    cfg = {"model": str(model), "prompts": str(tmp_path / "prompts.txt"), "output_dir": str(tmp_path / "run"), "resolution": 64,
           "batch_size": 2, "seed": 1, "steps": 2, "lora": {"rank": 4, "alpha": 2}, "checkpoint_every": 0, "validate_every": 0,
           "student": {"update_every": 2}, "optim": {"warmup_steps": 1}}
    cfg.update(extra)
    return cfg


def test_cache_is_reused_without_reencoding(tmp_path, tiny_model, tiny_sdxl_file, capsys):
    images = _images(tmp_path / "images", {"a": (64, 64), "b": (48, 80)})
    cfg = load_config(base=_cfg(tmp_path, tiny_sdxl_file, images=str(images)))
    first = prepare(cfg, tiny_model, progress=False)
    assert first.stats["encoded_prompts"] == 2 + 2 + 1 and first.stats["encoded_images"] == 2  # prompts, validation, uncond
    files = sorted(p for p in first.cache_dir.rglob("*") if p.is_file())
    mtimes = [p.stat().st_mtime_ns for p in files]
    capsys.readouterr()
    second = prepare(cfg, tiny_model, progress=False)
    assert second.stats["encoded_prompts"] == second.stats["encoded_images"] == 0
    assert "data cache reused" in capsys.readouterr().out
    assert [p.stat().st_mtime_ns for p in files] == mtimes and sorted(p for p in first.cache_dir.rglob("*") if p.is_file()) == files
    assert torch.equal(second.cond.index([0, 1]).prompt_embeds, first.cond.index([0, 1]).prompt_embeds)
    # Changing an image's contents (same name) invalidates the image cache only.
    Image.new("RGB", (64, 64), "red").save(images / "a.png")
    third = prepare(cfg, tiny_model, progress=False)
    assert third.stats["encoded_prompts"] == 0 and third.stats["encoded_images"] == 2


def test_buckets_get_the_right_shape_and_time_ids(tmp_path, tiny_model, tiny_sdxl_file):
    images = _images(tmp_path / "images", {"wide": (32, 64), "tall": (64, 32), "square": (50, 50)})
    cfg = load_config(base=_cfg(tmp_path, tiny_sdxl_file, images=str(images)))
    data = prepare(cfg, tiny_model, progress=False)
    grid = buckets_for(64, 16)
    assert (48, 96) in grid and (96, 48) in grid  # SDXL's 2:1-ish buckets scaled to 64 px of side
    real = data.real
    assert sorted(real.buckets) == [(48, 96), (64, 64), (96, 48)]
    for (h, w), lat, cond in zip(real.buckets, real.latents, real.cond):
        assert lat.shape == (1, 4, h // 8, w // 8)
        ids = cond.all().time_ids[0].tolist()
        assert ids[4:] == [h, w]  # target size = the bucket
        if (h, w) == (48, 96):  # "wide" 32x64 scaled by 1.5 to 48x96: no crop needed
            assert ids[:4] == [32, 64, 0, 0]
        if (h, w) == (64, 64):  # "square" 50x50 scaled to 64x64
            assert ids[:4] == [50, 50, 0, 0]
        if (h, w) == (96, 48):
            assert ids[:4] == [64, 32, 0, 0]
    x, c = real.draw(3, torch.Generator().manual_seed(0))  # a batch comes from one bucket
    assert x.shape[0] == 3 and len(c) == 3 and len({tuple(r) for r in c.time_ids[:, 4:].tolist()}) == 1

    # Crops are recorded in resized pixels: a 40x100 image in the 48x96 bucket is scaled to 48x120, 12 px cut per side.
    _images(tmp_path / "crop", {"c": (40, 100)})
    crop_cfg = load_config(base=_cfg(tmp_path, tiny_sdxl_file, images=str(tmp_path / "crop")))
    real = prepare(crop_cfg, tiny_model, progress=False).real
    assert real.buckets == [(48, 96)] and real.cond[0].all().time_ids[0].tolist() == [40, 100, 0, 12, 48, 96]

    # Training draws from these buckets (non-square real latents through the critic and the GAN head).
    from trainer.train import train

    lora = train(load_config(base=_cfg(tmp_path, tiny_sdxl_file, images=str(images), output_dir=str(tmp_path / "train"))))
    assert lora is not None and lora.is_file()


def test_teacher_samples_are_generated_in_parts_and_resume(tmp_path, tiny_model, tiny_sdxl_file):
    from trainer import generate as gen

    cfg = load_config(base=_cfg(tmp_path, tiny_sdxl_file, gan={"real_data": "teacher", "teacher_samples": 5, "teacher_steps": 2},
                                data={"generate_batch_size": 2}))
    call = lambda: gen.unet_call(tiny_model.unet)  # noqa: E731
    first = prepare(cfg, tiny_model, progress=False, teacher_call=call)
    assert first.stats["generated_teacher_samples"] == 5 and len(first.real) == 5
    parts = sorted(first.cache_dir.glob("teacher-*/part-*.safetensors"))
    assert len(parts) == 3
    parts[1].unlink()  # as if the generation had been killed after the first and third parts
    again = prepare(cfg, tiny_model, progress=False, teacher_call=call)
    assert again.stats["generated_teacher_samples"] == 2  # only the missing part
    assert torch.equal(again.real.latents[0], first.real.latents[0])
    done = prepare(cfg, tiny_model, progress=False, teacher_call=call)
    assert done.stats["generated_teacher_samples"] == 0


def test_prepare_cli_skips_corrupt_images_and_train_reuses_the_cache(tmp_path, tiny_sdxl_file):
    images = _images(tmp_path / "images", {"good1": (40, 48), "good2": (48, 40)})
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n definitely not a png")
    (images / "truncated.png").write_bytes((images / "good1.png").read_bytes()[:120])
    cfg = _cfg(tmp_path, tiny_sdxl_file, images=str(images), resolution=32)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    env_run = lambda *a: subprocess.run([sys.executable, "-m", "trainer", *map(str, a)], capture_output=True, text=True, timeout=300)  # noqa: E731

    result = env_run("prepare", "--config", tmp_path / "run.yaml")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "skipped 2 unreadable image(s)" in result.stdout and "broken.png" in result.stdout and "truncated.png" in result.stdout
    assert "cache ready" in result.stdout.splitlines()[-1]
    listed = (tmp_path / "run" / "cache" / "skipped-images.txt").read_text().split()
    assert sorted(Path(p).name for p in listed) == ["broken.png", "truncated.png"]

    # `dmd2 train` still refuses by default; with the option it trains on the cache and reports the skipped files.
    refused = env_run("train", "--config", tmp_path / "run.yaml")
    assert refused.returncode == 2 and "cannot read image" in refused.stderr.strip().splitlines()[-1]
    result = env_run("train", "--config", tmp_path / "run.yaml", "--set", "data.skip_unreadable_images=true")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "data cache reused" in result.stdout and "broken.png" in result.stdout and "encoded" not in result.stdout
    assert result.stdout.strip().splitlines()[-1].startswith("LoRA: ")
