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
from typing import Sequence

import torch
from PIL import Image, ImageDraw
from safetensors import safe_open

from trainer import generate as gen
from trainer.config import dump_yaml, load_config
from trainer.errors import DMD2Error
from trainer.export import save_safetensors_atomic, with_lora
from trainer.files import write_text_atomic
from trainer.toy.digits import PROMPT_TEMPLATES, all_prompts, load_digits_32, prompt_for
from trainer.toy.recipes import DEMO_RECIPES, ONE_STEP, override
from trainer.toy.rows import Row, sample_row
from trainer.toy.targets import checks_table, few_step_checks, one_step_checks


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


def demo_configs(out: Path, overrides: Sequence[str] = (), recipe: str = "demo"):
    """The 4-step student's config (demo.yaml + the recipe's + ``overrides``, trained into ``out/run``) and the 1-step
    student's (``run-1step``; the recipe's, ``overrides``, then its one timestep)."""
    from trainer.toy.teacher import teacher_path

    if recipe not in DEMO_RECIPES:
        raise DMD2Error(f"unknown demo recipe {recipe!r}: choose one of {', '.join(DEMO_RECIPES)}")
    four_step, one_step = DEMO_RECIPES[recipe]
    prompts, images = write_demo_data(out / "data")

    def config(run: str, extra: list[str]):
        base = {"model": str(teacher_path()), "prompts": str(prompts), "images": str(images), "output_dir": str(out / run)}
        return load_config(demo_config_path(), extra, base=base).validate()

    return config("run", [*four_step, *overrides]), config("run-1step", [*one_step, *overrides, *ONE_STEP])


def demo_rows(cfg, cfg_one) -> list[Row]:
    """The report's rows in its order: the teacher at 50 steps and at the 4-step student's count, the 4-step and the
    1-step student (each sampled at the timesteps it trained at), the teacher at 1 step; the teacher at the validation
    CFG. The first four are the grid's columns."""
    ts, ts_one, w = tuple(cfg.student.timesteps), tuple(cfg_one.student.timesteps), cfg.validation.teacher_cfg
    return [Row("teacher, 50 steps", 50, w), Row(f"teacher, {len(ts)} steps", len(ts), w),
            Row(f"student, {len(ts)} steps", len(ts), timesteps=ts), Row("student, 1 step", 1, timesteps=ts_one),
            Row("teacher, 1 step", 1, w)]


def evaluate_rows(rows: list[tuple[Row, object]], cfg, n: int) -> list[dict]:
    """Sample each ``(row, model)`` for the same ``n`` prompted digits (0-9 cycled) and seeds and score it; each result
    keeps its first ten images (one per digit) for the grid."""
    from trainer.toy.evaluate import ToyEvaluator

    digits = [i % 10 for i in range(n)]
    evaluator = ToyEvaluator.load()
    results = []
    for row, model in rows:
        images, seconds = sample_row(model, row, digits, seed=cfg.seed, resolution=cfg.resolution)
        results.append({"name": row.name, "steps": row.steps, "cfg": row.cfg, **evaluator.score(images, digits),
                        "seconds_per_image": seconds, "images": images[:10]})
    return results


def run_demo(out_dir: str | Path = "outputs/demo", overrides: Sequence[str] = (), eval_images: int = 1000,
             recipe: str = "demo") -> Path:
    """Train the 4-step student (the demo's LoRA, in ``out_dir``) and a 1-step student (in ``out_dir/run-1step/``),
    then compare both with the teacher; returns the 4-step LoRA. ``recipe`` names the students' overrides on top of
    demo.yaml (``trainer.toy.recipes.DEMO_RECIPES``). On a CPU with 2+ threads the work is split between two processes
    (`_in_two_processes`); on a GPU (or one thread) it all runs here, one after the other."""
    from trainer.models.loading import load_sdxl
    from trainer.train import train

    out = Path(out_dir)
    cfg, cfg_one = demo_configs(out, overrides, recipe)
    rows = demo_rows(cfg, cfg_one)
    if torch.cuda.is_available() or torch.get_num_threads() < 2:
        t0 = time.perf_counter()
        lora, lora_one = _trained(train(cfg)), _trained(train(cfg_one))
        train_seconds, how = time.perf_counter() - t0, "one after the other"
        final_lora = Path(shutil.copy2(lora, out / lora.name))
        print("evaluating teacher and students on the same prompts and seeds ...")
        teacher = load_sdxl(cfg.model)
        _, _, student, student_one, _ = rows
        models = {student: with_lora(teacher, final_lora)[0], student_one: with_lora(teacher, lora_one)[0]}
        results = evaluate_rows([(row, models.get(row, teacher)) for row in rows], cfg, eval_images)
    else:
        final_lora, lora_one, results, train_seconds, how = _in_two_processes(cfg, cfg_one, rows, out, overrides, eval_images, recipe)
    for r in results:
        print(f"  {r['name']:<20} toy FID {r['toy_fid']:7.2f}  accuracy {r['accuracy']:.3f}  "
              f"diversity {r['diversity']:.3f}  {r['seconds_per_image'] * 1000:.1f} ms/image")
    grid_path = out / "grid.png"
    gen.save_png_atomic(comparison_grid([(r["name"], r["images"]) for r in results[:4]]), grid_path)
    scores = [{k: v for k, v in r.items() if k != "images"} for r in results]
    write_text_atomic(out / "results.json", json.dumps(scores, indent=2))
    report = write_text_atomic(out / "report.md", _report(cfg, cfg_one, scores, train_seconds, how, final_lora.name,
                                                          lora_one.relative_to(out), eval_images, recipe))
    print(f"wrote {report}, {grid_path} and {final_lora.name}")
    return final_lora


