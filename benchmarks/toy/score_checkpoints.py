"""Score every checkpoint of a toy distillation run, optionally training it first: how a student's toy FID moves over
its training, by the evaluator's classifier and the two second opinions (NOTES.md point 27: one checkpoint's FID is
a draw from a drifting run, so compare runs by their mean over checkpoints).

    python benchmarks/toy/score_checkpoints.py outputs/runs/seed1 --train --set seed=1  # demo.yaml + overrides
    python benchmarks/toy/score_checkpoints.py outputs/runs/seed1 --min-step 1000 --seeds 0,1,2
    python benchmarks/toy/score_checkpoints.py outputs/runs/b1024 --train --device cuda \\
        --set batch_size=1024 micro_batch_size=1024 checkpoint_every=100   # the GPU runs of NOTES.md point 28

With --train, demo.yaml plus the overrides is trained into RUN_DIR by the real trainer (resuming from its newest
checkpoint; SIGINT saves one, so `timeout -s INT` cuts a run cleanly) and the run keeps every checkpoint. Then each
checkpoint's student LoRA is merged into the teacher and 1,000 images (digits 0-9 x 100) are sampled per seed and
scored; one JSON line per checkpoint and seed goes to RUN_DIR/scores.jsonl (a checkpoint scored before is skipped)
and a summary with the mean over the scored checkpoints is printed.
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
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]

from trainer.checkpoint import STATE_FILE  # noqa: E402
from trainer.errors import DMD2Error  # noqa: E402
from trainer.export import lora_from_checkpoint, merge_into_unet  # noqa: E402
from trainer.files import write_text_atomic  # noqa: E402
from trainer.generate import place  # noqa: E402
from trainer.models.loading import load_sdxl  # noqa: E402
from trainer.toy.evaluate import images_per_row  # noqa: E402
from trainer.toy.rows import Row, sample_row  # noqa: E402
from trainer.toy.teacher import teacher_path  # noqa: E402
from make_table import SECOND_OPINION_NAMES, load_evaluators, seed_list  # noqa: E402


def train_run(run_dir: Path, teacher: str, overrides: list[str]) -> float:
    """demo.yaml + ``overrides`` trained into ``run_dir`` (resumed when it has checkpoints); returns the seconds."""
    from trainer.config import load_config
    from trainer.demo import demo_config_path, trained_or_exit, write_demo_data
    from trainer.train import train

    prompts, images = write_demo_data(run_dir / "data")
    base = {"model": teacher, "prompts": str(prompts), "images": str(images), "output_dir": str(run_dir)}
    # Keep every checkpoint (they are scored), and skip validation images (nobody looks at them here).
    cfg = load_config(demo_config_path(), ["keep_checkpoints=1000", "validate_every=0", *overrides], base=base).validate()
    start = time.time()
    lora = train(cfg, resume="latest" if (run_dir / "checkpoints").is_dir() else None)
    trained_or_exit(lora, "training", run_dir / "checkpoints")  # Ctrl-C: do not go on to score
    return time.time() - start


def checkpoints(run_dir: Path, min_step: int, every: int = 1) -> list[tuple[int, Path]]:
    """(step, folder) of the complete checkpoints at ``min_step`` or later whose step is a multiple of ``every``."""
    found = []
    for path in sorted((run_dir / "checkpoints").glob("step-*")):
        step = int(path.name.split("-")[1])
        if (path / STATE_FILE).is_file() and step >= min_step and step % every == 0:
            found.append((step, path))
    return found


def checkpoints_at(run_dir: Path, steps: str) -> dict[int, Path]:
    """{step: folder} for the comma-separated ``steps`` (e.g. "400,800"); a one-line error names any step without a
    complete checkpoint and the ones there are."""
    wanted = [int(v) for v in steps.split(",")]
    found = dict(checkpoints(run_dir, 0)) if (run_dir / "checkpoints").is_dir() else {}
    missing = [v for v in wanted if v not in found]
    if missing:
        raise DMD2Error(f"{run_dir} has no complete checkpoint at step(s) {missing}: pick from {sorted(found)}")
    return {v: found[v] for v in wanted}


def score_run(run_dir: Path, teacher: str, min_step: int, seeds: list[int], device: str, n: int = 1000,
              every: int = 1) -> list[dict]:
    """Score each checkpoint at ``min_step`` or later that ``scores.jsonl`` lacks, newest first (a pass cut short by a
    deadline has scored the furthest-trained ones); returns all records of the run."""
    out = run_dir / "scores.jsonl"
    records = [json.loads(line) for line in out.read_text().splitlines()] if out.is_file() else []
    done = {(r["step"], r["seed"]) for r in records}
    todo = [(step, path) for step, path in reversed(checkpoints(run_dir, min_step, every)) if any((step, s) not in done for s in seeds)]
    if not todo:
        return records
    evaluators = load_evaluators()
    model = load_sdxl(teacher)
    place(model.unet, device)
    place(model.vae, device)
    original = {k: v.clone() for k, v in model.unet.state_dict().items()}
    digits = [i % 10 for i in range(n)]
    for step, path in todo:
        tensors, meta = lora_from_checkpoint(path, torch.float32)
        model.unet.load_state_dict(original)
        merge_into_unet(model.unet, tensors)
        timesteps = tuple(json.loads(meta["dmd2.timesteps"]))
        for seed in seeds:
            if (step, seed) in done:
                continue
            images, _ = sample_row(model, Row(f"step {step}", len(timesteps), 1.0, timesteps), digits, seed=seed)
            rec = {"step": step, "seed": seed}
            for name, ev in evaluators.items():
                s = ev.score(images, digits)
                rec[name] = {"toy_fid": round(s["toy_fid"], 4), "accuracy": round(s["accuracy"], 4)}
                if name == "committed":
                    rec["diversity"] = round(s["diversity"], 4)
            print(json.dumps(rec), flush=True)
            records.append(rec)
            write_text_atomic(out, "".join(json.dumps(r) + "\n" for r in records))  # a kill never leaves a torn line
    return records


def summary(records: list[dict], min_step: int, every: int = 1) -> dict:
    """Mean toy FID and accuracy per classifier over the checkpoints selected as for scoring, per sampling seed."""
    result = {}
    for seed in sorted({r["seed"] for r in records}):
        rows = [r for r in records if r["seed"] == seed and r["step"] >= min_step and r["step"] % every == 0]
        if not rows:
            continue
        result[f"seed {seed}"] = {
            "checkpoints": len(rows), "steps": f"{min(r['step'] for r in rows)}-{max(r['step'] for r in rows)}",
            **{name: {"mean_fid": round(float(np.mean([r[name]["toy_fid"] for r in rows])), 3),
                      "sd_fid": round(float(np.std([r[name]["toy_fid"] for r in rows])), 3),
                      "mean_accuracy": round(float(np.mean([r[name]["accuracy"] for r in rows])), 4)}
               for name in ("committed", *SECOND_OPINION_NAMES)}}
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", help="the run's output_dir")
    p.add_argument("--train", action="store_true", help="train (or resume) demo.yaml + --set overrides first")
    p.add_argument("--no-score", action="store_true", help="with --train: only train (score in another call)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides on top of demo.yaml")
    p.add_argument("--teacher", default=str(teacher_path()), help="the teacher (default: the bundled digits teacher)")
    p.add_argument("--min-step", type=int, default=0, help="score only checkpoints at this step or later")
    p.add_argument("--every", type=int, default=1, help="score only checkpoints whose step is a multiple of this")
    p.add_argument("--seeds", type=seed_list, default=(0,), metavar="S,S,...", help="sampling seeds (the table uses 0,1,2)")
    p.add_argument("--n", type=images_per_row, default=1000, help="images per checkpoint and seed (the table uses 1,000)")
    p.add_argument("--device", default="cpu", help="where to sample (training picks CUDA when there is one)")
    args = p.parse_args(argv)
    run_dir = Path(args.run_dir)
    if args.train:
        print(f"trained in {train_run(run_dir, args.teacher, args.set):.0f} s", flush=True)
        if args.no_score:
            return 0
    elif args.set or args.no_score:
        p.error("--set and --no-score need --train")
    if not checkpoints(run_dir, args.min_step, args.every):
        p.error(f"{run_dir} has no checkpoints at step {args.min_step} or later (every {args.every}): train it with --train")
    records = score_run(run_dir, args.teacher, args.min_step, list(args.seeds), args.device, args.n, args.every)
    print(json.dumps({"run": str(run_dir), **summary(records, args.min_step, args.every)}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
