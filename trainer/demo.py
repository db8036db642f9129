"""``dmd2 demo``: distill the bundled toy digits teacher into a 4-step LoRA with the real trainer and config system,
then compare teacher and student on the same prompts and seeds: ``outputs/demo/`` gets the LoRA, ``grid.png``
(teacher 50 steps | teacher 4 steps | student 4 steps | student 1 step) and ``report.md`` with metrics and timings."""
from __future__ import annotations

import json
import os
import shutil
import time
from importlib import resources
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from trainer import generate as gen
from trainer.config import load_config
from trainer.export import merge_into_unet, read_lora
from trainer.toy.digits import PROMPT_TEMPLATES, all_prompts, load_digits_32, prompt_for
from trainer.toy.rows import Row, sample_row


def demo_config_path() -> Path:
    return Path(str(resources.files("trainer.toy").joinpath("demo.yaml")))


def write_demo_data(folder: Path) -> tuple[Path, Path]:
    """Prompts (every template for every digit) and the real digits as PNGs with captions (the GAN's real data)."""
    folder.mkdir(parents=True, exist_ok=True)
    # Written only when missing or different, and renamed into place: parallel trainers (make_table.py --jobs) read them.
    prompts, text = folder / "prompts.txt", "\n".join(all_prompts()) + "\n"
    if not prompts.is_file() or prompts.read_text() != text:
        tmp = prompts.with_name(f".{prompts.name}.tmp-{os.getpid()}")
        tmp.write_text(text)
        os.replace(tmp, prompts)
    images_dir = folder / "real_digits"
    images, labels = load_digits_32()
    if not images_dir.is_dir() or len(list(images_dir.glob("*.png"))) != len(images):
        tmp = folder / f".real_digits.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for i, (im, label) in enumerate(zip(gen.to_pil(images), labels.tolist())):
            im.save(tmp / f"{i:04d}.png")
            (tmp / f"{i:04d}.txt").write_text(prompt_for(label, i % len(PROMPT_TEMPLATES)))
        shutil.rmtree(images_dir, ignore_errors=True)
        os.replace(tmp, images_dir)
    return prompts, images_dir


def comparison_grid(columns: list[tuple[str, torch.Tensor]]) -> Image.Image:
    """Columns of images (same prompts and seeds per row) with a title above each column."""
    body = gen.grid([list(r) for r in zip(*(gen.to_pil(images) for _, images in columns))])
    header = 16
    out = Image.new("RGB", (body.width, body.height + header), "white")
    out.paste(body, (0, header))
    draw = ImageDraw.Draw(out)
    cell = body.width / len(columns)
    for i, (title, _) in enumerate(columns):
        draw.text((int(i * cell) + 4, 2), title, fill="black")
    return out


def run_demo(out_dir: str | Path = "outputs/demo", overrides: list[str] = (), eval_images: int = 500) -> Path:
    from trainer.models.loading import load_sdxl
    from trainer.toy.evaluate import ToyEvaluator
    from trainer.toy.teacher import teacher_path
    from trainer.train import train

    out = Path(out_dir)
    prompts, images = write_demo_data(out / "data")
    base = {"model": str(teacher_path()), "prompts": str(prompts), "images": str(images), "output_dir": str(out / "run")}
    cfg = load_config(demo_config_path(), overrides, base=base).validate()
    t0 = time.perf_counter()
    lora = train(cfg)
    train_seconds = time.perf_counter() - t0
    final_lora = shutil.copy2(lora, out / lora.name)

    print("evaluating teacher and student on the same prompts and seeds ...")
    teacher = load_sdxl(cfg.model)
    student = load_sdxl(cfg.model)
    tensors, _ = read_lora(final_lora)
    merge_into_unet(student.unet, tensors)
    ts = tuple(cfg.student.timesteps)
    w = cfg.validation.teacher_cfg
    rows = [(Row("teacher, 50 steps", 50, w), teacher), (Row(f"teacher, {len(ts)} steps", len(ts), w), teacher),
            (Row(f"student, {len(ts)} steps", len(ts), timesteps=ts), student), (Row("student, 1 step", 1, timesteps=ts[:1]), student)]
    digits = [i % 10 for i in range(eval_images)]
    evaluator = ToyEvaluator.load()
    results, columns = [], []
    for row, model in rows:
        images, seconds = sample_row(model, row, digits, seed=cfg.seed, resolution=cfg.resolution)
        scores = evaluator.score(images, digits)
        results.append({"name": row.name, "steps": row.steps, "cfg": row.cfg, **scores, "seconds_per_image": seconds})
        columns.append((row.name, images[:10]))
        print(f"  {row.name:<20} toy FID {scores['toy_fid']:7.2f}  accuracy {scores['accuracy']:.3f}  "
              f"diversity {scores['diversity']:.3f}  {seconds * 1000:.1f} ms/image")
    grid_path = out / "grid.png"
    gen.save_png_atomic(comparison_grid(columns), grid_path)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    report = out / "report.md"
    report.write_text(_report(cfg, results, train_seconds, Path(final_lora).name, eval_images))
    print(f"wrote {report}, {grid_path} and {Path(final_lora).name}")
    return Path(final_lora)


def _report(cfg, results: list[dict], train_seconds: float, lora_name: str, n: int) -> str:
    lines = [
        "# comfy-dmd2 demo: the toy digits teacher distilled into a 4-step LoRA", "",
        f"- LoRA: `{lora_name}` (rank {cfg.lora.rank}, alpha {cfg.lora.alpha}, {cfg.steps} iterations, student timesteps "
        f"{list(cfg.student.timesteps)})",
        f"- training time: {train_seconds / 60:.1f} min on {torch.get_num_threads()} CPU thread(s)",
        f"- evaluation: {n} images per row, digits 0-9 cycled, prompt \"a handwritten digit <word>\", the same seeds in every row; "
        "toy FID = Fréchet distance on the digit classifier's penultimate features against all 1,797 real digits; "
        "accuracy = classifier agrees with the prompted digit; diversity = within-prompt feature spread relative to the real digits'.",
        "", "| row | steps | CFG | toy FID | accuracy | diversity | ms / image |", "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(f"| {r['name']} | {r['steps']} | {r['cfg']:g} | {r['toy_fid']:.2f} | {r['accuracy']:.3f} | {r['diversity']:.3f} | "
                     f"{r['seconds_per_image'] * 1000:.1f} |")
    lines += ["", "![teacher 50 steps | teacher 4 steps | student 4 steps | student 1 step](grid.png)", ""]
    return "\n".join(lines)


