"""Train the toy SDXL-architecture teacher on scikit-learn's handwritten digits and write it as a normal sgm
single-file SDXL checkpoint: trainer/assets/toy_teacher/digits_teacher.safetensors (+ teacher.json).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/toy/train_teacher.py            # VAE, then UNet, then export
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/toy/train_teacher.py --stage unet  # reuse outputs/toy_teacher/vae
    # a second, different teacher (its own folder; work files in <out>/work), e.g. for make_table.py --teacher:
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/toy/train_teacher.py --seed 1 --channels 32 64 --out outputs/teacher2
    # a v-prediction teacher (the file carries ComfyUI's v_pred marker, so the loader detects it), and one with
    # zero terminal SNR as well (and the ztsnr marker):
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/toy/train_teacher.py --prediction-type v_prediction --out outputs/teacher_v
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/toy/train_teacher.py --prediction-type v_prediction --zero-terminal-snr --out outputs/teacher_vz

What it builds (every config goes through ``trainer.models.architecture``, the functions the loader uses, so the
exported file reloads through ``load_sdxl`` into exactly these models):

* two frozen CLIP text encoders at their seeded random init: CLIP-L role 32 wide, CLIP-G role 64 wide with a
  64-d projection, 2 layers each, full 49,408-token vocabulary, 77 positions; conditioning = concat of both
  penultimate hidden states (96-d), pooled = encoder 2's text_embeds;
* a 3-level AutoencoderKL (x4 down-sampling, 4 latent channels, 32/64/64 channels), trained on the digits (RGB,
  grey replicated), then re-parametrised (quant_conv / post_quant_conv, exactly) so that ``latent * 0.13025`` -
  SDXL's scaling factor, which the loader assumes - is zero-mean, unit-variance per channel;
* an SDXL-layout UNet2DConditionModel (DownBlock2D + CrossAttnDownBlock2D, linear projections, text_time addition
  embedding with 8-d time-id features: adm_in = 64 + 6 * 8 = 112), epsilon (or v) prediction on SDXL's
  scaled-linear schedule, 10% prompt dropout to all-zero prompt and pooled embeddings (for classifier-free guidance),
  min-SNR-5 loss weighting, EMA weights exported.

Deterministic on one CPU thread for a given torch build.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection  # noqa: E402

from trainer.files import atomic_write, write_text_atomic  # noqa: E402
from trainer.models.architecture import CLIPArch, UNetArch, VAEArch, clip_config, unet_config, vae_config  # noqa: E402
from trainer.models.hashing import file_sha256  # noqa: E402
from trainer.models.tokenizers import sdxl_tokenizers  # noqa: E402
from trainer.schedule import PREDICTION_TYPES, NoiseSchedule, add_noise, training_target  # noqa: E402
from trainer.toy.digits import IMAGE_SIZE, NUM_DIGITS, PROMPT_TEMPLATES, load_digits_32, prompt_for  # noqa: E402

SDXL_SCALING_FACTOR = 0.13025
ASSET_DIR = ROOT / "trainer" / "assets" / "toy_teacher"
WORK_DIR = ROOT / "outputs" / "toy_teacher"

CLIP_L = CLIPArch(width=32, layers=2, intermediate=128)
CLIP_G = CLIPArch(width=64, layers=2, intermediate=256, projection_dim=64)
VAE = VAEArch(block_out_channels=(32, 64, 64), layers_per_block=1, latent_channels=4)
TIME_ID_DIM = 8
LATENT_SIZE = IMAGE_SIZE // 4


def unet_arch(channels=(64, 64), layers=1) -> UNetArch:
    return UNetArch(
        in_channels=4,
        out_channels=4,
        block_out_channels=tuple(channels),
        layers_per_block=(layers,) * len(channels),
        down_depths=((0,) * layers,) + ((1,) * layers,) * (len(channels) - 1),
        up_depths=((1,) * (layers + 1),) * (len(channels) - 1) + ((0,) * (layers + 1),),
        mid_depth=1,
        cross_attention_dim=CLIP_L.width + CLIP_G.width,
        adm_in_channels=CLIP_G.projection_dim + 6 * TIME_ID_DIM,
        addition_time_embed_dim=TIME_ID_DIM,
        time_embed_dim=4 * channels[0],
    )


def _clip(arch: CLIPArch, which: str, cls):
    cfg = clip_config(arch, which)
    cfg.pop("architectures", None)
    return cls(CLIPTextConfig(**cfg)).eval().requires_grad_(False)


def build_text_encoders(seed: int):
    torch.manual_seed(seed)
    te1 = _clip(CLIP_L, "text_encoder", CLIPTextModel)
    torch.manual_seed(seed + 1)
    te2 = _clip(CLIP_G, "text_encoder_2", CLIPTextModelWithProjection)
    return te1, te2


@torch.no_grad()
def prompt_table(te1, te2) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings of every (template, digit) prompt: [T, 10, 77, 96] and pooled [T, 10, 64]."""
    tok1, tok2 = sdxl_tokenizers()
    prompts = [prompt_for(d, t) for t in range(len(PROMPT_TEMPLATES)) for d in range(NUM_DIGITS)]
    hidden = []
    for tok, te in ((tok1, te1), (tok2, te2)):
        ids = tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        out = te(ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
    emb = torch.cat(hidden, -1).reshape(len(PROMPT_TEMPLATES), NUM_DIGITS, 77, -1)
    pooled = out.text_embeds.reshape(len(PROMPT_TEMPLATES), NUM_DIGITS, -1)
    return emb.float(), pooled.float()


# ------------------------------------------------------------------------------------------------------------ VAE
def build_vae(seed: int) -> AutoencoderKL:
    torch.manual_seed(seed)
    cfg = vae_config(VAE)
    cfg.update(sample_size=IMAGE_SIZE)
    return AutoencoderKL.from_config(cfg)


def train_vae(args, images_rgb: torch.Tensor) -> AutoencoderKL:
    vae = build_vae(args.seed + 10).train()
    g = torch.Generator().manual_seed(args.seed + 11)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.vae_lr, total_steps=args.vae_steps, pct_start=0.05)
    t0 = time.time()
    for step in range(1, args.vae_steps + 1):
        idx = torch.randint(0, len(images_rgb), (args.vae_batch,), generator=g)
        x = images_rgb[idx]
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
        rec = vae.decode(z).sample
        mse = F.mse_loss(rec, x)
        kl = 0.5 * (post.mean.pow(2) + post.var - 1.0 - post.logvar).mean()
        loss = mse + F.l1_loss(rec, x) * 0.1 + args.vae_kl * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == 1:
            print(f"vae step {step:5d} mse {mse.item():.5f} kl {kl.item():.3f} ({time.time() - t0:.0f}s)", flush=True)
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def normalise_vae_latents(vae: AutoencoderKL, images_rgb: torch.Tensor) -> dict:
    """Exactly re-parametrise the latent space so that posterior means * 0.13025 are zero-mean, unit-variance per
    channel: z' = (z - m) * k through quant_conv (the log-variance moves by 2 log k), undone in post_quant_conv."""
    mean = torch.cat([vae.encode(c).latent_dist.mean for c in images_rgb.split(256)])
    m = mean.mean((0, 2, 3))
    s = mean.std((0, 2, 3))
    k = 1.0 / (s * SDXL_SCALING_FACTOR)
    c = VAE.latent_channels
    qc, pqc = vae.quant_conv, vae.post_quant_conv
    # post_quant_conv(z) = W z + b with z = z'/k + m  ->  W' = W / k (per input channel), b' = b + W m
    w = pqc.weight.data.clone()
    pqc.bias.data += (w[:, :, 0, 0] @ m)
    pqc.weight.data = w / k.view(1, -1, 1, 1)
    qc.weight.data[:c] = (qc.weight.data[:c]) * k.view(-1, 1, 1, 1)
    qc.bias.data[:c] = (qc.bias.data[:c] - m) * k
    qc.bias.data[c:] += 2.0 * torch.log(k)
    return {"raw_latent_mean": m.tolist(), "raw_latent_std": s.tolist()}


