"""The toy evaluator: a small digit classifier used as a feature extractor, as Inception is for FID.

``ToyEvaluator.load().score(images, digits)`` returns

* ``toy_fid``: Fréchet distance between the Gaussian fits of the classifier's penultimate features (64-d) of the
  generated images and of all 1,797 real digits;
* ``accuracy``: fraction of images the classifier reads as the digit they were prompted with;
* ``diversity``: mean pairwise feature distance among the images of each prompted digit, divided by the same
  quantity for the real images of that digit, averaged over the digits (1.0 = as varied as the data, 0 = collapse).

The weights (``digit_classifier.safetensors``) are trained by ``benchmarks/toy/train_classifier.py`` on the
training part of :func:`trainer.toy.digits.split_indices`; the held-out part is never seen.
"""
from __future__ import annotations

import functools
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from trainer.toy.digits import IMAGE_SIZE, NUM_DIGITS, load_digits_32

WEIGHTS_FILE = "digit_classifier.safetensors"
FEATURE_DIM = 64


class DigitClassifier(nn.Module):
    """A small CNN on [N, 1, 32, 32] images in [-1, 1]; ``features`` is the 64-d penultimate layer (post-ReLU)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 16
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 8
            nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 4
        )
        self.fc = nn.Linear(128 * 4 * 4, FEATURE_DIM)
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(FEATURE_DIM, NUM_DIGITS)

    def features(self, x: Tensor) -> Tensor:
        return F.relu(self.fc(self.conv(x).flatten(1)))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.dropout(self.features(x)))


def prepare_images(images: Tensor) -> Tensor:
    """[N, 1 or 3, H, W] in [-1, 1] -> [N, 1, 32, 32] float32 (RGB averaged to grey, resized if needed, clamped)."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images [N, 1 or 3, H, W], got {tuple(images.shape)}")
    x = images.detach().float().cpu()
    if x.shape[1] == 3:
        x = x.mean(1, keepdim=True)
    if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
        x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", antialias=True, align_corners=False)
    return torch.nan_to_num(x, nan=0.0).clamp(-1.0, 1.0)


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr(C1 + C2 - 2 (C1 C2)^1/2), with the trace of the root from the eigenvalues of
    sqrt(C1) C2 sqrt(C1) (symmetric, so no complex round-off)."""
    mu1, mu2, cov1, cov2 = (np.asarray(a, dtype=np.float64) for a in (mu1, mu2, cov1, cov2))
    w, v = np.linalg.eigh((cov1 + cov1.T) / 2)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    middle = root1 @ cov2 @ root1
    ev = np.linalg.eigvalsh((middle + middle.T) / 2)
    tr_sqrt = np.sqrt(np.clip(ev, 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(cov1) + np.trace(cov2) - 2.0 * tr_sqrt)


def _mean_pairwise_distance(feats: Tensor) -> float:
    n = feats.shape[0]
    if n < 2:
        return float("nan")
    d = torch.cdist(feats.double(), feats.double())
    return float(d.sum() / (n * (n - 1)))


@functools.lru_cache(maxsize=4)
def _load_classifier(weights: Path | None = None) -> DigitClassifier:
    from safetensors.torch import load

    model = DigitClassifier()
    if weights is None:
        raw = resources.files("trainer.toy").joinpath(WEIGHTS_FILE).read_bytes()
    elif not weights.is_file():
        raise FileNotFoundError(f"classifier weights {weights} do not exist: train them with benchmarks/toy/train_classifier.py --out {weights}")
    else:
        raw = weights.read_bytes()
    model.load_state_dict(load(raw))
    return model.eval().requires_grad_(False)


MIN_IMAGES_PER_ROW = 2 * NUM_DIGITS  # digits cycle 0-9, and diversity needs two images of each


def images_per_row(text: str) -> int:
    """argparse type for a row's image count (digits 0-9 cycled): at least two of each digit, or diversity is undefined."""
    import argparse

    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of images, e.g. 1000") from None
    if n < MIN_IMAGES_PER_ROW:
        raise argparse.ArgumentTypeError(f"{n} images per row is too few: use at least {MIN_IMAGES_PER_ROW} (two of each digit; "
                                         "the table uses 1000)")
    return n


class ToyEvaluator:
    def __init__(self, classifier: DigitClassifier, batch_size: int = 500):
        self.classifier = classifier.eval().requires_grad_(False)
        self.batch_size = batch_size
        real, labels = load_digits_32()
        feats, _ = self.features_and_logits(real)
        f = feats.double().numpy()
        self.real_mu, self.real_cov = f.mean(0), np.cov(f, rowvar=False)
        self.real_diversity = np.array(
            [_mean_pairwise_distance(feats[labels == d]) for d in range(NUM_DIGITS)], dtype=np.float64
        )

    @classmethod
    def load(cls, weights: str | Path | None = None) -> "ToyEvaluator":
        """The evaluator with the committed classifier weights, or with other weights of the same classifier (a
        safetensors file from ``train_classifier.py``, e.g. one trained with another seed as a second opinion)."""
        return cls(_load_classifier(None if weights is None else Path(weights)))

    @torch.no_grad()
    def features_and_logits(self, images: Tensor) -> tuple[Tensor, Tensor]:
        x = prepare_images(images)
        feats, logits = [], []
        for chunk in x.split(self.batch_size):
            f = self.classifier.features(chunk)
            feats.append(f)
            logits.append(self.classifier.head(f))
        return torch.cat(feats), torch.cat(logits)

    def classify(self, images: Tensor) -> Tensor:
        return self.features_and_logits(images)[1].argmax(1)

    def score(self, images: Tensor, digits) -> dict[str, float]:
        """Score ``images`` [N, 1 or 3, 32, 32] in [-1, 1] generated for the prompted ``digits`` [N]."""
        digits = torch.as_tensor(digits, dtype=torch.long).reshape(-1)
        if digits.shape[0] != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {digits.shape[0]} digits")
        if images.shape[0] < 2:
            raise ValueError("need at least 2 images to fit a feature distribution")
        feats, logits = self.features_and_logits(images)
        f = feats.double().numpy()
        fid = frechet_distance(f.mean(0), np.cov(f, rowvar=False), self.real_mu, self.real_cov)
        accuracy = float((logits.argmax(1) == digits).double().mean())
        ratios = []
        for d in range(NUM_DIGITS):
            sel = digits == d
            if int(sel.sum()) >= 2:
                ratios.append(_mean_pairwise_distance(feats[sel]) / self.real_diversity[d])
        return {"toy_fid": fid, "accuracy": accuracy, "diversity": float(np.mean(ratios)) if ratios else float("nan")}
