"""Toy FID at equal sample counts: real digits the reference also holds, held-out real digits, the teacher's best row
and a student (NOTES.md point 35). A Fréchet distance reads higher on fewer images (its covariance is estimated from
fewer samples), so a row of 1,000 images and the 359 held-out digits can only be compared at the same count.

    python benchmarks/toy/real_baseline.py --lora outputs/toy_table/student-4/dmd2_digits_teacher_4step_lora.safetensors

Every subset has the real data's share of each digit (the held-out split's counts at n = 359), drawn ``--repeats``
times without replacement from: the classifier's training split of the real digits, the teacher's ``--samples``
images (50 Euler steps at its best CFG, 1.5, digits 0-9 cycled, sampling seeds 0 and 1) and the student's (its own
sampler, the same seeds). Every subset is scored by the committed classifier and by the two second opinions
(`second_opinion/`). Printed: mean, sd, min and max per classifier, row and count; the last line is all of it as
JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]

from trainer.errors import DMD2Error  # noqa: E402
from trainer.export import merge_into_unet, read_lora  # noqa: E402
from trainer.models.loading import load_sdxl  # noqa: E402
from trainer.toy.digits import NUM_DIGITS, load_digits_32, split_indices  # noqa: E402
from trainer.toy.rows import Row, sample_row  # noqa: E402
from trainer.toy.teacher import teacher_path  # noqa: E402
from make_table import load_evaluators  # noqa: E402


def digit_counts(n: int, labels: torch.Tensor) -> list[int]:
    """``n`` split over the digits in proportion to their share of ``labels`` (largest remainders round up)."""
    share = np.bincount(labels.numpy(), minlength=NUM_DIGITS) / len(labels) * n
    counts = np.floor(share).astype(int)
    counts[np.argsort(share - counts)[::-1][: n - counts.sum()]] += 1
    return counts.tolist()


def stratified_subset(labels: torch.Tensor, counts: list[int], rng: np.random.Generator) -> torch.Tensor:
    """Sorted indices into ``labels``: ``counts[d]`` distinct rows of each digit d."""
    picked = [rng.choice(np.flatnonzero(labels.numpy() == d), c, replace=False) for d, c in enumerate(counts)]
    return torch.from_numpy(np.sort(np.concatenate(picked)))


def spread(values: list[float]) -> dict[str, float]:
    return {"mean": round(float(np.mean(values)), 3), "sd": round(float(np.std(values)), 3),
            "min": round(float(np.min(values)), 3), "max": round(float(np.max(values)), 3), "repeats": len(values)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lora", type=Path, help="a student LoRA of the bundled teacher (optional)")
    parser.add_argument("--n", default="359,1000", help="comma-separated sample counts (default 359,1000)")
    parser.add_argument("--repeats", type=int, default=10, help="subsets per row and count (default 10)")
    parser.add_argument("--samples", type=int, default=1000, help="images per sampling seed, seeds 0 and 1 (default 1,000)")
    parser.add_argument("--teacher-steps", type=int, default=50)
    parser.add_argument("--teacher-cfg", type=float, default=1.5)
    args = parser.parse_args(argv)
    try:
        sizes = [int(v) for v in args.n.split(",")]
        lora = read_lora(args.lora) if args.lora is not None else None  # a one-line error for a missing or bad file
        if lora is not None and "dmd2.timesteps" not in lora[1]:
            raise DMD2Error(f"{args.lora} has no dmd2.timesteps in its metadata: pass a LoRA that `dmd2 train` or `dmd2 demo` wrote")
        if max(sizes) > 2 * args.samples or min(sizes) < 2:
            raise DMD2Error(f"--n must be between 2 and twice --samples ({2 * args.samples}), got {args.n}")
        evaluators = load_evaluators()
        real, labels = load_digits_32()
        train_idx, held_idx = split_indices()
        model = load_sdxl(str(teacher_path()))
        digits = [i % NUM_DIGITS for i in range(args.samples)]
        generated = {f"teacher {args.teacher_steps} steps, CFG {args.teacher_cfg}": Row("teacher", args.teacher_steps, args.teacher_cfg)}
        if lora is not None:
            timesteps = tuple(json.loads(lora[1]["dmd2.timesteps"]))
            generated[f"student {len(timesteps)}-step"] = Row("student", len(timesteps), 1.0, timesteps)
        images = {}
        for name, row in generated.items():  # the teacher first: the student's LoRA is merged into its UNet for good
            if row.timesteps is not None:
                merge_into_unet(model.unet, lora[0])
            images[name] = torch.cat([sample_row(model, row, digits, seed=s)[0] for s in (0, 1)])
        sample_digits = torch.tensor(digits * 2)
        pools = {"real digits, classifier's training split": (real[train_idx], labels[train_idx]),
                 **{name: (x, sample_digits) for name, x in images.items()}}
        rng = np.random.default_rng(0)
        results = {c: {"held-out real digits (all 359)": {"359": spread([ev.score(real[held_idx], labels[held_idx])["toy_fid"]])}}
                   for c, ev in evaluators.items()}
        for name, (x, d) in pools.items():
            for n in sizes:
                subsets = [stratified_subset(d, digit_counts(n, labels[held_idx]), rng) for _ in range(args.repeats)]
                for c, ev in evaluators.items():  # the same subsets for every classifier
                    results[c].setdefault(name, {})[str(n)] = spread([ev.score(x[i], d[i])["toy_fid"] for i in subsets])
    except (DMD2Error, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for classifier, rows in results.items():
        print(f"toy FID at equal sample counts, {classifier} classifier (mean, sd, min-max over subsets)")
        for name, by_n in rows.items():
            print(f"  {name}: " + "; ".join(f"n={n}: {r['mean']:.2f} (sd {r['sd']:.2f}, {r['min']:.2f}-{r['max']:.2f})" for n, r in by_n.items()))
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
