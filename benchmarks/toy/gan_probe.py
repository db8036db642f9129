"""How well a toy run's GAN discriminator tells the real digits from the student's samples, against a fresh head that
learns the same task on the same (frozen) critic features (NOTES.md point 34). The GAN can only pull the student
towards the data by what its discriminator sees: a trained head at chance, where a fresh one separates the two sets,
means the student keeps moving to where the head is blind.

    python benchmarks/toy/gan_probe.py outputs/exp18/dsplit-s0 --steps 1400

For each checkpoint: the student samples ``--n`` digits with its own sampler (or stops at ``--student-step`` k and
takes that step's x0, which backward simulation also feeds the GAN), the real digits are encoded by the teacher's
VAE, and both are re-noised within a few timestep bands and read by the critic (the one for that student step, with
one per step). Printed per band: the balanced accuracy (real read as real, sample as sample) of the
run's own head, and of a fresh head of the same shape trained as the run trains its head (its batch, learning rate and
timestep range, AdamW) for ``--fresh-steps`` steps on the other half of the images, the student held still. The last
line is all of it as JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]

from trainer import generate as gen  # noqa: E402
from trainer import objectives as obj  # noqa: E402
from trainer import sampling  # noqa: E402
from trainer.errors import DMD2Error  # noqa: E402
from trainer.models.gan_head import GANHead  # noqa: E402
from trainer.schedule import add_noise  # noqa: E402
from trainer.toy.digits import load_digits_32  # noqa: E402
from trainer.toy.rows import digit_conditioning  # noqa: E402
from critic_fit import load_weights, roles_for_run  # noqa: E402
from score_checkpoints import checkpoints_at  # noqa: E402

BANDS = ((0, 50), (50, 200), (200, 400), (400, 700), (700, 1000))


def balanced_accuracy(fake_logits: torch.Tensor, real_logits: torch.Tensor) -> float:
    """Half the share of samples read as fake (logit < 0) plus half the share of reals read as real."""
    return float((fake_logits < 0).float().mean() + (real_logits > 0).float().mean()) / 2


def train_head(head: torch.nn.Module, features, fake: torch.Tensor, real: torch.Tensor, steps: int, batch: int,
               t_max: int, lr: float, betas=(0.9, 0.999), weight_decay: float = 0.01, seed: int = 0) -> torch.nn.Module:
    """``head`` trained by the GAN's critic loss on ``features(x0, t)`` of random rows of ``fake`` and ``real``,
    each re-noised at t ~ U[0, t_max], one AdamW step per batch: what the trainer does, minus the moving student."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(head.parameters(), lr, betas=betas, weight_decay=weight_decay)
    for _ in range(steps):
        f = fake[torch.randint(len(fake), (batch,), generator=g)]
        r = real[torch.randint(len(real), (batch,), generator=g)]
        t_f, t_r = (torch.randint(0, t_max + 1, (batch,), generator=g) for _ in range(2))
        loss = obj.gan_critic_loss(head(features(f, t_f)), head(features(r, t_r)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return head


def probe(model, roles, cfg, head: GANHead, n: int, fresh_steps: int, student_step: int = -1, seed: int = 0) -> dict[str, list[float]]:
    """{"t0-50": [run's head accuracy, fresh head accuracy], ...} on held-out halves of samples and real digits; the
    samples are student step ``student_step``'s x0 (-1: the last step's, the final samples)."""
    shape = gen.latent_shape(model.unet, model.vae, cfg.resolution)
    images, labels = load_digits_32()
    if model.vae.config.in_channels == 3:
        images = images.repeat(1, 3, 1, 1)
    real = torch.cat([gen.encode(model.vae, images[i:i + 256]) for i in range(0, len(images), 256)])
    digits = torch.tensor([d for _ in range(n // 10 + 1) for d in range(10)][:n])
    cond = digit_conditioning(model, digits.tolist() + labels.tolist(), cfg.resolution)
    sigmas = sampling.sigmas_for_timesteps(model.schedule.sigmas, cfg.student.timesteps)
    noise = gen.seeded_noise([seed * 1_000_003 + i for i in range(n)], shape)
    k = student_step % len(cfg.student.timesteps)  # its critic judges step k's samples
    with torch.no_grad():
        denoise = gen.make_denoiser(roles.student, model.schedule, cond.index(torch.arange(n)))
        fake = sampling.sample_dmd2(denoise, sampling.initial_latent(noise(), sigmas[0]), torch.cat([sigmas[:k + 1], sigmas.new_zeros(1)]), noise)
    # rows index [fake; real] so every feature call gets its own conditioning
    pool = torch.cat([fake, real])
    rows = torch.arange(len(pool))
    g = torch.Generator().manual_seed(seed + 1)

    def features(x_rows: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x0 = pool[x_rows]
        with torch.no_grad():
            return roles.critic_features(add_noise(model.schedule, x0, torch.randn(x0.shape, generator=g), t), t, cond.index(x_rows), k)

    fake_rows, real_rows = rows[:n], rows[n:][torch.randperm(len(real), generator=g)]
    fit_fake, test_fake = fake_rows[: n // 2], fake_rows[n // 2:]
    fit_real, test_real = real_rows[: len(real) // 2], real_rows[len(real) // 2:]
    fresh = GANHead.for_unet(model.unet, shape[-1])
    t_max = round(cfg.gan.max_t * (model.schedule.num_train_timesteps - 1))
    train_head(fresh, features, fit_fake, fit_real, fresh_steps, cfg.batch_size, t_max, cfg.gan.head_lr or cfg.dmd.critic_lr,
               (cfg.optim.beta1, cfg.optim.beta2), cfg.optim.weight_decay, seed)
    out = {}
    with torch.no_grad():
        for low, high in BANDS:
            t_f, t_r = (torch.randint(low, high, (len(r),), generator=g) for r in (test_fake, test_real))
            f, r = features(test_fake, t_f), features(test_real, t_r)
            out[f"t{low}-{high}"] = [round(balanced_accuracy(h(f), h(r)), 3) for h in (head, fresh)]
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--steps", required=True, help="comma-separated checkpoint steps, e.g. 1000,1400")
    parser.add_argument("--n", type=int, default=1000, help="student samples (default 1,000; half fit the fresh head)")
    parser.add_argument("--fresh-steps", type=int, default=700, help="the fresh head's training steps (default 700)")
    parser.add_argument("--student-step", type=int, default=-1, help="probe this student step's x0 (0 = the first; default: the last)")
    args = parser.parse_args(argv)
    try:
        found = checkpoints_at(args.run_dir, args.steps)
        if not all((found[s] / "gan_head.safetensors").is_file() for s in found):
            raise DMD2Error(f"{args.run_dir} trained without the GAN (no gan_head.safetensors): nothing to probe")
        model, roles, cfg = roles_for_run(args.run_dir)
        steps = len(cfg.student.timesteps)
        if not -steps <= args.student_step < steps:
            raise DMD2Error(f"--student-step must be in 0..{steps - 1} for this {steps}-step student, got {args.student_step}")
        shape = gen.latent_shape(model.unet, model.vae, cfg.resolution)
        results = {}
        for step in found:
            load_weights(roles, found[step])
            head = GANHead.for_unet(model.unet, shape[-1])
            head.load_state_dict(load_file(found[step] / "gan_head.safetensors"))
            results[step] = probe(model, roles, cfg, head.eval(), args.n, args.fresh_steps, args.student_step)
            which = f"student step {args.student_step % steps}'s x0" if args.student_step != -1 else "samples"
            print(f"step {step}: balanced accuracy, the run's head / a fresh head ({args.fresh_steps} steps), real vs {which}")
            print("  " + "  ".join(f"{band}: {a:.3f} / {b:.3f}" for band, (a, b) in results[step].items()))
    except (DMD2Error, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({str(s): r for s, r in results.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