def _in_two_processes(cfg, cfg_one, rows: list[Row], out: Path, overrides: Sequence[str], eval_images: int, recipe: str):
    """The demo on a CPU with 2+ threads (torch's count, which follows OMP_NUM_THREADS), in two processes on half the
    threads each: the toy's small convolutions leave most of a second thread idle, so the 4-step student trains about
    as fast on one thread as on two (benchmarks/toy/NOTES.md, points 42 and 66). This one trains the 4-step student and
    samples it and the teacher's few-step rows; a second one (`second_process`) trains the 1-step student, which has no
    backward simulation and finishes a minute or more earlier, and samples it and the teacher's 50-step row, the
    costliest. Returns the 4-step LoRA, the 1-step one, the rows' results, the training time and how it ran."""
    from trainer.models.loading import load_sdxl
    from trainer.train import train

    _, teacher_few, student, student_one, teacher_1 = rows  # the second process samples the 50-step row
    threads = torch.get_num_threads()
    mine, theirs = threads - threads // 2, threads // 2
    rows_file, log = out / "second-process-rows.safetensors", out / "run-1step.log"
    write_text_atomic(out / "run-1step.yaml", dump_yaml(cfg_one))  # the 1-step student's config, for `dmd2 train`
    argv = [sys.executable, "-m", "trainer", "demo", "--out", str(out), *(a for o in overrides for a in ("--set", o)),
            "--recipe", recipe, "--eval-images", str(eval_images), "--second-process", str(rows_file)]
    t0 = time.perf_counter()
    proc = start_logged(argv, log, theirs)
    print(f"training the 1-step student in a second process (log: {log})", flush=True)
    try:
        torch.set_num_threads(mine)
        lora = _trained(train(cfg))
        train_seconds = time.perf_counter() - t0
        final_lora = Path(shutil.copy2(lora, out / lora.name))
        print("evaluating the 4-step student and the teacher at few steps ...", flush=True)
        teacher = load_sdxl(cfg.model)
        pairs = [(teacher_few, teacher), (student, with_lora(teacher, final_lora)[0]), (teacher_1, teacher)]
        mine_done = evaluate_rows(pairs, cfg, eval_images)
    except BaseException:  # also Ctrl-C; a stopped trainer leaves no half-written checkpoint (temp folder + rename)
        proc.terminate()
        proc.wait()
        raise
    finally:
        torch.set_num_threads(threads)
    print("waiting for the second process (1-step student, teacher at 50 steps) ...", flush=True)
    if proc.wait() != 0:
        raise DMD2Error(f"the demo's second process (1-step student, teacher at 50 steps) failed (log: {log}): {last_error(log)}")
    theirs_done, their_seconds = read_rows(rows_file)
    rows_file.unlink()
    by_name = {r["name"]: r for r in [*mine_done, *theirs_done]}
    how = (f"side by side in two processes, {mine} and {theirs} CPU thread(s), each then sampling its student and some of the "
           "teacher's rows while the other worked (ms / image: on that process's threads)")
    lora_one = sorted(Path(cfg_one.output_dir).glob("dmd2_*_lora.safetensors"))[-1]
    return final_lora, lora_one, [by_name[row.name] for row in rows], max(train_seconds, their_seconds), how


def second_process(out_dir: str | Path, overrides: Sequence[str], eval_images: int, rows_file: str | Path,
                   recipe: str = "demo") -> None:
    """The demo's second CPU process (`dmd2 demo ... --second-process FILE`): train the 1-step student, sample and
    score it and the teacher at 50 steps, and write their scores, first images and the training time to ``rows_file``."""
    from trainer.models.loading import load_sdxl
    from trainer.train import train

    cfg, cfg_one = demo_configs(Path(out_dir), overrides, recipe)
    teacher_50, _, _, student_one, _ = demo_rows(cfg, cfg_one)
    t0 = time.perf_counter()
    lora_one = _trained(train(cfg_one))
    train_seconds = time.perf_counter() - t0
    print(f"LoRA: {lora_one}\nsampling the 1-step student and the teacher at 50 steps ...", flush=True)
    teacher = load_sdxl(cfg.model)
    results = evaluate_rows([(student_one, with_lora(teacher, lora_one)[0]), (teacher_50, teacher)], cfg, eval_images)
    tensors = {f"row{i}": r.pop("images").contiguous() for i, r in enumerate(results)}
    save_safetensors_atomic(tensors, rows_file, {"results": json.dumps(results), "train_seconds": repr(train_seconds)})


