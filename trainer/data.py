"""Training data: the prompts file and the optional folder of real images with same-name ``.txt`` captions.

Everything is read and checked before training starts, so a bad file stops the run at once with a one-line error
instead of halfway through.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from trainer.errors import DataError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per line (``.txt``) or one JSON object with a ``prompt`` field per line (``.jsonl``)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"prompts file {path} does not exist: set `prompts` to a .txt (one prompt per line) or .jsonl file")
    prompts = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        if path.suffix == ".jsonl":
            try:
                prompt = json.loads(line)["prompt"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise DataError(f"{path}:{n} is not a JSON object with a \"prompt\" field: fix that line") from None
            line = str(prompt).strip()
        if line:
            prompts.append(line)
    if not prompts:
        raise DataError(f"prompts file {path} has no prompts: put one prompt per line")
    return prompts


@dataclass
class ImageRecord:
    path: Path
    caption: str
    size: tuple[int, int] | None = None  # (height, width), read from the header


def read_image_folder(folder: str | Path, *, skip_unreadable: bool = False) -> tuple[list[ImageRecord], list[Path]]:
    """All images in ``folder`` with their captions (``name.txt`` beside ``name.png``; none -> empty caption).
    Returns (records, unreadable files). Unreadable images stop the run unless ``skip_unreadable``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"image folder {folder} does not exist: set `images` to a folder of images with same-name .txt captions, or remove it")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"image folder {folder} has no images ({', '.join(sorted(IMAGE_SUFFIXES))}): add some or remove `images`")
    records, bad = [], []
    for f in files:
        try:
            with Image.open(f) as im:
                size = (im.height, im.width)
                im.verify()
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
            bad.append(f)
            continue
        caption_file = f.with_suffix(".txt")
        caption = caption_file.read_text(encoding="utf-8").strip() if caption_file.is_file() else ""
        records.append(ImageRecord(f, caption, size))
    if bad and not skip_unreadable:
        raise DataError(f"cannot read image {bad[0]}" + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else "")
                        + ": replace or delete it, or set data.skip_unreadable_images=true")
    if not records:
        raise DataError(f"no readable images in {folder}: add some or remove `images`")
    return records, bad


# SDXL's aspect-ratio buckets at 1024x1024 pixels of area, as (height, width): the list from the SDXL paper's
# multi-aspect training (appendix), every side a multiple of 64.
SDXL_BUCKETS = (
    (512, 2048), (512, 1984), (512, 1920), (512, 1856), (576, 1792), (576, 1728), (576, 1664), (640, 1600),
    (640, 1536), (704, 1472), (704, 1408), (704, 1344), (768, 1344), (768, 1280), (832, 1216), (832, 1152),
    (896, 1152), (896, 1088), (960, 1088), (960, 1024), (1024, 1024), (1024, 960), (1088, 960), (1088, 896),
    (1152, 896), (1152, 832), (1216, 832), (1280, 768), (1344, 768), (1344, 704), (1408, 704), (1472, 704),
    (1536, 640), (1600, 640), (1664, 576), (1728, 576), (1792, 576), (1856, 512), (1920, 512), (1984, 512),
    (2048, 512),
)


def buckets_for(resolution: int, multiple: int = 64) -> list[tuple[int, int]]:
    """SDXL's buckets scaled from 1024 to ``resolution``, each side rounded to ``multiple`` (what the VAE and the
    UNet's down-sampling need), duplicates dropped; the square bucket is always there."""
    out = {(resolution, resolution)}
    for h, w in SDXL_BUCKETS:
        hh = max(multiple, int(h * resolution / 1024 / multiple + 0.5) * multiple)
        ww = max(multiple, int(w * resolution / 1024 / multiple + 0.5) * multiple)
        out.add((hh, ww))
    return sorted(out, key=lambda b: b[1] / b[0])


def nearest_bucket(size: tuple[int, int], buckets) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest (in log ratio) to the image's (height, width)."""
    h, w = size
    return min(buckets, key=lambda b: (abs(np.log((b[1] / b[0]) / (w / h))), abs(b[0] * b[1] - h * w)))


def load_image_bucket(path: Path, bucket: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
    """RGB image resized to cover ``bucket`` (height, width) and centre-cropped to it, in [-1, 1] as [3, H, W].
    Also returns the original size and the crop's top-left corner (in resized pixels), for SDXL's micro-conditioning."""
    bh, bw = bucket
    with Image.open(path) as im:
        im = im.convert("RGB")
        original = (im.height, im.width)
        scale = max(bh / im.height, bw / im.width)
        im = im.resize((max(bw, round(im.width * scale)), max(bh, round(im.height * scale))), Image.BICUBIC)
        top, left = (im.height - bh) // 2, (im.width - bw) // 2
        im = im.crop((left, top, left + bw, top + bh))
        arr = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous(), original, (top, left)