# ----------------------------------------------------------------------------------------------------------- UNet
def build_unet(seed: int, channels, layers) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel.from_config(unet_config(unet_arch(channels, layers), sample_size=LATENT_SIZE))


def train_unet(args, latents_mean, latents_std, labels, emb_table, pooled_table) -> UNet2DConditionModel:
    unet = build_unet(args.seed + 20, args.channels, args.layers).train()
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    n_params = sum(p.numel() for p in unet.parameters())
    print(f"unet: {n_params / 1e6:.2f}M parameters, channels {args.channels}, layers/block {args.layers}", flush=True)
    schedule = NoiseSchedule.sdxl(args.prediction_type, args.zero_terminal_snr)
    ac = schedule.alphas_cumprod
    snr = (ac / (1 - ac)).float()
    # min-SNR-gamma as a weight on the output's MSE: min(snr, gamma) / snr for eps, / (snr + 1) for v (Hang et al.)
    snr_weight = snr.clamp(max=args.min_snr) / (snr if args.prediction_type == "epsilon" else snr + 1)
    g = torch.Generator().manual_seed(args.seed + 21)
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.99))
    warm = max(1, min(200, args.steps // 10))
    lr_at = lambda s: min(1.0, (s + 1) / warm) * (0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps))) * 0.95 + 0.05)  # noqa: E731
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    time_ids = torch.tensor([IMAGE_SIZE, IMAGE_SIZE, 0, 0, IMAGE_SIZE, IMAGE_SIZE], dtype=torch.float32)
    n_templates = emb_table.shape[0]
    t0, running = time.time(), 0.0
    ema_params, params = list(ema.parameters()), list(unet.parameters())
    for step in range(1, args.steps + 1):
        b = args.batch
        idx = torch.randint(0, len(labels), (b,), generator=g)
        x0 = (latents_mean[idx] + latents_std[idx] * torch.randn(latents_mean[idx].shape, generator=g)) * SDXL_SCALING_FACTOR
        tmpl = torch.randint(0, n_templates, (b,), generator=g)
        emb = emb_table[tmpl, labels[idx]]
        pooled = pooled_table[tmpl, labels[idx]]
        keep = (torch.rand(b, generator=g) >= args.dropout).float()
        emb, pooled = emb * keep.view(-1, 1, 1), pooled * keep.view(-1, 1)
        t = torch.randint(0, schedule.num_train_timesteps, (b,), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        xt = add_noise(schedule, x0, eps, t)
        pred = unet(xt, t, encoder_hidden_states=emb, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids.expand(b, 6)}).sample
        loss = (snr_weight[t].view(-1, 1, 1, 1) * (pred - training_target(schedule, x0, eps, t)) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, [p.detach() for p in params], 1.0 - decay)
        running += loss.item()
        if step % 100 == 0:
            el = time.time() - t0
            print(f"unet step {step:6d} loss {running / 100:.4f} lr {sched.get_last_lr()[0]:.2e} ({el:.0f}s, {el / step:.3f}s/step)", flush=True)
            running = 0.0
    for b_ema, b in zip(ema.buffers(), unet.buffers()):
        b_ema.copy_(b)
    return ema


