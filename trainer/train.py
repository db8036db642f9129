"""The DMD2 training loop: load, encode, then iterate (critic every step, student every ``update_every``-th),
with logging, validation grids, checkpoints and the final LoRA export. One function, ``train``, to read top to bottom;
the per-iteration math lives in ``trainer.dmd2`` and ``trainer.objectives``."""
from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from trainer import generate as gen
from trainer.checkpoint import find_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from trainer.conditioning import encode_prompts
from trainer.config import TrainConfig, dump_yaml, to_dict
from trainer.data import load_image, read_image_folder, read_prompts
from trainer.dmd2 import DMD2Settings, Losses, StepRandomness, critic_losses, student_input, student_losses
from trainer.errors import TrainingDivergedError
from trainer.export import kohya_state_dict, recipe_metadata, save_safetensors_atomic
from trainer.models.gan_head import GANHead
from trainer.models.roles import CRITIC, STUDENT, Conditioning, DMD2Roles
from trainer.objectives import dmd_timestep_range
from trainer.schedule import output_to_x0


def step_seed(seed: int, step: int, rank: int | None) -> int:
    """A well-mixed seed for (seed, step[, rank]); rank None gives the value shared by all processes."""
    words = [seed, step] if rank is None else [seed, step, rank + 1]
    return int(np.random.SeedSequence(words).generate_state(1, dtype=np.uint64)[0] % (2**63))


@dataclass
class TrainingData:
    prompts: list[str]
    cond: Conditioning  # all prompts, CPU
    uncond: Conditioning  # one row
    real_latents: torch.Tensor | None  # CPU
    real_cond: Conditioning | None
    validation_cond: Conditioning
    validation_uncond: Conditioning
    validation_prompts: list[str]


def _prepare_data(cfg: TrainConfig, model, device, latent_shape) -> TrainingData:
    """Read and encode everything once (text encoders and VAE on the device only for this), then free them."""
    prompts = read_prompts(cfg.prompts)
    records = []
    if cfg.gan_real_data == "images":
        records, skipped = read_image_folder(cfg.images, skip_unreadable=cfg.data.skip_unreadable_images)
        if skipped:
            print(f"skipped {len(skipped)} unreadable image(s): {', '.join(p.name for p in skipped[:10])}")
    val_prompts = cfg.validation.prompts or prompts[:4]
    model.text_encoder.to(device)
    model.text_encoder_2.to(device)
    encode = lambda texts: encode_prompts(model, texts, cfg.resolution, batch_size=cfg.data.encode_batch_size, device=device)  # noqa: E731
    cond = encode(prompts)
    empty = encode([""])
    uncond = empty if cfg.dmd.uncond == "empty_prompt" else empty.zeros_like()
    val_cond = encode(val_prompts)
    real_latents = real_cond = None
    if records:
        model.vae.to(device)
        images, crops = [], []
        for r in tqdm(records, desc="encoding images", leave=False):
            image, original, crop = load_image(r.path, cfg.resolution)
            images.append(image)
            crops.append((original, crop))
        real_latents = torch.cat([gen.encode(model.vae, torch.stack(images[i : i + 8])).cpu() for i in range(0, len(images), 8)])
        real_cond = encode([r.caption for r in records])
        for i, (original, crop) in enumerate(crops):  # SDXL micro-conditioning: the real image's size and crop
            real_cond.time_ids[i] = torch.tensor([*original, *crop, cfg.resolution, cfg.resolution], dtype=torch.float32)
        model.vae.to("cpu")
    model.text_encoder.to("cpu")
    model.text_encoder_2.to("cpu")
    return TrainingData(prompts, cond, uncond, real_latents, real_cond, val_cond, uncond, val_prompts)


