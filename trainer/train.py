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
from typing import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from trainer import generate as gen
from trainer.checkpoint import find_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from trainer.config import TrainConfig, dump_yaml, to_dict
from trainer.distributed import sync_and_clip
from trainer.dmd2 import DMD2Settings, Losses, StepRandomness, critic_losses, student_input, student_losses
from trainer.errors import ConfigError, TrainingDivergedError
from trainer.export import average_metadata, kohya_state_dict, recipe_metadata, save_safetensors_atomic
from trainer.files import write_text_atomic
from trainer.memory import MemoryPlan, enable_gradient_checkpointing, make_optimizer, resolve as resolve_memory
from trainer.models.gan_head import GANHead
from trainer.models.roles import CRITIC, STUDENT, Conditioning, DMD2Roles
from trainer.objectives import timestep_range
from trainer.prepare import PreparedData, RealData, prepare
from trainer.schedule import output_to_x0
from trainer.weight_average import STEM as AVERAGE, WeightAverage


def updates_student(step: int, every: int) -> bool:
    """Whether iteration ``step`` updates the student (the two time-scale rule: every ``every``-th; the critic every one)."""
    return step % every == 0


def step_seed(seed: int, step: int, rank: int | None) -> int:
    """A well-mixed seed for (seed, step[, rank]); rank None gives the value shared by all processes."""
    words = [seed, step] if rank is None else [seed, step, rank + 1]
    return int(np.random.SeedSequence(words).generate_state(1, dtype=np.uint64)[0] % (2**63))


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


def _lr_lambda(warmup: int, total: int, kind: str = "constant"):
    """LR factor per optimiser step: linear warm-up over ``warmup`` steps, then constant or a cosine to 0 at ``total``."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if kind == "cosine":
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0
    return factor


def _finite_or_stop(losses: Losses, step: int):
    for name, value in losses.values.items():
        if not math.isfinite(value):
            raise TrainingDivergedError(f"loss {name} is {value} at step {step}: lower the learning rates or check the teacher; "
                                        "the last checkpoint was left intact (resume with --resume latest)")


@dataclass
class TrainingSetup:
    """Everything one DMD2 iteration needs. Built by ``build_training``; ``train_iteration`` runs one step. The loop
    below and ``benchmarks/train_cycle.py`` use exactly these two functions."""

    roles: DMD2Roles
    head: GANHead | None
    schedule: object
    settings: DMD2Settings
    student_opt: torch.optim.Optimizer
    critic_opt: torch.optim.Optimizer
    student_sched: torch.optim.lr_scheduler.LRScheduler
    critic_sched: torch.optim.lr_scheduler.LRScheduler
    student_params: list
    critic_params: list
    cond: object  # .index(idx) -> Conditioning, len(): the training prompts
    uncond: Conditioning
    real: RealData | None
    latent_shape: tuple
    device: torch.device
    dtype: torch.dtype
    batch_size: int
    micro_batch_size: int
    update_every: int
    grad_clip: float
    seed: int
    rank: int = 0
    world: int = 1
    autocast: Callable = contextlib.nullcontext
    student_batch_size: int | None = None  # samples behind each student update (default: batch_size)


def make_roles(cfg: TrainConfig, unet) -> DMD2Roles:
    """The config's student and critic adapters (or full critic) on ``unet``; adapters start at zero (the teacher)."""
    return DMD2Roles(unet, rank=cfg.lora.rank, alpha=cfg.lora.alpha, critic=cfg.critic, critic_rank=cfg.lora.critic_rank,
                     critic_alpha=cfg.lora.critic_alpha, critics=len(cfg.student.timesteps) if cfg.dmd.critic_per_step else 1)


