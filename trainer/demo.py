"""``dmd2 demo``: distill the bundled toy digits teacher into a 4-step LoRA (and a 1-step one) with the real trainer and
config system, then compare teacher and students on the same prompts and seeds: ``outputs/demo/`` gets the 4-step
LoRA, ``grid.png`` (teacher 50 steps | teacher 4 steps | student 4 steps | student 1 step), ``report.md`` with metrics
and timings, and the 1-step student's run in ``run-1step/``."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from trainer import generate as gen
from trainer.config import dump_yaml, load_config
from trainer.errors import DMD2Error
from trainer.export import with_lora
from trainer.files import write_text_atomic
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
        write_text_atomic(prompts, text)
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


# The 1-step student on top of demo.yaml: DMD2's 1-step recipe (pure noise in, one step), with the noise read at
# t = 599 rather than DMD2's 399. On the small teachers 599 trains faster and ends level or far better (NOTES.md
# points 13, 51 and 52); the LoRA records it, so `dmd2 generate` and the nodes' "from LoRA" choice sample it there.
ONE_STEP = ["student.timesteps=[599]"]


def run_demo(out_dir: str | Path = "outputs/demo", overrides: list[str] = (), eval_images: int = 1000) -> Path:
    """Train the 4-step student (the demo's LoRA, in ``out_dir``) and a 1-step student (in ``out_dir/run-1step/``),
    then compare both with the teacher; returns the 4-step LoRA."""
    from trainer.models.loading import load_sdxl
    from trainer.toy.evaluate import ToyEvaluator
    from trainer.toy.teacher import teacher_path

    out = Path(out_dir)
    prompts, images = write_demo_data(out / "data")

    def config(run: str, extra: list[str]):
        base = {"model": str(teacher_path()), "prompts": str(prompts), "images": str(images), "output_dir": str(out / run)}
        return load_config(demo_config_path(), [*overrides, *extra], base=base).validate()

    cfg, cfg_one = config("run", []), config("run-1step", ONE_STEP)
    t0 = time.perf_counter()
    lora, lora_one, how = _train_students(cfg, cfg_one, out)
    train_seconds = time.perf_counter() - t0
    final_lora = shutil.copy2(lora, out / lora.name)

    print("evaluating teacher and students on the same prompts and seeds ...")
    teacher = load_sdxl(cfg.model)
    students = [with_lora(teacher, path)[0] for path in (final_lora, lora_one)]
    ts, ts_one, w = tuple(cfg.student.timesteps), tuple(cfg_one.student.timesteps), cfg.validation.teacher_cfg
    # the grid's four columns, then the report's extra row: the teacher at the 1-step student's step count
    rows = [(Row("teacher, 50 steps", 50, w), teacher), (Row(f"teacher, {len(ts)} steps", len(ts), w), teacher),
            (Row(f"student, {len(ts)} steps", len(ts), timesteps=ts), students[0]),
            (Row("student, 1 step", 1, timesteps=ts_one), students[1]), (Row("teacher, 1 step", 1, w), teacher)]
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
    gen.save_png_atomic(comparison_grid(columns[:4]), grid_path)
    write_text_atomic(out / "results.json", json.dumps(results, indent=2))
    report = write_text_atomic(out / "report.md", _report(cfg, cfg_one, results, train_seconds, how, Path(final_lora).name, lora_one.relative_to(out), eval_images))
    print(f"wrote {report}, {grid_path} and {Path(final_lora).name}")
    return Path(final_lora)


def _train_students(cfg, cfg_one, out: Path) -> tuple[Path, Path, str]:
    """Both students' LoRAs, and how they were trained. On a CPU with 2+ threads (torch's count, which follows
    OMP_NUM_THREADS) they train side by side, the 1-step one in a second process, each on half the threads: the toy's
    small convolutions leave most of a second thread idle, so both finish in about the time the 4-step student alone
    takes on all of them (benchmarks/toy/NOTES.md, point 42). On a GPU, one after the other."""
    from trainer.train import train

    threads = torch.get_num_threads()
    if torch.cuda.is_available() or threads < 2:
        return _trained(train(cfg)), _trained(train(cfg_one)), "one after the other"
    mine, theirs = threads - threads // 2, threads // 2
    config_file, log = out / "run-1step.yaml", out / "run-1step.log"
    write_text_atomic(config_file, dump_yaml(cfg_one))
    proc = start_logged([sys.executable, "-m", "trainer", "train", "--config", str(config_file)], log, theirs)
    print(f"training the 1-step student in a second process (log: {log})", flush=True)
    try:
        torch.set_num_threads(mine)
        lora = _trained(train(cfg))
    except BaseException:  # also Ctrl-C; a stopped trainer leaves no half-written checkpoint (temp folder + rename)
        proc.terminate()
        proc.wait()
        raise
    finally:
        torch.set_num_threads(threads)
    print("waiting for the 1-step student ...", flush=True)
    if proc.wait() != 0:
        raise DMD2Error(f"the 1-step student's training failed (log: {log}): {last_error(log)}")
    found = sorted(Path(cfg_one.output_dir).glob("dmd2_*_lora.safetensors"))
    return lora, found[-1], f"side by side in two processes, {mine} and {theirs} CPU thread(s)"


def start_logged(argv: list[str], log: Path, threads: int) -> subprocess.Popen:
    """Start ``argv`` on ``threads`` CPU threads (OMP_NUM_THREADS) with its stdout and stderr going to ``log`` (also
    used by benchmarks/toy/make_table.py's parallel training)."""
    with log.open("w") as f:
        return subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env=dict(os.environ, OMP_NUM_THREADS=str(threads)))


def last_error(log: Path) -> str:
    """A failed process's last log line (a command's one-line error), without its ``error: `` prefix."""
    last = log.read_text().strip().splitlines()[-1:] or ["(no output)"]
    return last[0].removeprefix("error: ")


def _trained(lora: Path | None) -> Path:
    if lora is None:  # the trainer saved a checkpoint on Ctrl-C and returned
        raise KeyboardInterrupt
    return lora


def _report(cfg, cfg_one, results: list[dict], train_seconds: float, how: str, lora_name: str, lora_one: Path, n: int) -> str:
    lines = [
        "# comfy-dmd2 demo: the toy digits teacher distilled into a 4-step and a 1-step LoRA", "",
        f"- LoRA: `{lora_name}` (rank {cfg.lora.rank}, alpha {cfg.lora.alpha}, {cfg.steps} iterations, student timesteps "
        f"{list(cfg.student.timesteps)}); the 1-step student (timestep {cfg_one.student.timesteps[0]}, the same config otherwise): "
        f"`{lora_one.as_posix()}`",
        f"- training time: {train_seconds / 60:.1f} min for both students, {how}",
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