def _teacher_real_data(cfg, roles, model, data: TrainingData, device, dtype, latent_shape, cache_dir: Path):
    """GAN real data from the teacher itself (no image folder): many-step CFG samples, generated once and cached.
    The GAN then pushes the student towards the teacher's own outputs; real images would add real-data signal."""
    from safetensors.torch import load_file

    n = cfg.gan.teacher_samples
    key = f"teacher-{model.content_hash[:12]}-{cfg.resolution}-{n}-{cfg.gan.teacher_steps}-{cfg.gan.teacher_cfg}-{cfg.seed}"
    path = cache_dir / f"{key}.safetensors"
    if path.is_file():
        cached = load_file(path)
        return cached["latents"], data.cond.index(cached["prompt_index"])
    idx = torch.arange(n) % len(data.prompts)
    latents = []
    with roles.adapters_off():
        for i in tqdm(range(0, n, 8), desc="teacher samples for the GAN", leave=False):
            sel = idx[i : i + 8]
            latents.append(gen.sample_teacher(gen.unet_call(roles.unet), model.schedule, data.cond.index(sel), data.uncond.index([0] * len(sel)),
                                              cfg.gan.teacher_steps, cfg.gan.teacher_cfg, [cfg.seed * 100003 + int(j) for j in range(i, i + len(sel))],
                                              latent_shape, device=device, dtype=dtype).float().cpu())
    latents = torch.cat(latents)
    save_safetensors_atomic({"latents": latents, "prompt_index": idx}, path)
    return latents, data.cond.index(idx)


class StopFlag:
    """Ctrl-C asks the loop to stop after the current iteration (a checkpoint is written then); a second Ctrl-C
    interrupts at once. Stopping between iterations keeps the saved state exactly resumable."""

    def __init__(self):
        self.requested = False

    @contextlib.contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():
            yield self  # signals reach only the main thread; callers such as the web app set `requested` instead
            return
        previous = signal.getsignal(signal.SIGINT)

        def handler(signum, frame):
            if self.requested:
                raise KeyboardInterrupt
            self.requested = True
            print("\nstopping after this iteration (Ctrl-C again to abort without a checkpoint)")

        signal.signal(signal.SIGINT, handler)
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, previous)


def _lr_lambda(warmup: int):
    return lambda step: min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0


def _finite_or_stop(losses: Losses, step: int):
    for name, value in losses.values.items():
        if not math.isfinite(value):
            raise TrainingDivergedError(f"loss {name} is {value} at step {step}: lower the learning rates or check the teacher; "
                                        "the last checkpoint was left intact (resume with --resume latest)")


def _sync_and_clip(params, accelerator, max_norm: float) -> float:
    """All-reduce adapter gradients across processes (the frozen base is never reduced), then clip."""
    if accelerator.num_processes > 1:
        for p in params:
            if p.grad is not None:
                torch.distributed.all_reduce(p.grad, op=torch.distributed.ReduceOp.AVG)
    return float(torch.nn.utils.clip_grad_norm_(params, max_norm))


