"""How well a toy run's critic (the fake score) denoises the student's own samples, against the teacher (NOTES.md
point 33). The DMD gradient is the critic's x0 prediction minus the teacher's: where the critic denoises the samples
it is trained on worse than the teacher does, that difference is the critic's error more than the gap between the
two distributions.

    python benchmarks/toy/critic_fit.py outputs/exp17/ps-s0 --steps 400,800,1400

For each checkpoint: the student samples digits 0-9 (``--n`` each) with its own sampler; the x0 it predicts at each
of its steps k (what the critic trains on, and what the DMD loss judges: backward simulation) is re-noised at a few
timesteps t, and the critic (the one for step k, with one per step) and the teacher predict x0 from it. Printed per
(k, t): the mean squared x0 error of critic / teacher, and how much critic, teacher and the samples vary within a
digit; the last line is all of it as JSON.
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
from trainer import sampling  # noqa: E402
from trainer.config import load_config  # noqa: E402
from trainer.errors import DMD2Error  # noqa: E402
from trainer.models.loading import load_sdxl  # noqa: E402
from trainer.models.roles import DMD2Roles  # noqa: E402
from trainer.schedule import add_noise, output_to_x0  # noqa: E402
from trainer.train import make_roles  # noqa: E402
from trainer.toy.rows import digit_conditioning  # noqa: E402
from score_checkpoints import checkpoints_at  # noqa: E402

RENOISE_T = (900, 700, 500, 300, 100)


def roles_for_run(run_dir: Path):
    """The run's teacher with its student and critic adapters (zero until a checkpoint is loaded), and its config."""
    cfg = load_config(run_dir / "config.yaml").validate()
    model = load_sdxl(cfg.model, prediction_type=cfg.prediction_type, zero_terminal_snr=cfg.zero_terminal_snr)
    model.unet.eval()
    return model, make_roles(cfg, model.unet), cfg


def load_weights(roles: DMD2Roles, checkpoint: Path) -> None:
    roles.unet.load_state_dict(load_file(checkpoint / "student.safetensors"), strict=False)
    critic = load_file(checkpoint / "critic.safetensors")
    (roles.full_critic if roles.full_critic is not None else roles.unet).load_state_dict(critic, strict=False)


@torch.no_grad()
def critic_fit(model, roles: DMD2Roles, timesteps, n_per_digit: int, resolution: int = 32, seed: int = 0) -> dict[str, dict[str, list[float]]]:
    """{"k{k}t{t}": {"mse": [critic, teacher], "spread": [critic, teacher, samples]}} on the x0 the student predicts
    at each of its steps k: the mean squared error of each prediction of x0, and how much the predictions (and the
    samples themselves) vary within one digit. A denoiser's predictions vary less than the samples do: the
    noise has erased some of what tells them apart."""
    digits = [d for d in range(10) for _ in range(n_per_digit)]
    cond = digit_conditioning(model, digits, resolution)
    digit = torch.tensor(digits)

    def spread(x: torch.Tensor) -> float:  # mean squared deviation from the sample's digit mean
        means = torch.stack([x[digit == d].mean(0) for d in range(10)])[digit]
        return round(float((x - means).pow(2).mean()), 5)

    shape = gen.latent_shape(model.unet, model.vae, resolution)
    sigmas = sampling.sigmas_for_timesteps(model.schedule.sigmas, timesteps)
    denoise = gen.make_denoiser(lambda x, t, c: roles.student(x, t, c), model.schedule, cond)
    renoise = torch.Generator().manual_seed(seed + 1)
    out = {}
    for k in range(len(timesteps)):
        noise = gen.seeded_noise([seed * 1_000_003 + i for i in range(len(digits))], shape)
        x = sampling.initial_latent(noise(), sigmas[0])
        x0 = sampling.sample_dmd2(denoise, x, torch.cat([sigmas[:k + 1], sigmas.new_zeros(1)]), noise)  # step k's x0
        for t_value in RENOISE_T:
            t = torch.full((len(x0),), t_value, dtype=torch.long)
            x_t = add_noise(model.schedule, x0, torch.randn(x0.shape, generator=renoise), t)
            preds = [output_to_x0(model.schedule, output, x_t, t) for output in (roles.critic(x_t, t, cond, k), roles.teacher(x_t, t, cond))]
            out[f"k{k}t{t_value}"] = {"mse": [round(float((p - x0).pow(2).mean()), 5) for p in preds],
                                      "spread": [spread(p) for p in preds] + [spread(x0)]}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--steps", required=True, help="comma-separated checkpoint steps, e.g. 400,800")
    parser.add_argument("--n", type=int, default=30, help="samples per digit (default 30)")
    args = parser.parse_args(argv)
    try:
        found = checkpoints_at(args.run_dir, args.steps)
        model, roles, cfg = roles_for_run(args.run_dir)
        results = {}
        for step in found:
            load_weights(roles, found[step])
            fit = results[step] = critic_fit(model, roles, cfg.student.timesteps, args.n, cfg.resolution)
            for key, what in (("mse", "x0 MSE, critic / teacher"), ("spread", "spread within a digit, critic / teacher / samples")):
                print(f"step {step}: {what}, at t = {', '.join(map(str, RENOISE_T))}")
                for k in range(len(cfg.student.timesteps)):
                    print(f"  student step {k}: " + "  ".join(" / ".join(f"{v:.3f}" for v in fit[f"k{k}t{t}"][key]) for t in RENOISE_T))
    except (DMD2Error, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({str(s): r for s, r in results.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
