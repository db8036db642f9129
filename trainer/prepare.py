"""Data preparation, once: prompts through both text encoders, real images through the VAE, and (without an image
set) the teacher's own samples for the GAN, all into an on-disk cache that training reads.

``dmd2 prepare --config run.yaml`` runs this on its own; ``dmd2 train`` calls the same function first, which does
nothing but check keys and print "data cache reused" when the cache is current. Training therefore never needs the
text encoders or the VAE on the accelerator (the VAE visits it only to decode validation images).

Cache layout (``data.cache_dir``, default ``<output_dir>/cache``); every entry is a folder named by a hash of what
it was made from, written under a temporary name and renamed when complete, so a killed run never leaves a
half-written entry behind:

- ``text-<key>/``: prompt embeddings of the prompts, the validation prompts and the unconditional input. Key: the
  teacher's content hash, the resolution, the prompts themselves, the unconditional mode.
- ``images-<key>/``: per aspect-ratio bucket ``b<H>x<W>/``: VAE latents, caption embeddings and SDXL
  micro-conditioning time ids ``[orig_h, orig_w, crop_top, crop_left, H, W]``. Key: the teacher's hash, the
  resolution, the bucket setting and every image's file contents and caption. Unreadable or corrupt images are
  skipped and listed (``skipped-images.txt``), never a crash halfway.
- ``teacher-<key>/part-NNNNN.safetensors``: many-step CFG samples of the teacher (GAN real data when there is no
  image set), generated in batches; each part is written atomically, so a killed generation continues where it
  stopped. Seeds are per sample, so the result does not depend on the batching or on restarts.

Large arrays are ``.npy`` files (float16) read through memory maps: a training step reads only the rows it draws.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from trainer.config import TrainConfig
from trainer.data import buckets_for, load_image_bucket, nearest_bucket, read_image_folder, read_prompts
from trainer.errors import DataError
from trainer.files import write_text_atomic
from trainer.models.hashing import file_sha256
from trainer.models.roles import Conditioning

FORMAT = 1  # bump when the cache's contents change meaning
STORE = np.float16


# -- conditioning stored as memory-mapped arrays ------------------------------------------------------------------
class ArrayConditioning:
    """Conditioning rows kept on disk (memory-mapped); ``index`` reads the requested rows as a float32 Conditioning."""

    def __init__(self, prompt_embeds: np.ndarray, pooled: np.ndarray, time_ids: np.ndarray):
        self.prompt_embeds, self.pooled, self.time_ids = prompt_embeds, pooled, time_ids

    def __len__(self) -> int:
        return self.prompt_embeds.shape[0]

    def index(self, idx) -> Conditioning:
        idx = np.asarray(idx.cpu() if isinstance(idx, torch.Tensor) else idx, dtype=np.int64)
        return Conditioning(*(torch.from_numpy(np.asarray(a[idx], dtype=np.float32)) for a in (self.prompt_embeds, self.pooled, self.time_ids)))

    def all(self) -> Conditioning:
        return self.index(np.arange(len(self)))

    @classmethod
    def load(cls, folder: Path, prefix: str = "") -> "ArrayConditioning":
        return cls(*(np.load(folder / f"{prefix}{name}.npy", mmap_mode="r") for name in ("prompt_embeds", "pooled", "time_ids")))


def _save_conditioning(folder: Path, cond: Conditioning, prefix: str = "") -> None:
    for name, value in (("prompt_embeds", cond.prompt_embeds), ("pooled", cond.pooled), ("time_ids", cond.time_ids)):
        np.save(folder / f"{prefix}{name}.npy", value.float().numpy().astype(STORE if name != "time_ids" else np.float32))


@dataclass
class RealData:
    """GAN real data: latents per aspect-ratio bucket, each with its conditioning (captions, size/crop time ids)."""

    buckets: list[tuple[int, int]]  # pixel (height, width)
    latents: list  # per bucket: [N_b, C, h, w] array (memory map or tensor)
    cond: list  # per bucket: ArrayConditioning or Conditioning
    source: str = "images"

    def __len__(self) -> int:
        return sum(len(c) for c in self.cond)

    def draw(self, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, Conditioning]:
        """A batch from ONE bucket (chosen in proportion to its size), rows uniformly with replacement."""
        b = 0
        if len(self.buckets) > 1:
            counts = torch.tensor([float(len(c)) for c in self.cond])
            b = int(torch.multinomial(counts, 1, generator=generator))
        idx = torch.randint(len(self.cond[b]), (batch,), generator=generator)
        lat = self.latents[b]
        x = lat[idx] if isinstance(lat, torch.Tensor) else torch.from_numpy(np.asarray(lat[idx.numpy()], dtype=np.float32))
        return x, self.cond[b].index(idx)


@dataclass
class PreparedData:
    prompts: list[str]
    cond: ArrayConditioning  # all training prompts
    uncond: Conditioning  # one row
    validation_prompts: list[str]
    validation_cond: Conditioning
    validation_uncond: Conditioning
    real: RealData | None
    skipped: list[str] = field(default_factory=list)  # unreadable images (file names)
    stats: dict = field(default_factory=dict)  # encoded_prompts, encoded_images, generated_teacher_samples, reused
    cache_dir: Path | None = None


# -- keys ---------------------------------------------------------------------------------------------------------
def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def cache_dir_for(cfg: TrainConfig) -> Path:
    return Path(cfg.data.cache_dir) if cfg.data.cache_dir else Path(cfg.output_dir) / "cache"


def _complete(folder: Path) -> bool:
    return (folder / "meta.json").is_file()


def _tmp_dir(final: Path) -> Path:
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _commit(tmp: Path, final: Path, meta: dict) -> None:
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    if final.exists():  # another process finished the same entry first: identical contents by construction
        shutil.rmtree(tmp, ignore_errors=True)
        return
    os.replace(tmp, final)


def _bucket_multiple(model) -> int:
    """Bucket sides must survive the VAE and every UNet down-sampling: 8 * 4 = 32 px for SDXL; 64 (SDXL's own
    bucket grid) whenever the resolution allows it."""
    vae_factor = 2 ** (len(model.vae.config.block_out_channels) - 1) if model.vae is not None else 8
    unet_factor = 2 ** (len(model.unet.config.block_out_channels) - 1)
    return vae_factor * unet_factor


# -- the step -----------------------------------------------------------------------------------------------------
def prepare(cfg: TrainConfig, model, *, device="cpu", dtype=torch.float32, skip_unreadable: bool | None = None,
            rank: int = 0, world: int = 1, barrier: Callable[[], None] | None = None, teacher_call: Callable | None = None,
            progress: bool = True, log: Callable[[str], None] = print) -> PreparedData:
    """Encode (or reuse) everything training needs; see the module docstring.

    ``skip_unreadable``: None -> ``cfg.data.skip_unreadable_images`` (``dmd2 train``: refuse by default); True ->
    skip and report (``dmd2 prepare``). Under several processes, rank 0 encodes while the others wait at
    ``barrier`` and then read the cache; teacher samples are generated by all ranks, one part in ``world`` each.
    ``teacher_call``: returns the teacher's UNet call on ``device`` (needed only when teacher samples are made)."""
    from trainer.generate import latent_shape as _latent_shape

    barrier = barrier or (lambda: None)
    main = rank == 0
    show = progress and main
    say = log if main else (lambda _msg: None)
    root = cache_dir_for(cfg)
    skip = cfg.data.skip_unreadable_images if skip_unreadable is None else skip_unreadable
    stats = {"encoded_prompts": 0, "encoded_images": 0, "generated_teacher_samples": 0, "reused": []}

    prompts = read_prompts(cfg.prompts)
    val_prompts = list(cfg.validation.prompts or prompts[:4])
    records, unreadable = [], []
    if cfg.gan_real_data == "images":
        records, unreadable = read_image_folder(cfg.images, skip_unreadable=skip)  # refuses here unless skipping

    res, teacher = cfg.resolution, model.content_hash
    text_key = _digest({"v": FORMAT, "teacher": teacher, "res": res, "prompts": prompts, "validation": val_prompts, "uncond": cfg.dmd.uncond})
    text_dir = root / f"text-{text_key[:20]}"
    images_dir = None
    if records:
        files = [(r.path.name, file_sha256(r.path), r.caption) for r in tqdm(records, desc="hashing images", disable=not show, leave=False)]
        bad = [(p.name, file_sha256(p)) for p in unreadable]
        multiple = _bucket_multiple(model)
        img_key = _digest({"v": FORMAT, "teacher": teacher, "res": res, "buckets": cfg.data.buckets, "multiple": multiple, "files": files, "bad": bad})
        images_dir = root / f"images-{img_key[:20]}"

    if main:
        todo_text = not _complete(text_dir)
        todo_images = images_dir is not None and not _complete(images_dir)
        if todo_text or todo_images:
            root.mkdir(parents=True, exist_ok=True)
            _encode(cfg, model, device, prompts, val_prompts, records, unreadable, text_dir if todo_text else None,
                    images_dir if todo_images else None, stats, show, say)
        if not todo_text:
            stats["reused"].append(text_dir.name)
        if images_dir is not None and not todo_images:
            stats["reused"].append(images_dir.name)
    barrier()
    if not _complete(text_dir) or (images_dir is not None and not _complete(images_dir)):
        raise DataError(f"data cache in {root} is incomplete on rank {rank}: put data.cache_dir on storage every process can read")

    cond = ArrayConditioning.load(text_dir)
    uncond = ArrayConditioning.load(text_dir, "uncond_").all()
    val_cond = ArrayConditioning.load(text_dir, "validation_").all()
    real, skipped = None, []
    if images_dir is not None:
        meta = json.loads((images_dir / "meta.json").read_text())
        skipped = meta["skipped"]
        if skipped and not skip:  # decode-time failures recorded by an earlier `dmd2 prepare`
            raise DataError(f"cannot read image {Path(cfg.images) / skipped[0]}" + (f" (and {len(skipped) - 1} more)" if len(skipped) > 1 else "")
                            + ": replace or delete it, or set data.skip_unreadable_images=true")
        buckets = [tuple(b) for b in meta["buckets"]]
        real = RealData(buckets, [np.load(images_dir / f"b{h}x{w}" / "latents.npy", mmap_mode="r") for h, w in buckets],
                        [ArrayConditioning.load(images_dir / f"b{h}x{w}") for h, w in buckets])
        if skipped:
            write_text_atomic(root / "skipped-images.txt", "".join(f"{Path(cfg.images) / s}\n" for s in skipped)) if main else None
            say(f"skipped {len(skipped)} unreadable image(s): {', '.join(skipped[:10])}{' ...' if len(skipped) > 10 else ''} "
                f"(full list: {root / 'skipped-images.txt'})")
    if cfg.gan_real_data == "teacher":
        if teacher_call is None:
            raise ValueError("gan.real_data=teacher needs teacher_call")
        shape = _latent_shape(model.unet, model.vae, res)
        real = _teacher_samples(cfg, model, cond, uncond, shape, root, text_key, teacher_call, device, dtype, rank, world, barrier, stats, show, say)
    if stats["reused"] and not (stats["encoded_prompts"] or stats["encoded_images"] or stats["generated_teacher_samples"]):
        say(f"data cache reused: {root} ({', '.join(stats['reused'])})")
    return PreparedData(prompts, cond, uncond if cfg.dmd.uncond == "empty_prompt" else uncond.zeros_like(), val_prompts, val_cond,
                        uncond if cfg.dmd.uncond == "empty_prompt" else uncond.zeros_like(), real, skipped, stats, root)