def train(cfg: TrainConfig, resume: str | None = None, stop: StopFlag | None = None) -> Path | None:
    """Run DMD2 and return the path of the exported student LoRA (None when stopped early: resume to finish)."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    from trainer.models.loading import load_sdxl

    cfg.validate()
    out = Path(cfg.output_dir)
    mp = cfg.mixed_precision if cfg.mixed_precision != "auto" else ("bf16" if torch.cuda.is_available() else "no")
    accelerator = Accelerator(mixed_precision=mp, log_with="tensorboard",
                              project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")))
    device, rank, main = accelerator.device, accelerator.process_index, accelerator.is_main_process
    weight_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mp, torch.float32)
    resume_path = find_checkpoint(out, resume) if resume else None  # fail fast, before loading anything

    model = load_sdxl(cfg.model, prediction_type=cfg.prediction_type, zero_terminal_snr=cfg.zero_terminal_snr, allow_pickle=cfg.allow_pickle)
    schedule = model.schedule
    latent_shape = gen.latent_shape(model.unet, model.vae, cfg.resolution)
    data = _prepare_data(cfg, model, device, latent_shape)

    torch.manual_seed(cfg.seed)  # adapter and head initialisation: identical on every rank and in every rerun
    roles = DMD2Roles(gen.place(model.unet, device, weight_dtype), rank=cfg.lora.rank, alpha=cfg.lora.alpha, critic=cfg.critic,
                      critic_rank=cfg.lora.critic_rank, critic_alpha=cfg.lora.critic_alpha)
    if roles.full_critic is not None:
        roles.full_critic.to(device)
    real_latents, real_cond = data.real_latents, data.real_cond
    if cfg.gan_real_data == "teacher":
        real_latents, real_cond = _teacher_real_data(cfg, roles, model, data, device, weight_dtype, latent_shape, out / "cache")
    use_gan = cfg.gan_real_data != "none"
    head = GANHead.for_unet(model.unet, latent_shape[-1]).to(device) if use_gan else None
    settings = DMD2Settings(tuple(cfg.student.timesteps), cfg.student.backward_simulation, cfg.dmd.guidance_scale,
                            dmd_timestep_range(schedule.num_train_timesteps, cfg.dmd.min_t, cfg.dmd.max_t),
                            cfg.gan.student_weight, cfg.gan.critic_weight, use_gan)

    adamw = dict(betas=(cfg.optim.beta1, cfg.optim.beta2), weight_decay=cfg.optim.weight_decay)
    student_params = roles.student_parameters()
    critic_groups = [{"params": roles.critic_parameters(), "lr": cfg.dmd.critic_lr}]
    if head is not None:
        critic_groups.append({"params": list(head.parameters()), "lr": cfg.gan.head_lr or cfg.dmd.critic_lr})
    critic_params = [p for g in critic_groups for p in g["params"]]
    student_opt = torch.optim.AdamW(student_params, lr=cfg.student.lr, **adamw)
    critic_opt = torch.optim.AdamW(critic_groups, **adamw)
    student_sched = torch.optim.lr_scheduler.LambdaLR(student_opt, _lr_lambda(cfg.optim.warmup_steps // cfg.student.update_every))
    critic_sched = torch.optim.lr_scheduler.LambdaLR(critic_opt, _lr_lambda(cfg.optim.warmup_steps))

    def weights() -> dict:
        w = {STUDENT: {n: p for n, p in roles.unet.named_parameters() if f".{STUDENT}." in n}}
        w[CRITIC] = roles.full_critic.state_dict() if roles.full_critic is not None else {n: p for n, p in roles.unet.named_parameters() if f".{CRITIC}." in n}
        if head is not None:
            w["gan_head"] = head.state_dict()
        return w

    start = 0
    if resume_path is not None:
        saved, state, info = load_checkpoint(resume_path)
        for stem, tensors in saved.items():
            target = {STUDENT: roles.unet, "gan_head": head}.get(stem, roles.full_critic if roles.full_critic is not None else roles.unet)
            missing = set(tensors) - set(target.state_dict())
            if missing:
                raise TrainingDivergedError(f"checkpoint {resume_path} does not match this config ({len(missing)} unknown tensors in {stem}): "
                                            "resume with the config it was trained with")
            target.load_state_dict(tensors, strict=False)
        student_opt.load_state_dict(state["student_opt"])
        critic_opt.load_state_dict(state["critic_opt"])
        student_sched.load_state_dict(state["student_sched"])
        critic_sched.load_state_dict(state["critic_sched"])
        set_rng_state(state["rng"])
        start = info["step"]
        if main:
            print(f"resumed from {resume_path} at step {start}")

    def checkpoint(step: int) -> Path | None:
        if not main:
            return None
        state = {"student_opt": student_opt.state_dict(), "critic_opt": critic_opt.state_dict(),
                 "student_sched": student_sched.state_dict(), "critic_sched": critic_sched.state_dict(), "rng": rng_state()}
        return save_checkpoint(out, step, weights=weights(), training_state=state,
                               info={"config": to_dict(cfg), "data_position": {"sampler": "per-step seeded", "next_step": step},
                                     "teacher": {"name": model.name, "hash": model.content_hash, "prediction_type": schedule.prediction_type}},
                               keep=cfg.keep_checkpoints)

    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(dump_yaml(cfg))
        accelerator.init_trackers("dmd2", config={k: str(v) for k, v in _flatten(to_dict(cfg)).items()})
    teacher_row: list = []

    def validate(step: int):
        if not main or model.vae is None:
            return
        seeds = [s for s in cfg.validation.seeds for _ in data.validation_prompts]
        cond = Conditioning.cat([data.validation_cond] * len(cfg.validation.seeds))
        model.vae.to(device)
        if not teacher_row:  # the teacher does not change: sample it once
            with roles.adapters_off():
                lat = gen.sample_teacher(gen.unet_call(roles.unet), schedule, cond, data.validation_uncond.index([0] * len(cond)),
                                         cfg.validation.teacher_steps, cfg.validation.teacher_cfg, seeds, latent_shape, device=device, dtype=weight_dtype)
            teacher_row.extend(gen.to_pil(gen.decode(model.vae, lat)))
        roles._activate(STUDENT)
        lat = gen.sample_student(gen.unet_call(roles.unet), schedule, cond, cfg.student.timesteps, seeds, latent_shape, device=device, dtype=weight_dtype)
        student_row = gen.to_pil(gen.decode(model.vae, lat))
        model.vae.to("cpu")
        gen.save_png_atomic(gen.grid([teacher_row, student_row]), out / "validation" / f"step-{step:08d}.png")

    n_prompts, n_real = len(data.prompts), (0 if real_latents is None else len(real_latents))
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="dmd2", disable=not main, dynamic_ncols=True)
    last_log = time.time()
    stop = stop or StopFlag()
    with stop.installed():
        for step in bar:
            rng = StepRandomness(torch.Generator().manual_seed(step_seed(cfg.seed, step, rank)),
                                 torch.Generator().manual_seed(step_seed(cfg.seed, step, None)))
            idx = torch.randint(n_prompts, (cfg.batch_size,), generator=rng.local)
            cond = data.cond.index(idx).to(device, weight_dtype)
            uncond = data.uncond.index([0] * cfg.batch_size).to(device, weight_dtype)
            real_x0 = real_c = None
            if use_gan:
                ridx = torch.randint(n_real, (cfg.batch_size,), generator=rng.local)
                real_x0, real_c = real_latents[ridx].to(device, weight_dtype), real_cond.index(ridx).to(device, weight_dtype)
            update_student = step % cfg.student.update_every == 0
            losses = Losses()
            with accelerator.autocast():
                x_in, t = student_input(roles, schedule, cond, latent_shape, settings, rng, device, weight_dtype, real_x0)
                with torch.set_grad_enabled(update_student):
                    x0 = output_to_x0(schedule, roles.student(x_in, t, cond), x_in, t)
                if update_student:
                    loss = student_losses(roles, head, schedule, x0, cond, uncond, settings, rng, losses)
                    _finite_or_stop(losses, step)
                    loss.backward()
                    losses.values["student/grad_norm"] = _sync_and_clip(student_params, accelerator, cfg.optim.grad_clip)
                    student_opt.step()
                    student_sched.step()
                    student_opt.zero_grad(set_to_none=True)
                critic_opt.zero_grad(set_to_none=True)  # also drops what the GAN generator loss left on the critic
                loss = critic_losses(roles, head, schedule, x0, cond, settings, rng, losses, real_x0, real_c)
                _finite_or_stop(losses, step)
                loss.backward()
                losses.values["critic/grad_norm"] = _sync_and_clip(critic_params, accelerator, cfg.optim.grad_clip)
                critic_opt.step()
                critic_sched.step()
                critic_opt.zero_grad(set_to_none=True)
            if main:
                accelerator.log(losses.values, step=step)
                if time.time() - last_log > 0.5 or step == cfg.steps - 1:
                    bar.set_postfix({_SHORT[k]: f"{v:.3g}" for k, v in losses.values.items() if k in _SHORT})
                    last_log = time.time()
            done = step + 1
            if cfg.validate_every and (done % cfg.validate_every == 0 or done == cfg.steps):
                validate(done)
            if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < cfg.steps:
                checkpoint(done)
            accelerator.wait_for_everyone()
            if stop.requested and done < cfg.steps:
                bar.close()
                path = checkpoint(done)
                if main:
                    print(f"stopped at step {done}: saved {path}; continue with --resume latest")
                accelerator.end_training()
                return None
    bar.close()
    checkpoint(cfg.steps)
    accelerator.end_training()
    lora_path = out / f"dmd2_{_safe_name(model.name)}_{len(cfg.student.timesteps)}step_lora.safetensors"
    if main:
        meta = recipe_metadata(timesteps=cfg.student.timesteps, rank=cfg.lora.rank, alpha=cfg.lora.alpha, training_steps=cfg.steps,
                               teacher=model.name, teacher_hash=model.content_hash, prediction_type=schedule.prediction_type)
        save_safetensors_atomic(kohya_state_dict(roles.unet, STUDENT), lora_path, meta)
    return lora_path


_SHORT = {"student/dmd": "dmd", "student/gan": "g_gan", "critic/denoise": "denoise", "critic/gan": "d_gan"}


def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-." else "_" for c in Path(name).stem)[:60] or "model"


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
