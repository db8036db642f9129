"""The mean of the student's weights over the end of a run (stochastic weight averaging, Izmailov et al. 2018).

Late in a DMD2 run the student stops improving on average but keeps moving: on the toy teachers its FID drifts by
+-0.2 or more from one checkpoint to the next, around a level that the mean of those weights beats (NOTES.md in
benchmarks/toy, point 56). The mean is taken over the student's weights after each of its updates in the window, a
uniform running mean kept in fp32 beside the adapter. A LoRA's down and up matrices are averaged separately, as their
running mean would be; on the toy teacher that scored the same as averaging the merged products down @ up.
"""
from __future__ import annotations

import torch

STEM = "student_average"  # the checkpoint file (student_average.safetensors) that holds the mean


class WeightAverage:
    """A running mean of named tensors: ``update`` after each student update inside the window; ``mean`` is what the
    run exports. ``count`` updates have entered it."""

    def __init__(self, start: int, mean: dict[str, torch.Tensor] | None = None, count: int = 0):
        self.start, self.count = start, count
        self.mean = {name: value.float().clone() for name, value in (mean or {}).items()}

    def update(self, params: dict[str, torch.Tensor]) -> None:
        self.count += 1
        with torch.no_grad():
            for name, value in params.items():
                if name not in self.mean:
                    self.mean[name] = value.detach().float().clone()
                else:  # mean_n = mean_{n-1} + (x_n - mean_{n-1}) / n
                    self.mean[name].add_(value.detach().float() - self.mean[name], alpha=1.0 / self.count)

    def copy_into(self, params: dict[str, torch.Tensor]) -> None:
        """Overwrite ``params`` (the student's own tensors) with the mean, in their dtype."""
        with torch.no_grad():
            for name, value in params.items():
                value.copy_(self.mean[name].to(value.device, value.dtype))

    def info(self) -> dict:
        return {"start": self.start, "count": self.count}