def read_rows(rows_file: Path) -> tuple[list[dict], float]:
    """``second_process``'s rows (each with its first images again) and its training time."""
    with safe_open(rows_file, "pt") as f:
        meta = f.metadata()
        results = json.loads(meta["results"])
        for i, r in enumerate(results):
            r["images"] = f.get_tensor(f"row{i}")
    return results, float(meta["train_seconds"])


def start_logged(argv: list[str], log: Path, threads: int) -> subprocess.Popen:
    """Start ``argv`` on ``threads`` CPU threads (OMP_NUM_THREADS) with its stdout and stderr going to ``log`` (also
    used by benchmarks/toy/make_table.py's parallel training)."""
    with log.open("w") as f:
        return subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env=dict(os.environ, OMP_NUM_THREADS=str(threads)))


def last_error(log: Path) -> str:
    """A failed process's last log line (a command's one-line error), without its ``error: `` prefix."""
    last = log.read_text().strip().splitlines()[-1:] or ["(no output)"]
    return last[0].removeprefix("error: ")


def trained_or_exit(lora: Path | None, what: str, checkpoints: Path) -> Path:
    """``train``'s LoRA, or a one-line exit when Ctrl-C stopped it (it kept a checkpoint and returned None), for the
    benchmark commands that would otherwise go on to their next student or to scoring."""
    if lora is None:
        raise SystemExit(f"error: {what} stopped at Ctrl-C (checkpoint kept in {checkpoints}): run the same command again to resume")
    return lora


def _trained(lora: Path | None) -> Path:
    if lora is None:  # the trainer saved a checkpoint on Ctrl-C and returned
        raise KeyboardInterrupt
    return lora


def _report(cfg, cfg_one, results: list[dict], train_seconds: float, how: str, lora_name: str, lora_one: Path, n: int,
            recipe: str) -> str:
    lines = [
        "# comfy-dmd2 demo: the toy digits teacher distilled into a 4-step and a 1-step LoRA", "",
        f"- LoRA: `{lora_name}` (rank {cfg.lora.rank}, alpha {cfg.lora.alpha}, {cfg.steps:,} iterations, student timesteps "
        f"{list(cfg.student.timesteps)}); the 1-step student ({cfg_one.steps:,} iterations, timestep {cfg_one.student.timesteps[0]}): "
        f"`{lora_one.as_posix()}`; recipe: {recipe} (`dmd2 demo --recipe`), each student's whole config in its run folder's "
        "config.yaml",
        f"- training time: {train_seconds / 60:.1f} min for both students, {how}",
        f"- evaluation: {n} images per row, digits 0-9 cycled, prompt \"a handwritten digit <word>\", the same seeds in every row; "
        "toy FID = Fréchet distance on the digit classifier's penultimate features against all 1,797 real digits; "
        "accuracy = classifier agrees with the prompted digit; diversity = within-prompt feature spread relative to the real digits'.",
        "", "| row | steps | CFG | toy FID | FID / teacher 50 steps | accuracy | diversity | ms / image |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    reference = results[0]["toy_fid"]  # the teacher at 50 steps (demo_rows' first row)
    for r in results:
        lines.append(f"| {r['name']} | {r['steps']} | {r['cfg']:g} | {r['toy_fid']:.2f} | {r['toy_fid'] / reference:.2f}x | "
                     f"{r['accuracy']:.3f} | {r['diversity']:.3f} | "
                     f"{r['seconds_per_image'] * 1000:.1f} |")
    teacher_50, teacher_few, student, student_one, teacher_1 = results  # demo_rows' order
    steps = len(cfg.student.timesteps)
    checks = (few_step_checks(student, teacher_50, teacher_few, f"student {steps}-step", steps)
              + one_step_checks(student_one, teacher_50, teacher_1))
    lines += ["", "## Targets (the DMD2 paper's claim in miniature, at this report's one sampling seed)", "",
              *checks_table(checks)]
    if not all(c.met for c in checks):
        long_four, long_one = (int(override(o, "steps")) for o in DEMO_RECIPES["long"])
        lines += ["", "Why the misses: benchmarks/toy/NOTES.md." + (
            " The default recipe is sized for a 10-minute demo on a 2-core CPU; on the bundled teacher the targets were met"
            f" by the long recipe (`dmd2 demo --recipe long`: {long_four:,} and {long_one:,} iterations against this run's"
            f" {cfg.steps:,} and {cfg_one.steps:,}; points 66 and 87)." if recipe == "demo" else "")]
    lines += ["", "![teacher 50 steps | teacher 4 steps | student 4 steps | student 1 step](grid.png)", ""]
    return "\n".join(lines)
