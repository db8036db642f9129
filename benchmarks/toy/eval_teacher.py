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

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from trainer.toy.digits import load_digits_32, to_uint8_grid  # noqa: E402
from trainer.toy.evaluate import ToyEvaluator, images_per_row  # noqa: E402
from trainer.files import write_text_atomic  # noqa: E402
from trainer.generate import decode, save_png_atomic  # noqa: E402
from trainer.toy.teacher import balanced_digits, load_toy_teacher, sample_teacher  # noqa: E402

DEFAULT_ROWS = "50:1,50:1.25,50:1.5,50:2,50:3,50:4.5,50:6,8:2,4:1,4:2,4:3,4:4.5,2:2,1:1,1:2,1:3,1:4.5"


@torch.no_grad()
def reference_rows(model, evaluator, n: int, seed: int):
    """What the metrics give for real data: n random real digits, their VAE round trip, and a blurred copy."""
    images, labels = load_digits_32()
    idx = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))[: min(n, len(labels))]
    x, y = images[idx], labels[idx]
    yield f"real digits ({len(idx)})", evaluator.score(x, y)
    z = model.vae.encode(x.repeat(1, 3, 1, 1)).latent_dist.mean * model.vae.config.scaling_factor
    yield "real via VAE", evaluator.score(decode(model.vae, z), y)
    k = torch.exp(-torch.arange(-4, 5).float() ** 2 / 2)
    k = (k / k.sum()).view(1, 1, 1, 9)
    blurred = F.conv2d(F.conv2d(F.pad(x + 1, (4, 4, 4, 4)), k), k.transpose(2, 3)) - 1
    yield "real, Gaussian blur 1px", evaluator.score(blurred, y)
    grain = (x + 0.2 * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed + 1))).clamp(-1, 1)
    yield "real + noise 0.2", evaluator.score(grain, y)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=images_per_row, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rows", default=DEFAULT_ROWS, help="comma-separated steps:cfg pairs")
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "toy_eval")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-references", action="store_true", help="skip the real-data / VAE reference rows")
    p.add_argument("--json", type=Path, default=None, help="also write the results JSON here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)

    model = load_toy_teacher()
    evaluator = ToyEvaluator.load()
    digits = balanced_digits(args.n)
    results, references = [], []
    print("| steps | CFG | toy FID | accuracy | diversity | s/image |")
    print("|---:|---:|---:|---:|---:|---:|")
    if not args.no_references:
        for name, s in reference_rows(model, evaluator, args.n, args.seed):
            references.append({"name": name, **s})
            print(f"| {name} | | {s['toy_fid']:.2f} | {s['accuracy']:.3f} | {s['diversity']:.3f} | |", flush=True)
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

        grid = Image.fromarray(to_uint8_grid(images[:100], nrow=10)).resize((331 * 2, 331 * 2), Image.NEAREST)
        save_png_atomic(grid, args.out / f"teacher_{steps}steps_cfg{w:g}.png")
    info = {"teacher_sha256": model.content_hash, "threads": args.threads, "torch": torch.__version__,
            "references": references, "rows": results}
    text = json.dumps(info, indent=2) + "\n"
    write_text_atomic(args.out / "teacher_results.json", text)
    if args.json:
        write_text_atomic(args.json, text)


if __name__ == "__main__":
    main()