# --------------------------------------------------------------------------------------------------------- export
def export(args, unet, te1, te2, vae, extra: dict) -> None:
    from trainer.models.single_file import save_sdxl_single_file

    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / "digits_teacher.safetensors"
    half = lambda m: copy.deepcopy(m).to(torch.float16)  # noqa: E731
    meta = {"dmd2.toy_teacher": "handwritten digits (scikit-learn load_digits), see teacher.json"}
    save_sdxl_single_file(out, half(unet), half(te1), half(te2), half(vae), v_pred=args.prediction_type == "v_prediction",
                          ztsnr=args.zero_terminal_snr, metadata=meta)
    info = {
        "file": out.name,
        "sha256": file_sha256(out),
        "bytes": out.stat().st_size,
        "dtype": "float16",
        "regenerate": "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/toy/train_teacher.py" + "".join(
            f" --{k.replace('_', '-')}" + ("" if isinstance(v, bool) else f" {' '.join(map(str, v)) if isinstance(v, (list, tuple)) else v}")
            for k, v in sorted(vars(args).items()) if k != "stage" and v is not False),
        "seed": args.seed,
        "data": "sklearn.datasets.load_digits: 1,797 8x8 digits, bilinear-upsampled to 32x32, [-1, 1], grey as RGB",
        "prompts": list(PROMPT_TEMPLATES),
        "canonical_prompt": PROMPT_TEMPLATES[0],
        "unconditional": "all-zero prompt embeddings and pooled embeddings (prompt dropout during training)",
        "resolution": IMAGE_SIZE,
        "time_ids": [IMAGE_SIZE, IMAGE_SIZE, 0, 0, IMAGE_SIZE, IMAGE_SIZE],
        "prediction_type": args.prediction_type,
        "zero_terminal_snr": args.zero_terminal_snr,
        "schedule": "SDXL scaled_linear 0.00085..0.012, 1000 steps" + (", rescaled to zero terminal SNR" if args.zero_terminal_snr else ""),
        "vae_scaling_factor": SDXL_SCALING_FACTOR,
        "architecture": {
            "unet": {"block_out_channels": list(args.channels), "layers_per_block": args.layers, "transformer_depth": 1,
                     "cross_attention_dim": CLIP_L.width + CLIP_G.width, "addition_time_embed_dim": TIME_ID_DIM,
                     "adm_in_channels": CLIP_G.projection_dim + 6 * TIME_ID_DIM,
                     "parameters": sum(p.numel() for p in unet.parameters())},
            "text_encoder": {"role": "CLIP-L", "width": CLIP_L.width, "layers": CLIP_L.layers, "trained": False},
            "text_encoder_2": {"role": "CLIP-G", "width": CLIP_G.width, "layers": CLIP_G.layers,
                               "projection_dim": CLIP_G.projection_dim, "trained": False},
            "vae": {"block_out_channels": list(VAE.block_out_channels), "layers_per_block": VAE.layers_per_block,
                    "latent_channels": VAE.latent_channels, "downsampling": 4},
        },
        "training": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items() if k != "out"},
        "torch": torch.__version__,
        **extra,
    }
    write_text_atomic(args.out / "teacher.json", json.dumps(info, indent=2) + "\n")
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB) sha256 {info['sha256']}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=("all", "vae", "unet"), default="all")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae-steps", type=int, default=400)
    p.add_argument("--vae-batch", type=int, default=24)
    p.add_argument("--vae-lr", type=float, default=2e-3)
    p.add_argument("--vae-kl", type=float, default=1e-5)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ema", type=float, default=0.998)
    p.add_argument("--min-snr", type=float, default=5.0)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--prediction-type", choices=PREDICTION_TYPES, default="epsilon", help="what the UNet predicts; "
                   "v_prediction also writes the v_pred marker key into the checkpoint")
    p.add_argument("--zero-terminal-snr", action="store_true", help="rescale the schedule to zero terminal SNR (needs "
                   "--prediction-type v_prediction); also writes the ztsnr marker key")
    p.add_argument("--channels", type=int, nargs="+", default=[64, 64])
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--out", type=Path, default=ASSET_DIR, help="where the checkpoint and teacher.json go (default: the "
                   "bundled teacher's folder); another folder makes a second teacher, e.g. for make_table.py --teacher")
    args = p.parse_args()
    if args.zero_terminal_snr and args.prediction_type != "v_prediction":
        p.error("--zero-terminal-snr needs --prediction-type v_prediction: at zero SNR an eps prediction says nothing about the image")
    torch.set_num_threads(1)
    bundled = args.out.resolve() == ASSET_DIR.resolve()  # also when --out names the bundled folder by a relative path
    work = WORK_DIR if bundled else args.out / "work"  # a second teacher never reuses the bundled one's VAE
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    images, labels = load_digits_32()
    images_rgb = images.repeat(1, 3, 1, 1)
    te1, te2 = build_text_encoders(args.seed)
    emb_table, pooled_table = prompt_table(te1, te2)

    vae_file = work / "vae.pt"
    if args.stage in ("all", "vae") or not vae_file.exists():
        t0 = time.time()
        vae = train_vae(args, images_rgb)
        stats = normalise_vae_latents(vae, images_rgb)
        vae_seconds = time.time() - t0
        with atomic_write(vae_file) as tmp:
            torch.save({"state": vae.state_dict(), "stats": stats, "seconds": vae_seconds}, tmp)
        if args.stage == "vae":
            return
    saved = torch.load(vae_file, weights_only=True)  # this script's own file: tensors and numbers only, no pickled code
    vae = build_vae(0)
    vae.load_state_dict(saved["state"])
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        post = [vae.encode(c).latent_dist for c in images_rgb.split(256)]
        lat_mean = torch.cat([q.mean for q in post])
        lat_std = torch.cat([q.std for q in post])
        rec = torch.cat([vae.decode(m).sample for m in lat_mean.split(256)])
        vae_mse = F.mse_loss(rec.mean(1, keepdim=True).clamp(-1, 1), images).item()
        scaled = lat_mean * SDXL_SCALING_FACTOR
    print(f"vae reconstruction mse {vae_mse:.5f}; scaled latent mean {scaled.mean():.3f} std {scaled.std():.3f}; posterior std {lat_std.mean() * SDXL_SCALING_FACTOR:.4f}", flush=True)

    t0 = time.time()
    unet = train_unet(args, lat_mean, lat_std, labels, emb_table, pooled_table)
    unet_seconds = time.time() - t0
    with atomic_write(work / "unet_ema.pt") as tmp:
        torch.save(unet.state_dict(), tmp)
    export(args, unet, te1, te2, vae, {
        "vae_train_seconds": round(saved.get("seconds", 0.0), 1),
        "unet_train_seconds": round(unet_seconds, 1),
        "vae_reconstruction_mse": round(vae_mse, 6),
        "vae_latent_stats": saved["stats"],
        "total_seconds": round(time.time() - t_start, 1),
    })


if __name__ == "__main__":
    main()
