"""One DMD2 training cycle (5 critic updates + 1 student update, the two-time-scale rule) on one accelerator:
wall time and peak memory for each memory preset, through the trainer's own code path (``build_training`` and
``train_iteration`` from trainer/train.py: DMD2Roles, trainer.dmd2's losses, the optimisers as training builds
them), and in the same run the naive reference (../shared/reference/naive_dmd2_cycle.py, imported by path) with and
without gradient checkpointing, reported as ratios.

    python benchmarks/train_cycle.py --shape sdxl      # one GPU, random weights in SDXL's shape, 1024x1024, batch 1
    python benchmarks/train_cycle.py --shape tiny      # CPU, seconds (CI checks that it runs)

Targets (SDXL shape, one GPU): the default preset's cycle <= 0.8x the naive cycle without checkpointing; the 12gb
preset's cycle <= the naive cycle with checkpointing, and its peak <= 12 GiB. Prints one JSON object as its last line
and appends the numbers with the device name to benchmarks/RESULTS.md.

Why ours should be faster than the naive cycle: the GAN classifier's forward stops after the mid block (the naive
one runs the whole UNet and hooks the mid block), the teacher's conditional and unconditional passes run as one
batch, the DMD term takes no gradient through the teacher or the critic, the student update back-propagates into
the student's adapter only (no weight gradients for the critic), the sample made for the student update is reused by
that iteration's critic update, optimisers run fused, and the frozen base is bf16.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import math
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _shared as sh  # noqa: E402

import torch  # noqa: E402

PRESETS = ("12gb", "24gb", "80gb")


def find_reference(explicit: str | None) -> Path | None:
    candidates = [explicit, os.environ.get("DMD2_NAIVE_REFERENCE"), sh.REPO.parent / "shared" / "reference" / "naive_dmd2_cycle.py",
                  sh.REPO / "shared" / "reference" / "naive_dmd2_cycle.py", sh.REPO / ".bench" / "naive_dmd2_cycle.py"]
    for c in candidates:
        if c and Path(c).is_file():
            return Path(c)
    return None


def run_reference(path: Path, shape: str, res: int, batch: int, rank: int, cycles: int, grad_ckpt: bool) -> dict:
    """Import the naive reference by path and run its main() with our settings; its last output line is JSON."""
    spec = importlib.util.spec_from_file_location("naive_dmd2_cycle", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    argv = [str(path), "--shape", shape, "--res", str(res), "--batch", str(batch), "--rank", str(rank), "--cycles", str(cycles)]
    old, sys.argv = sys.argv, argv + (["--grad-ckpt"] if grad_ckpt else [])
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            module.main()
    finally:
        sys.argv = old
    return json.loads(buf.getvalue().strip().splitlines()[-1])


def run_preset(preset: str, shape: str, res: int, batch: int, rank: int, cycles: int, device, dtype, overrides=()) -> dict:
    from trainer.config import load_config
    from trainer.memory import resolve
    from trainer.prepare import RealData
    from trainer.schedule import NoiseSchedule
    from trainer.train import build_training, train_iteration

    cfg = load_config(base={"model": "random", "prompts": "random", "resolution": res, "batch_size": batch, "memory": preset, "seed": 0,
                            "lora": {"rank": rank, "alpha": 8}, "student": {"update_every": 5}, "gan": {"real_data": "teacher"}},
                      overrides=list(overrides))
    unet = sh.build_unet(shape, device, dtype)
    sh.free(device)  # the fp32 -> bf16 cast at build time is not training memory: peaks count from here
    latent = (unet.config.in_channels, res // 8, res // 8)
    cond = sh.random_conditioning(unet, 16, res)
    real = RealData([(res, res)], [torch.randn(8, *latent, generator=torch.Generator().manual_seed(2))], [cond.index(torch.arange(8))], source="random")
    plan = resolve(preset, device, batch_size=batch)
    setup = build_training(cfg, unet, NoiseSchedule.sdxl(), cond=cond, uncond=cond.index([0]).zeros_like(), real=real, latent_shape=latent,
                           device=device, weight_dtype=dtype, plan=plan, quiet=True)
    where = {p.device.type for p in list(setup.roles.unet.parameters()) + list(setup.head.parameters())}
    if where != {torch.device(device).type}:
        raise RuntimeError(f"benchmark model is not entirely on {device}: {where}")
    losses = {}

    def cycle(c: int):
        for k in range(5):  # step % 5 == 0 updates the student: 5 critic updates + 1 student update
            losses.update(train_iteration(setup, 5 * c + k).values)

    cycle(0)  # warm-up (allocator, kernels, lazily created optimiser states)
    sh.sync(device)
    peak_warm = sh.peak_gib(device)
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for c in range(1, cycles + 1):
        times += sh.timed(lambda c=c: cycle(c), device, 1)
    peak = sh.peak_gib(device)
    finite = all(math.isfinite(v) for v in losses.values())
    optimizer = type(setup.critic_opt).__module__.split(".")[0] + "." + type(setup.critic_opt).__name__
    setup = unet = real = cond = None  # drop the models before freeing (assigned, not del'd: cycle() still names setup)
    sh.free(device)
    return {"cycle_s": sh.median(times), "peak_gb": peak, "peak_gb_with_warmup": max(peak or 0, peak_warm or 0) if peak is not None else None,
            "gradient_checkpointing": plan.gradient_checkpointing, "optimizer": optimizer, "micro_batch": plan.micro_batch_size, "losses_finite": finite}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=["sdxl", "tiny"], default="sdxl")
    ap.add_argument("--res", type=int, default=None, help="pixels (sdxl 1024, tiny 128)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--cycles", type=int, default=3, help="timed cycles per configuration (median reported)")
    ap.add_argument("--presets", default=",".join(PRESETS))
    ap.add_argument("--reference", help="path of naive_dmd2_cycle.py (default: ../shared/reference/ beside the repo)")
    ap.add_argument("--no-reference", action="store_true")
    ap.add_argument("--results", default=str(sh.REPO / "benchmarks" / "RESULTS.md"), help="markdown file to append to ('' = none)")
    ap.add_argument("--allow-cpu", action="store_true", help="run the SDXL shape without a GPU (very slow)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="a trainer option for every preset, as `dmd2 train --set` (e.g. dmd.critic_per_step=true)")
    ap.add_argument("--against-default", action="store_true",
                    help="with --set: also time each preset without the options, in this process, and report the ratios")
    a = ap.parse_args(argv)
    if a.against_default and not a.overrides:
        ap.error("--against-default compares each preset with and without the --set options: pass --set KEY=VALUE too")
    device, dtype, name = sh.device_and_dtype()
    if a.shape == "sdxl" and device.type != "cuda" and not a.allow_cpu:
        ap.error("the SDXL shape needs a CUDA GPU (use --shape tiny on a CPU)")
    res = a.res or (1024 if a.shape == "sdxl" else 128)
    from trainer.memory import resolve

    default = resolve("auto", device, batch_size=a.batch).preset
    record = {"benchmark": "train_cycle", "device": name, "shape": a.shape, "res": res, "batch": a.batch, "rank": a.rank,
              "torch": torch.__version__, "default_preset": default, "overrides": a.overrides, "presets": {}, "reference": {}}
    errors = record["errors"] = {}
    # (preset, label, record section, options): with --against-default each preset also runs without the options, in
    # this process, so that their cost is a ratio of two timings taken side by side
    presets_asked = [p for p in a.presets.split(",") if p]
    configs = [(p, p, "presets", a.overrides) for p in presets_asked]
    if a.against_default:
        record["without_options"] = {}
        configs = [c for p in presets_asked
                   for c in ((p, f"{p} without options", "without_options", []), (p, f"{p} with options", "presets", a.overrides))]
    for preset, label, section, overrides in configs:
        try:  # one failing configuration (an optimiser kernel, memory) must not take the others' numbers with it
            record[section][preset] = r = run_preset(preset, a.shape, res, a.batch, a.rank, a.cycles, device, dtype, overrides)
        except Exception as e:  # noqa: BLE001
            errors[label] = f"{type(e).__name__}: {e}"[:500]
        if label in errors:  # freed only here: inside `except`, the traceback still holds the failed run's tensors
            sh.free(device)
            print(f"ours {label}: FAILED {errors[label]}", flush=True)
            continue
        print(f"ours {label}: {r['cycle_s']:.3f} s/cycle, peak {r['peak_gb'] if r['peak_gb'] is None else round(r['peak_gb'], 2)} GiB "
              f"(checkpointing {r['gradient_checkpointing']}, {r['optimizer']})", flush=True)
    ref = None if a.no_reference else find_reference(a.reference)
    if ref is None and not a.no_reference:
        print("naive reference not found: pass --reference PATH (ratios omitted)", file=sys.stderr)
    if ref is not None:
        for ckpt in (False, True):
            key = "grad_ckpt" if ckpt else "no_ckpt"
            try:
                record["reference"][key] = r = run_reference(ref, a.shape, res, a.batch, a.rank, a.cycles, ckpt)
            except Exception as e:  # noqa: BLE001
                errors[f"naive_{key}"] = f"{type(e).__name__}: {e}"[:500]
                print(f"naive {key}: FAILED {errors[f'naive_{key}']}", flush=True)
                continue
            finally:
                sh.free(device)
            print(f"naive {key}: {r['cycle_s']:.3f} s/cycle, peak {r['peak_gb'] if r['peak_gb'] is None else round(r['peak_gb'], 2)} GiB", flush=True)
    ratios, targets = {}, {}
    presets, refs = record["presets"], record["reference"]
    if default in presets and "no_ckpt" in refs:
        ratios["default_vs_naive"] = presets[default]["cycle_s"] / refs["no_ckpt"]["cycle_s"]
        targets["default_le_0.8x_naive"] = ratios["default_vs_naive"] <= 0.8
    if "12gb" in presets and "grad_ckpt" in refs:
        ratios["12gb_vs_naive_ckpt"] = presets["12gb"]["cycle_s"] / refs["grad_ckpt"]["cycle_s"]
        targets["12gb_le_naive_ckpt"] = ratios["12gb_vs_naive_ckpt"] <= 1.0
    if "12gb" in presets and presets["12gb"]["peak_gb"] is not None:
        targets["12gb_peak_le_12"] = presets["12gb"]["peak_gb"] <= 12.0
    for preset, base in record.get("without_options", {}).items():
        if preset in presets:
            ratios[f"{preset}_options_vs_without"] = presets[preset]["cycle_s"] / base["cycle_s"]
            if base["peak_gb"] is not None:
                ratios[f"{preset}_options_extra_peak_gb"] = presets[preset]["peak_gb"] - base["peak_gb"]
    record["ratios"], record["targets_met"] = ratios, targets
    if device.type != "cuda":
        record["note"] = "CPU run: checks that the benchmark works; timings and targets are meaningful on a GPU only"
    gib = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
    lines = [f"options: {' '.join(a.overrides)}"] if a.overrides else []
    lines += [f"ours {k}{suffix}: {v['cycle_s']:.3f} s/cycle, peak {gib(v['peak_gb'])} GiB, checkpointing {v['gradient_checkpointing']}, {v['optimizer']}"
              for section, suffix in (("without_options", " without options"), ("presets", " with options" if a.overrides else ""))
              for k, v in record.get(section, {}).items()]
    lines += [f"naive {k}: {v['cycle_s']:.3f} s/cycle, peak {gib(v['peak_gb'])} GiB" for k, v in refs.items()]
    lines += [f"{k}: {v:.3f}" for k, v in ratios.items()] + [f"target {k}: {'met' if v else 'NOT met'}" for k, v in targets.items()]
    lines += [f"FAILED {k}: {v}" for k, v in errors.items()]
    sh.append_results(Path(a.results) if a.results else None, "train_cycle", lines, record)
    print(json.dumps(record))
    return record


if __name__ == "__main__":
    sys.exit(1 if main()["errors"] else 0)