def _encode(cfg, model, device, prompts, val_prompts, records, unreadable, text_dir, images_dir, stats, show, say):
    from trainer import generate as gen
    from trainer.conditioning import encode_prompts, time_ids

    res, bs = cfg.resolution, cfg.data.encode_batch_size
    if model.text_encoder is None or model.text_encoder_2 is None:
        raise DataError("the teacher was loaded without its text encoders: they are needed once to encode the prompts")

    def encode(texts: list[str], desc: str) -> Conditioning:
        parts = [encode_prompts(model, texts[i : i + bs], res, batch_size=bs, device=device)
                 for i in tqdm(range(0, len(texts), bs), desc=desc, disable=not show or len(texts) <= bs, leave=False)]
        return Conditioning.cat(parts)

    buckets: dict[tuple[int, int], list] = {}
    if images_dir is not None:
        grid = buckets_for(res, _bucket_multiple(model)) if cfg.data.buckets else [(res, res)]
        for r in records:
            buckets.setdefault(nearest_bucket(r.size or (res, res), grid), []).append(r)
    model.text_encoder.to(device)
    model.text_encoder_2.to(device)
    try:
        if text_dir is not None:
            tmp = _tmp_dir(text_dir)
            _save_conditioning(tmp, encode(prompts, "encoding prompts"))
            _save_conditioning(tmp, encode([""], "encoding"), "uncond_")
            _save_conditioning(tmp, encode(val_prompts, "encoding validation prompts"), "validation_")
            stats["encoded_prompts"] = len(prompts) + len(val_prompts) + 1
            _commit(tmp, text_dir, {"format": FORMAT, "teacher": model.content_hash, "resolution": res, "prompts": len(prompts),
                                    "validation_prompts": val_prompts})
            say(f"encoded {len(prompts)} prompt(s) into {text_dir}")
        caption_cond = {}
        if images_dir is not None:
            for b, recs in buckets.items():
                caption_cond[b] = encode([r.caption for r in recs], f"encoding captions {b[0]}x{b[1]}")
    finally:
        model.text_encoder.to("cpu")
        model.text_encoder_2.to("cpu")
        _empty_cache(device)
    if images_dir is None:
        return
    if model.vae is None:
        raise DataError("the teacher was loaded without its VAE: it is needed once to encode the real images")
    tmp = _tmp_dir(images_dir)
    skipped = [p.name for p in unreadable]
    kept_buckets = []
    vae_batch = max(1, bs // 8)
    model.vae.to(device)
    bar = tqdm(total=sum(len(v) for v in buckets.values()), desc="encoding images", disable=not show, leave=False)
    try:
        for (bh, bw), recs in sorted(buckets.items()):
            latents, ids, keep = [], [], []
            for i in range(0, len(recs), vae_batch):
                images = []
                for j, r in enumerate(recs[i : i + vae_batch], start=i):
                    try:
                        image, original, crop = load_image_bucket(r.path, (bh, bw))
                    except Exception:  # truncated or otherwise undecodable despite a valid header
                        skipped.append(r.path.name)
                        continue
                    images.append(image)
                    ids.append(time_ids((bh, bw), crop, original))
                    keep.append(j)
                if images:
                    latents.append(gen.encode(model.vae, torch.stack(images)).cpu())
                bar.update(len(recs[i : i + vae_batch]))
            if not keep:
                continue
            folder = tmp / f"b{bh}x{bw}"
            folder.mkdir()
            c = caption_cond[(bh, bw)].index(keep)
            _save_conditioning(folder, Conditioning(c.prompt_embeds, c.pooled, torch.stack(ids)))
            np.save(folder / "latents.npy", torch.cat(latents).numpy().astype(STORE))
            (folder / "files.txt").write_text("".join(f"{recs[j].path.name}\n" for j in keep))
            kept_buckets.append([bh, bw])
            stats["encoded_images"] += len(keep)
    finally:
        bar.close()
        model.vae.to("cpu")
        _empty_cache(device)
    if not kept_buckets:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DataError(f"no readable images in {cfg.images}: add some or remove `images`")
    _commit(tmp, images_dir, {"format": FORMAT, "teacher": model.content_hash, "resolution": res, "buckets": kept_buckets,
                              "images": stats["encoded_images"], "skipped": sorted(skipped)})
    say(f"encoded {stats['encoded_images']} image(s) in {len(kept_buckets)} bucket(s) into {images_dir}"
        + (f"; skipped {len(skipped)} unreadable" if skipped else ""))


def _teacher_samples(cfg, model, cond: ArrayConditioning, uncond: Conditioning, shape, root: Path, text_key: str, teacher_call,
                     device, dtype, rank, world, barrier, stats, show, say) -> RealData:
    """GAN real data from the teacher itself: many-step CFG samples, generated in parts, resumable."""
    from safetensors.torch import load_file

    from trainer import generate as gen
    from trainer.export import save_safetensors_atomic

    n, per = cfg.gan.teacher_samples, max(1, cfg.data.generate_batch_size)
    key = _digest({"v": FORMAT, "text": text_key, "shape": list(shape), "n": n, "steps": cfg.gan.teacher_steps, "cfg": cfg.gan.teacher_cfg,
                   "seed": cfg.seed, "per": per, "uncond": cfg.dmd.uncond, "pt": model.schedule.prediction_type})
    folder = root / f"teacher-{key[:20]}"
    parts = [(i, folder / f"part-{i // per:05d}.safetensors") for i in range(0, n, per)]
    mine = [(i, p) for k, (i, p) in enumerate(parts) if k % world == rank and not p.is_file()]
    if mine:
        folder.mkdir(parents=True, exist_ok=True)
        call = teacher_call()
        u = uncond if cfg.dmd.uncond == "empty_prompt" else uncond.zeros_like()
        done = len(parts) - len([p for _, p in parts if not p.is_file()])
        if done and rank == 0:
            say(f"teacher samples: continuing at part {done + 1} of {len(parts)} ({folder})")
        for i, path in tqdm(mine, desc="teacher samples for the GAN", disable=not show):
            sel = torch.arange(i, min(i + per, n))
            idx = sel % len(cond)
            lat = gen.sample_teacher(call, model.schedule, cond.index(idx), u.index([0] * len(sel)), cfg.gan.teacher_steps,
                                     cfg.gan.teacher_cfg, [cfg.seed * 100003 + int(j) for j in sel], shape, device=device, dtype=dtype)
            save_safetensors_atomic({"latents": lat.float().cpu().contiguous(), "prompt_index": idx}, path)
            stats["generated_teacher_samples"] += len(sel)
    barrier()
    missing = [p for _, p in parts if not p.is_file()]
    if missing:
        raise DataError(f"teacher samples incomplete ({len(missing)} part(s) missing in {folder}): put data.cache_dir on storage every process can read")
    if not mine:
        stats["reused"].append(folder.name)
    loaded = [load_file(p) for _, p in parts]
    latents = torch.cat([t["latents"] for t in loaded])
    index = torch.cat([t["prompt_index"] for t in loaded])
    write_text_atomic(folder / "meta.json", json.dumps({"samples": n, "parts": len(parts)})) if rank == 0 else None
    return RealData([(cfg.resolution, cfg.resolution)], [latents], [cond.index(index)], source="teacher")


def _empty_cache(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
