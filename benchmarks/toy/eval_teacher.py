"""Score the bundled toy teacher with the toy evaluator: a CFG sweep at 50 steps and few-step rows.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/toy/eval_teacher.py                # 1,000 images per row
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/toy/eval_teacher.py --n 200 --rows 50:4.5

Each row: digits 0..9 cycled (100 images per digit at n=1000), seed 0 (same initial noise in every row), Euler on
the teacher sigmas, CFG against all-zero embeddings. Prints a markdown table and writes JSON + sample grids to
outputs/toy_eval/.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from trainer.toy.digits import to_uint8_grid  # noqa: E402
from trainer.toy.evaluate import ToyEvaluator  # noqa: E402
from trainer.toy.teacher import balanced_digits, load_toy_teacher, sample_teacher  # noqa: E402

DEFAULT_ROWS = "50:1,50:2,50:3,50:4.5,50:6,4:4.5,1:4.5,4:1,1:1"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rows", default=DEFAULT_ROWS, help="comma-separated steps:cfg pairs")
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "toy_eval")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)

    model = load_toy_teacher()
    evaluator = ToyEvaluator.load()
    digits = balanced_digits(args.n)
    results = []
    print("| steps | CFG | toy FID | accuracy | diversity | s/image |")
    print("|---:|---:|---:|---:|---:|---:|")
    for row in args.rows.split(","):
        steps, w = row.split(":")
        steps, w = int(steps), float(w)
        t0 = time.perf_counter()
        images = sample_teacher(model, digits, steps=steps, cfg_scale=w, seed=args.seed, batch_size=args.batch_size)
        secs = (time.perf_counter() - t0) / args.n
        s = evaluator.score(images, digits)
        s.update(steps=steps, cfg=w, n=args.n, seconds_per_image=secs, seed=args.seed)
        results.append(s)
        print(f"| {steps} | {w:g} | {s['toy_fid']:.2f} | {s['accuracy']:.3f} | {s['diversity']:.3f} | {secs:.4f} |", flush=True)
        from PIL import Image

        Image.fromarray(to_uint8_grid(images[:100], nrow=10)).resize((331 * 2, 331 * 2), Image.NEAREST).save(
            args.out / f"teacher_{steps}steps_cfg{w:g}.png")
    info = {"teacher_sha256": model.content_hash, "threads": args.threads, "torch": torch.__version__, "rows": results}
    (args.out / "teacher_results.json").write_text(json.dumps(info, indent=2) + "\n")


if __name__ == "__main__":
    main()
