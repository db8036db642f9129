"""Where a few-step student loses to its teacher: hand the sampling over between the two at each of the student's
timesteps and score every hand-over like a table row (NOTES.md point 31).

    python benchmarks/toy/handoff.py outputs/toy_table/student-4/dmd2_digits_teacher_4step_lora.safetensors --seeds 0,1

For a student with timesteps t_1 > ... > t_n (sigmas s_1 > ... > s_n, s_{n+1} = 0) the rows are:
- "student k, then teacher": the student's first k DMD2 steps (its last x0 re-noised to s_{k+1}, as its own sampler
  does), then the teacher's Euler grid (the table's best row: 50 steps, CFG 1.5) below s_{k+1}.
- "teacher, then student from k+1": the teacher's Euler grid down to s_{k+1}, then the student's steps from t_{k+1}.
- the control "teacher x0 at t_1, then teacher": the teacher's own one-step prediction at t_1, re-noised to s_2 and
  finished by the teacher: what a hand-over at s_2 keeps of whatever the first step predicted.
k = n is the plain student, "teacher, then student from n+1" the plain teacher row: both reproduce those rows exactly.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch
from torch import Tensor

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]

from trainer import generate as gen  # noqa: E402
from trainer import sampling  # noqa: E402
from trainer.errors import DMD2Error  # noqa: E402
from trainer.export import merge_into_unet, read_lora  # noqa: E402
from trainer.files import write_text_atomic  # noqa: E402
from trainer.models.loading import load_sdxl  # noqa: E402
from trainer.toy.evaluate import images_per_row  # noqa: E402
from trainer.toy.rows import sample_digits  # noqa: E402
from trainer.toy.teacher import teacher_path  # noqa: E402
from make_table import load_evaluators, seed_list  # noqa: E402


def student_then_teacher(student: sampling.Denoiser, teacher: sampling.Denoiser, student_sigmas: Tensor,
                         teacher_grid: Tensor, k: int, noise) -> Tensor:
    """The student's first ``k`` steps, then the teacher's Euler grid below the sigma they were re-noised to."""
    x = sampling.initial_latent(noise(), student_sigmas[0])
    x = sampling.sample_dmd2(student, x, student_sigmas[: k + 1], noise)
    handover = student_sigmas[k:k + 1]
    return sampling.sample_euler(teacher, x, torch.cat([handover, teacher_grid[teacher_grid < handover]]))


def teacher_then_student(teacher: sampling.Denoiser, student: sampling.Denoiser, student_sigmas: Tensor,
                         teacher_grid: Tensor, k: int, noise) -> Tensor:
    """The teacher's Euler grid down to the student's sigma ``k`` (0-based), then the student's steps from there."""
    handover = student_sigmas[k:k + 1]
    x = sampling.initial_latent(noise(), teacher_grid[0])
    x = sampling.sample_euler(teacher, x, torch.cat([teacher_grid[teacher_grid > handover], handover]))
    return sampling.sample_dmd2(student, x, student_sigmas[k:], noise)


def rows_for(n: int) -> list[tuple[str, str, int]]:
    """(name, order, k) of every hand-over for an n-step student, plain student first and plain teacher last."""
    rows = [(f"student {k}, then teacher" if k < n else "student (plain)", "student_first", k) for k in range(n, 0, -1)]
    rows += [(f"teacher, then student from step {k + 1}", "teacher_first", k) for k in range(1, n)]
    return rows + [("teacher (plain)", "teacher_first", n), ("control: teacher x0 at t_1, then teacher", "teacher_only", 1)]


def sample(model, student_unet, row: tuple[str, str, int], timesteps, digits, seed: int, cfg: float,
           teacher_steps: int) -> Tensor:
    """Images [N, 3, H, W] for one hand-over row, with the noise draws of the table's rows (``sample_digits``)."""
    _, order, k = row
    student_sigmas = sampling.sigmas_for_timesteps(model.schedule.sigmas, timesteps)
    teacher_grid = sampling.teacher_sigmas(model.schedule.sigmas, teacher_steps)

    def draw(cond, seeds, shape) -> Tensor:
        noise = gen.seeded_noise(seeds, shape)
        teacher = gen.make_denoiser(gen.unet_call(model.unet), model.schedule, cond, guidance_scale=cfg, uncond=cond.zeros_like())
        student = gen.make_denoiser(gen.unet_call(student_unet), model.schedule, cond)
        if order == "student_first":
            return student_then_teacher(student, teacher, student_sigmas, teacher_grid, k, noise)
        if order == "teacher_first":
            return teacher_then_student(teacher, student, student_sigmas, teacher_grid, k, noise)
        return student_then_teacher(teacher, teacher, student_sigmas, teacher_grid, k, noise)  # the control

    return sample_digits(model, digits, draw, seed=seed)[0]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("lora", help="the student's LoRA (as `dmd2 train` or `dmd2 demo` writes it)")
    p.add_argument("--teacher", default=str(teacher_path()), help="the teacher it was distilled from (default: the bundled one)")
    p.add_argument("--cfg", type=float, default=1.5, help="the teacher's CFG (the table's best 50-step row: 1.5)")
    p.add_argument("--teacher-steps", type=int, default=50, help="the teacher's Euler grid")
    p.add_argument("--seeds", type=seed_list, default=(0,), metavar="S,S,...", help="sampling seeds")
    p.add_argument("--n", type=images_per_row, default=1000, help="images per row and seed (digits 0-9 in turn)")
    p.add_argument("--json", type=Path, help="also write the rows here")
    args = p.parse_args(argv)
    try:
        tensors, meta = read_lora(args.lora)
        model = load_sdxl(args.teacher)
    except DMD2Error as exc:
        p.error(str(exc))
    if "dmd2.timesteps" not in meta:
        p.error(f"{args.lora} has no dmd2.timesteps in its metadata: pass a LoRA that `dmd2 train` or `dmd2 demo` wrote")
    timesteps = tuple(json.loads(meta["dmd2.timesteps"]))
    student_unet = copy.deepcopy(model.unet)
    merge_into_unet(student_unet, tensors)
    evaluators = load_evaluators()
    digits = [i % 10 for i in range(args.n)]
    results = []
    print(f"student timesteps {list(timesteps)}; teacher {args.teacher_steps} Euler steps at CFG {args.cfg}; "
          f"{args.n} images per row and seed; toy FID by the committed classifier / seed 1 / seed 2, accuracy, diversity")
    for seed in args.seeds:
        for row in rows_for(len(timesteps)):
            images = sample(model, student_unet, row, timesteps, digits, seed, args.cfg, args.teacher_steps)
            scores = {name: ev.score(images, digits) for name, ev in evaluators.items()}
            rec = {"row": row[0], "seed": seed, **{name: round(s["toy_fid"], 4) for name, s in scores.items()},
                   "accuracy": round(scores["committed"]["accuracy"], 4), "diversity": round(scores["committed"]["diversity"], 4)}
            results.append(rec)
            print(f"seed {seed}  {row[0]:<42} {rec['committed']:5.2f} / {rec['seed1']:5.2f} / {rec['seed2']:5.2f}  "
                  f"accuracy {rec['accuracy']:.3f}  diversity {rec['diversity']:.3f}", flush=True)
    if args.json:
        write_text_atomic(args.json, json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
