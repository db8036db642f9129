"""Train the toy evaluator's digit classifier and write trainer/toy/digit_classifier.safetensors.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/toy/train_classifier.py

Trains on the training part of ``trainer.toy.digits.split_indices()`` (80%, stratified, seed 0) with random affine
and contrast augmentation (no noise augmentation, so that grain raises the toy FID), reports accuracy on the held-out 20%. Deterministic on one CPU thread (~2 min).
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from trainer.files import atomic_write
from trainer.toy.digits import load_digits_32, split_indices
from trainer.toy.evaluate import WEIGHTS_FILE, DigitClassifier

ROOT = Path(__file__).resolve().parents[2]


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    n = x.shape[0]
    u = lambda lo, hi: lo + (hi - lo) * torch.rand(n, generator=g)  # noqa: E731
    angle = u(-12, 12) * math.pi / 180
    scale = u(0.88, 1.12)
    shear = u(-0.15, 0.15)
    tx, ty = u(-0.12, 0.12), u(-0.12, 0.12)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin + shear, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # pad with background (-1): shift to [0, 2] so zero padding is background
    y = F.grid_sample(x + 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1
    # contrast / stroke-thickness jitter. No additive-noise augmentation on purpose: the features must stay
    # sensitive to grain, a typical failure of few-step samplers.
    gamma = u(0.7, 1.4).view(-1, 1, 1, 1)
    y = ((y + 1) / 2).clamp(0, 1) ** gamma * 2 - 1
    return y.clamp(-1, 1)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "trainer" / "toy" / WEIGHTS_FILE)
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)

    images, labels = load_digits_32()
    train_idx, held_idx = split_indices()
    xtr, ytr = images[train_idx], labels[train_idx]
    xte, yte = images[held_idx], labels[held_idx]
    model = DigitClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    steps_per_epoch = math.ceil(len(xtr) / 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=args.epochs * steps_per_epoch)
    t0 = time.time()
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(xtr), generator=g)
        total = 0.0
        for i in range(steps_per_epoch):
            idx = perm[i * 64 : (i + 1) * 64]
            loss = F.cross_entropy(model(augment(xtr[idx], g)), ytr[idx], label_smoothing=0.05)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach())
        model.eval()
        with torch.no_grad():
            acc = (model(xte).argmax(1) == yte).float().mean().item()
        print(f"epoch {epoch + 1:3d} loss {total / steps_per_epoch:.4f} held-out acc {acc:.4f} ({time.time() - t0:.0f}s)", flush=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    with atomic_write(args.out) as tmp:
        save_file(state, str(tmp), metadata={"held_out_accuracy": f"{acc:.4f}", "epochs": str(args.epochs), "seed": str(args.seed)})
    print(f"wrote {args.out}  held-out accuracy {acc:.4f}")


if __name__ == "__main__":
    main()