def build_training(cfg: TrainConfig, unet, schedule, *, cond, uncond: Conditioning, real: RealData | None, latent_shape,
                   device, weight_dtype, plan: MemoryPlan, rank: int = 0, world: int = 1, autocast: Callable | None = None,
                   quiet: bool = False) -> TrainingSetup:
    """Roles (student/critic adapters on the frozen UNet, placed on ``device`` in ``weight_dtype``), GAN head,
    optimisers and LR schedules, with the memory plan applied. Initialisation is seeded: identical on every rank."""
    device = torch.device(device)
    torch.manual_seed(cfg.seed)  # adapter and head initialisation: identical on every rank and in every rerun
    roles = make_roles(cfg, gen.place(unet, device, weight_dtype))
    for p in roles.adapter_parameters(STUDENT) + (roles.critic_parameters() if roles.full_critic is None else []):
        p.data = p.data.float()  # peft creates adapters in the base's dtype: trainable weights stay fp32 (master weights)
    if roles.full_critic is not None:
        roles.full_critic.to(device)
    if plan.gradient_checkpointing:
        enable_gradient_checkpointing(roles.unet)
        if roles.full_critic is not None:
            enable_gradient_checkpointing(roles.full_critic)
    use_gan = cfg.gan_real_data != "none"
    head = GANHead.for_unet(unet, latent_shape[-1]).to(device) if use_gan else None
    settings = DMD2Settings(tuple(cfg.student.timesteps), cfg.student.backward_simulation, cfg.dmd.guidance_scale,
                            timestep_range(schedule.num_train_timesteps, cfg.dmd.min_t, cfg.dmd.max_t),
                            cfg.gan.student_weight, cfg.gan.critic_weight, use_gan,
                            timestep_range(schedule.num_train_timesteps, 0.0, cfg.gan.max_t)[1], cfg.dmd.noise_draws,
                            cfg.dmd.critic_loss, cfg.dmd.t_below_step)
    adamw = dict(betas=(cfg.optim.beta1, cfg.optim.beta2), weight_decay=cfg.optim.weight_decay, kind=plan.optimizer, device=device, quiet=quiet)
    student_params = roles.student_parameters()
    critic_groups = [{"params": roles.critic_parameters(), "lr": cfg.dmd.critic_lr}]
    if head is not None:
        critic_groups.append({"params": list(head.parameters()), "lr": cfg.gan.head_lr or cfg.dmd.critic_lr})
    critic_params = [p for g in critic_groups for p in g["params"]]
    student_opt = make_optimizer(student_params, lr=cfg.student.lr, **adamw)
    critic_opt = make_optimizer(critic_groups, lr=cfg.dmd.critic_lr, **adamw)
    every, kind = cfg.student.update_every, cfg.optim.lr_schedule  # the student's scheduler counts its own updates
    student_sched = torch.optim.lr_scheduler.LambdaLR(student_opt, _lr_lambda(cfg.optim.warmup_steps // every, math.ceil(cfg.steps / every), kind))
    critic_sched = torch.optim.lr_scheduler.LambdaLR(critic_opt, _lr_lambda(cfg.optim.warmup_steps, cfg.steps, kind))
    if autocast is None:
        autocast = lambda: torch.autocast(device.type, dtype=weight_dtype, enabled=weight_dtype != torch.float32)  # noqa: E731
    return TrainingSetup(roles, head, schedule, settings, student_opt, critic_opt, student_sched, critic_sched, student_params,
                         critic_params, cond, uncond, real, tuple(latent_shape), device, weight_dtype, cfg.batch_size,
                         plan.micro_batch_size, cfg.student.update_every, cfg.optim.grad_clip, cfg.seed, rank, world, autocast,
                         student_batch_size=cfg.student.batch_size)


def train_iteration(s: TrainingSetup, step: int) -> Losses:
    """One DMD2 iteration: the student's sample (backward simulation), on every ``update_every``-th step the student
    update (DMD + GAN generator loss), then the critic and GAN head update. Every random draw comes from generators
    seeded by (seed, step[, rank]): a resumed run repeats exactly what a straight run does. A batch larger than the
    micro-batch is processed in chunks whose gradients are accumulated (weighted by their share of the batch). With
    ``student.batch_size`` the student's iterations draw that many samples and the critic trains on the first
    ``batch_size`` of them."""
    rng = StepRandomness(torch.Generator().manual_seed(step_seed(s.seed, step, s.rank)),
                         torch.Generator().manual_seed(step_seed(s.seed, step, None)))
    device, dtype, roles = s.device, s.dtype, s.roles
    update_student = updates_student(step, s.update_every)
    batch = (s.student_batch_size or s.batch_size) if update_student else s.batch_size
    idx = torch.randint(len(s.cond), (batch,), generator=rng.local)
    cond = s.cond.index(idx).to(device, dtype)
    uncond = s.uncond.index([0] * batch).to(device, dtype)
    real_x0 = real_c = None
    if s.settings.use_gan:
        real_x0, real_c = s.real.draw(batch, rng.local)
        real_x0, real_c = real_x0.to(device, dtype), real_c.to(device, dtype)
    chunks = [slice(i, min(i + s.micro_batch_size, batch)) for i in range(0, batch, s.micro_batch_size)]
    split = len(chunks) > 1
    parts: list[tuple[Losses, float]] = []
    fakes = []
    with s.autocast():
        for c in chunks:
            part, share = Losses(), (c.stop - c.start) / batch
            cond_c = cond.index(c) if split else cond
            real_part = real_x0[c] if split and real_x0 is not None else real_x0
            x_in, t = student_input(roles, s.schedule, cond_c, s.latent_shape, s.settings, rng, device, dtype, real_part)
            step_index = s.settings.student_timesteps.index(int(t[0]))  # which student step made this chunk's samples
            with torch.set_grad_enabled(update_student):
                x0 = output_to_x0(s.schedule, roles.student(x_in, t, cond_c), x_in, t)
            if update_student:
                loss = student_losses(roles, s.head, s.schedule, x0, cond_c, uncond.index(c) if split else uncond, s.settings, rng, part,
                                      step_index)
                _finite_or_stop(part, step)
                (loss * share if split else loss).backward(inputs=s.student_params)  # no gradients for the critic here
            fakes.append((x0.detach(), step_index))
            parts.append((part, share))
        if update_student:
            norm = sync_and_clip(s.student_params, s.world, s.grad_clip)
            s.student_opt.step()
            s.student_sched.step()
            s.student_opt.zero_grad(set_to_none=True)
            parts[0][0].values["student/grad_norm"] = norm
        s.critic_opt.zero_grad(set_to_none=True)
        # The critic's chunks: the student's, cut at batch_size (more only when the student drew a bigger batch)
        critic_chunks = [slice(c.start, min(c.stop, s.batch_size)) for c in chunks if c.start < s.batch_size]
        critic_split = split or batch > s.batch_size  # the critic sees a slice even when the student's was whole
        for k, c in enumerate(critic_chunks):
            part, share = Losses(), (c.stop - c.start) / s.batch_size
            fake, step_index = fakes[k][0][: c.stop - c.start], fakes[k][1]
            loss = critic_losses(roles, s.head, s.schedule, fake, cond.index(c) if critic_split else cond, s.settings, rng, part,
                                 real_x0[c] if critic_split and real_x0 is not None else real_x0, real_c.index(c) if critic_split and real_c is not None else real_c,
                                 step_index)
            _finite_or_stop(part, step)
            (loss * share if critic_split else loss).backward(inputs=s.critic_params)
            parts.append((part, share))
        # Only the critics that judged this iteration's samples have gradients (one per student step: the others did
        # not run); every rank drew the same steps, so all reduce the same list
        norm = sync_and_clip([p for p in s.critic_params if p.grad is not None], s.world, s.grad_clip)
        s.critic_opt.step()
        s.critic_sched.step()
        s.critic_opt.zero_grad(set_to_none=True)
    losses = Losses()  # the student's and the critic's chunks, each weighted by its share of its own batch
    for part, share in parts:
        for key, value in part.values.items():
            losses.values[key] = losses.values.get(key, 0.0) + (value if key.endswith("grad_norm") else value * share)
    losses.values["critic/grad_norm"] = norm
    return losses


def adapter_digest(s: TrainingSetup) -> dict[str, str]:
    """sha256 of the trained weights (student, critic, head): equal on every rank when data parallelism is right."""
    import hashlib

    out = {}
    groups = {"student": s.student_params, "critic": s.roles.critic_parameters(), "gan_head": list(s.head.parameters()) if s.head else []}
    for name, params in groups.items():
        h = hashlib.sha256()
        for p in params:
            h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
        out[name] = h.hexdigest()
    return out


def train(cfg: TrainConfig, resume: str | None = None, stop: StopFlag | None = None) -> Path | None:
    """Run DMD2 and return the path of the exported student LoRA (None when stopped early: resume to finish)."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    from trainer.models.loading import load_sdxl

    cfg.validate()
    out = Path(cfg.output_dir)
    mp = cfg.mixed_precision if cfg.mixed_precision != "auto" else ("bf16" if torch.cuda.is_available() else "no")
    # cpu=True without CUDA: under `accelerate launch`/torchrun, CPU processes then form a gloo process group.
    accelerator = Accelerator(mixed_precision=mp, log_with="tensorboard", cpu=not torch.cuda.is_available(),
                              project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")))
    device, rank, main = accelerator.device, accelerator.process_index, accelerator.is_main_process
    world = accelerator.num_processes
    weight_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mp, torch.float32)
    resume_path = find_checkpoint(out, resume) if resume else None  # fail fast, before loading anything
    plan = resolve_memory(cfg.memory, device, batch_size=cfg.batch_size, gradient_checkpointing=cfg.gradient_checkpointing,
                          micro_batch_size=cfg.micro_batch_size, optimizer=cfg.optim.optimizer)
    if main and (device.type == "cuda" or cfg.memory != "auto"):
        print(plan.describe() + (f", {world} processes" if world > 1 else ""))

    model = load_sdxl(cfg.model, prediction_type=cfg.prediction_type, zero_terminal_snr=cfg.zero_terminal_snr, allow_pickle=cfg.allow_pickle)
    schedule = model.schedule
    latent_shape = gen.latent_shape(model.unet, model.vae, cfg.resolution)
    data: PreparedData = prepare(cfg, model, device=device, dtype=weight_dtype, rank=rank, world=world, barrier=accelerator.wait_for_everyone,
                                 teacher_call=lambda: gen.unet_call(gen.place(model.unet, device, weight_dtype)))

    setup = build_training(cfg, model.unet, schedule, cond=data.cond, uncond=data.uncond, real=data.real, latent_shape=latent_shape,
                           device=device, weight_dtype=weight_dtype, plan=plan, rank=rank, world=world, autocast=accelerator.autocast,
                           quiet=not main)
    roles, head = setup.roles, setup.head
    student_opt, critic_opt, student_sched, critic_sched = setup.student_opt, setup.critic_opt, setup.student_sched, setup.critic_sched

    student_weights = {n: p for n, p in roles.unet.named_parameters() if f".{STUDENT}." in n}
    average = WeightAverage(cfg.student.average_from) if cfg.student.average_from is not None else None

    def weights() -> dict:
        w = {STUDENT: student_weights}
        w[CRITIC] = roles.critic_state()
        if head is not None:
            w["gan_head"] = head.state_dict()
        if average is not None and average.count:
            w[AVERAGE] = average.mean
        return w

    start = 0
    if resume_path is not None:
        saved, state, info = load_checkpoint(resume_path)
        saved_average = saved.pop(AVERAGE, None)
        # the student updates before this checkpoint that belong in the mean: the checkpoint must hold their mean
        owed = 0 if average is None else sum(updates_student(k, cfg.student.update_every) for k in range(average.start, info["step"]))
        if owed:
            if saved_average is None or info.get(AVERAGE) != {"start": average.start, "count": owed}:
                raise ConfigError(f"checkpoint {resume_path} (step {info['step']}) lacks the mean of the student's {owed} updates from "
                                  f"student.average_from={average.start}: resume from a checkpoint at or before that iteration, or "
                                  "with the student.average_from the run began with")
            average = WeightAverage(average.start, {k: v.to(device) for k, v in saved_average.items()}, owed)
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
                                     "teacher": {"name": model.name, "hash": model.content_hash, "prediction_type": schedule.prediction_type},
                                     **({AVERAGE: average.info()} if average is not None and average.count else {})},
                               keep=cfg.keep_checkpoints)

    if main:
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "config.yaml", dump_yaml(cfg))
        accelerator.init_trackers("dmd2", config={k: str(v) for k, v in _flatten(to_dict(cfg)).items()})
    teacher_row: list = []

    def decode(lat):
        n = plan.decode_batch_size
        return torch.cat([gen.decode(model.vae, lat[i : i + n]).cpu() for i in range(0, len(lat), n)])

    def validate(step: int):
        if not main or model.vae is None:
            return
        seeds = [s for s in cfg.validation.seeds for _ in data.validation_prompts]
        cond = Conditioning.cat([data.validation_cond] * len(cfg.validation.seeds))
        model.vae.to(device)
        if not teacher_row:  # the teacher does not change: sample it once
            lat = gen.sample_teacher(roles.teacher, schedule, cond, data.validation_uncond.index([0] * len(cond)),
                                     cfg.validation.teacher_steps, cfg.validation.teacher_cfg, seeds, latent_shape, device=device, dtype=weight_dtype)
            teacher_row.extend(gen.to_pil(decode(lat)))
        lat = gen.sample_student(roles.student, schedule, cond, cfg.student.timesteps, seeds, latent_shape, device=device, dtype=weight_dtype)
        student_row = gen.to_pil(decode(lat))
        model.vae.to("cpu")
        gen.save_png_atomic(gen.grid([teacher_row, student_row]), out / "validation" / f"step-{step:08d}.png")

    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="dmd2", disable=not main, dynamic_ncols=True)
    last_log = time.time()
    stop = stop or StopFlag()
    with stop.installed():
        for step in bar:
            losses = train_iteration(setup, step)
            if average is not None and step >= average.start and updates_student(step, cfg.student.update_every):
                average.update(student_weights)
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
            if world > 1:  # every rank stops at the same step, or the collectives of the next one would hang
                flag = torch.tensor([1.0 if stop.requested else 0.0], device=device)
                torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
                stop.requested = bool(flag.item())
            if stop.requested and done < cfg.steps:
                bar.close()
                path = checkpoint(done)
                if main:
                    print(f"stopped at step {done}: saved {path}; continue with --resume latest")
                accelerator.end_training()
                return None
    bar.close()
    checkpoint(cfg.steps)
    _write_rank_digest(setup, cfg.steps)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    lora_path = out / f"dmd2_{_safe_name(model.name)}_{len(cfg.student.timesteps)}step_lora.safetensors"
    if main:
        averaged = average is not None and average.count > 0
        if averaged:
            average.copy_into(student_weights)  # training is over: the LoRA is the mean
        meta = recipe_metadata(timesteps=cfg.student.timesteps, rank=cfg.lora.rank, alpha=cfg.lora.alpha, training_steps=cfg.steps,
                               teacher=model.name, teacher_hash=model.content_hash, prediction_type=schedule.prediction_type,
                               extra=average_metadata(average.info()) if averaged else None)
        save_safetensors_atomic(kohya_state_dict(roles.unet, STUDENT), lora_path, meta)
    return lora_path


def _write_rank_digest(setup: TrainingSetup, step: int) -> None:
    """Test/debug aid: with DMD2_DEBUG_RANK_DIGESTS=DIR every process writes DIR/rank-<r>-step-<n>.json with hashes
    of its trained weights, so a test can check that data parallelism keeps all ranks identical."""
    import json
    import os

    folder = os.environ.get("DMD2_DEBUG_RANK_DIGESTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        write_text_atomic(Path(folder) / f"rank-{setup.rank}-step-{step}.json", json.dumps({"world": setup.world, **adapter_digest(setup)}))


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
