"""Inference speed: the 4-step DMD2 student against the teacher with 50 Euler steps and classifier-free guidance, at
1024x1024 on one accelerator, UNet + VAE decode, in the same run. Target: at least 10x.

    python benchmarks/inference.py --shape sdxl [--compile]   # one GPU, random weights in SDXL's shape
    python benchmarks/inference.py --shape tiny               # CPU, seconds (CI checks that it runs)

Both use the project's samplers (trainer.generate.sample_student / sample_teacher, the same code as `dmd2 generate`
and the validation grids). The student is the UNet with its LoRA merged into the weights (what ComfyUI does when it
patches a LoRA), so it costs exactly one base UNet call per step; the teacher's CFG runs conditional and
unconditional as one batch of 2. ``--compile`` adds a torch.compile'd UNet (CUDA graphs via mode reduce-overhead)
and reports its gain; ``--channels-last`` does the same for the NHWC memory format (slower on an H200: 0.85x).
Prints one JSON object as its last line and appends to benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _shared as sh  # noqa: E402

import torch  # noqa: E402

STUDENT_TIMESTEPS = [999, 749, 499, 249]


def measure(unet, vae, schedule, cond, uncond, latent, device, dtype, teacher_steps: int, cfg_scale: float, runs: int) -> dict:
    from trainer import generate as gen

    call = gen.unet_call(unet)

    def student():
        lat = gen.sample_student(call, schedule, cond, STUDENT_TIMESTEPS, [0], latent, device=device, dtype=dtype)
        return gen.decode(vae, lat)

    def teacher():
        lat = gen.sample_teacher(call, schedule, cond, uncond, teacher_steps, cfg_scale, [0], latent, device=device, dtype=dtype)
        return gen.decode(vae, lat)

    with torch.inference_mode():
        t0 = time.perf_counter()
        student(), teacher()  # warm-up (and, compiled, the compilation)
        sh.sync(device)
        warm = time.perf_counter() - t0
        s = sh.median(sh.timed(student, device, runs))
        t = sh.median(sh.timed(teacher, device, max(1, runs // 2) if device.type == "cpu" else runs))
        unet_only = sh.median(sh.timed(lambda: call(torch.randn(1, *latent, device=device, dtype=dtype), torch.tensor([999], device=device),
                                                    cond.to(device, dtype)), device, runs))
        decode_s = sh.median(sh.timed(lambda: gen.decode(vae, torch.randn(1, *latent, device=device, dtype=dtype)), device, runs))
    return {"student_s": s, "teacher_s": t, "speedup": t / s, "unet_call_s": unet_only, "decode_s": decode_s, "warmup_s": warm}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=["sdxl", "tiny"], default="sdxl")
    ap.add_argument("--res", type=int, default=None, help="pixels (sdxl 1024, tiny 128)")
    ap.add_argument("--teacher-steps", type=int, default=50)
    ap.add_argument("--cfg", type=float, default=6.0)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="also time a torch.compile'd UNet (CUDA graphs) and report the gain")
    ap.add_argument("--channels-last", action="store_true", help="also time UNet and VAE in channels_last memory format")
    ap.add_argument("--results", default=str(sh.REPO / "benchmarks" / "RESULTS.md"), help="markdown file to append to ('' = none)")
    ap.add_argument("--allow-cpu", action="store_true")
    a = ap.parse_args(argv)
    device, dtype, name = sh.device_and_dtype()
    if a.shape == "sdxl" and device.type != "cuda" and not a.allow_cpu:
        ap.error("the SDXL shape needs a CUDA GPU (use --shape tiny on a CPU)")
    from trainer.schedule import NoiseSchedule

    res = a.res or (1024 if a.shape == "sdxl" else 128)
    unet, vae = sh.build_unet(a.shape, device, dtype), sh.build_vae(a.shape, device, dtype)
    if {p.device.type for p in list(unet.parameters()) + list(vae.parameters())} != {device.type}:
        raise RuntimeError(f"benchmark models are not entirely on {device}")
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    latent = (unet.config.in_channels, res // factor, res // factor)
    schedule = NoiseSchedule.sdxl()
    cond = sh.random_conditioning(unet, 1, res)
    uncond = cond.zeros_like()
    record = {"benchmark": "inference", "device": name, "shape": a.shape, "res": res, "student_steps": len(STUDENT_TIMESTEPS),
              "teacher_steps": a.teacher_steps, "teacher_cfg": a.cfg, "torch": torch.__version__}
    record["eager"] = eager = measure(unet, vae, schedule, cond, uncond, latent, device, dtype, a.teacher_steps, a.cfg, a.runs)
    print(f"eager: student {eager['student_s']:.3f} s, teacher {eager['teacher_s']:.3f} s, {eager['speedup']:.1f}x", flush=True)
    if a.channels_last:  # convolutions (most of the VAE decoder's time) in NHWC; attention is unaffected
        for model in (unet, vae):
            model.to(memory_format=torch.channels_last)
        record["channels_last"] = c = measure(unet, vae, schedule, cond, uncond, latent, device, dtype, a.teacher_steps, a.cfg, a.runs)
        for model in (unet, vae):  # back to the default layout, so that `--compile` is measured against eager alone
            model.to(memory_format=torch.contiguous_format)
        c["student_gain"], c["teacher_gain"] = eager["student_s"] / c["student_s"], eager["teacher_s"] / c["teacher_s"]
        print(f"channels_last: student {c['student_s']:.3f} s ({c['student_gain']:.2f}x faster), teacher {c['teacher_s']:.3f} s "
              f"({c['teacher_gain']:.2f}x), {c['speedup']:.1f}x (UNet call {c['unet_call_s'] * 1000:.1f} ms, VAE decode "
              f"{c['decode_s'] * 1000:.1f} ms)", flush=True)
    if a.compile:
        # dynamic=False: the student's batch of 1 and the teacher's CFG batch of 2 get two static graphs, not one dynamic one
        compiled = torch.compile(unet, mode="reduce-overhead" if device.type == "cuda" else "default", dynamic=False)
        record["compiled"] = c = measure(compiled, vae, schedule, cond, uncond, latent, device, dtype, a.teacher_steps, a.cfg, a.runs)
        c["student_gain"], c["teacher_gain"] = eager["student_s"] / c["student_s"], eager["teacher_s"] / c["teacher_s"]
        print(f"compiled: student {c['student_s']:.3f} s ({c['student_gain']:.2f}x faster), teacher {c['teacher_s']:.3f} s "
              f"({c['teacher_gain']:.2f}x), {c['speedup']:.1f}x", flush=True)
    best = record.get("compiled", eager)
    record["targets_met"] = {"student_ge_10x_faster": eager["speedup"] >= 10.0}
    if a.compile:
        record["targets_met"]["compiled_student_ge_10x_faster"] = best["speedup"] >= 10.0
    if device.type != "cuda":
        record["note"] = "CPU run: checks that the benchmark works; timings and targets are meaningful on a GPU only"
    lines = [f"eager: student 4 steps {eager['student_s']:.3f} s, teacher {a.teacher_steps} steps CFG {eager['teacher_s']:.3f} s, "
             f"speedup {eager['speedup']:.1f}x (UNet call {eager['unet_call_s'] * 1000:.1f} ms, VAE decode {eager['decode_s'] * 1000:.1f} ms)"]
    if a.channels_last:
        c = record["channels_last"]
        lines.append(f"channels_last: student {c['student_s']:.3f} s ({c['student_gain']:.2f}x), teacher {c['teacher_s']:.3f} s "
                     f"({c['teacher_gain']:.2f}x), speedup {c['speedup']:.1f}x (UNet call {c['unet_call_s'] * 1000:.1f} ms, "
                     f"VAE decode {c['decode_s'] * 1000:.1f} ms)")
    if a.compile:
        c = record["compiled"]
        lines.append(f"compiled: student {c['student_s']:.3f} s ({c['student_gain']:.2f}x), teacher {c['teacher_s']:.3f} s "
                     f"({c['teacher_gain']:.2f}x), speedup {c['speedup']:.1f}x")
    lines += [f"target {k}: {'met' if v else 'NOT met'}" for k, v in record["targets_met"].items()]
    sh.append_results(Path(a.results) if a.results else None, "inference", lines, record)
    print(json.dumps(record))
    return record


if __name__ == "__main__":
    main()
