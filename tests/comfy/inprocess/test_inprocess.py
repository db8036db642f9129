"""The comfy-dmd2 nodes inside a real ComfyUI 0.3.75 (CPU), against the library's diffusers-side sampler.

Run by tests/comfy/test_comfyui.py in ComfyUI's venv; see conftest.py for the environment it needs.
"""
from __future__ import annotations

import pytest
import torch

import comfy.sample
import comfy.samplers
import comfy.utils

EXPECTED_SIGMAS = {  # FIELD-NOTES: model_sampling.sigma at the trained timesteps of SDXL's schedule
    "4 steps": [14.6146, 4.0817, 1.6129, 0.6932],
    "2 steps": [14.6146, 1.6129],
    "1 step": [1.1606],
}
TIMESTEPS = {"4 steps": [999, 749, 499, 249], "2 steps": [999, 499], "1 step": [399]}
NODE_IDS = {"DMD2Scheduler", "DMD2Sampler", "DMD2LoraLoader", "DMD2KSampler"}
TOL = 1e-4


def close(a, b, tol=TOL):
    """max |a - b| <= tol (absolute; the random test UNet's outputs reach |x| ~ 60, measured diffs are ~2e-5)."""
    diff = (a.float() - b.float()).abs().max().item()
    return diff <= tol, f"max abs diff {diff:.3g} (largest |reference| {b.abs().max().item():.3g})"


def pack_errors(pack):
    """trainer.errors as the pack imported it (ComfyUI names the package after the folder's path)."""
    import sys

    return sys.modules[pack["DMD2Scheduler"].__module__].errors


def positive(ref):
    h, w = int(ref["time_ids"][0, 0]), int(ref["time_ids"][0, 1])
    return [[ref["context"], {"pooled_output": ref["pooled"], "width": w, "height": h, "crop_w": 0, "crop_h": 0,
                              "target_width": w, "target_height": h}]]


def out_latent(model, samples):
    """ComfyUI's LATENT is in VAE space (SDXL scale 0.13025); the library works in model space."""
    return model.model.process_latent_in(samples)


def in_latent(model, latent):
    return model.model.process_latent_out(latent.clone())


def run_custom(model, sampler, sigmas, latent, seed, ref):
    """What SamplerCustom does with add_noise on and cfg 1."""
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample_custom(model, noise, 1.0, sampler, sigmas, positive(ref), positive(ref), latent, seed=seed)


def test_pack_registers_four_v3_nodes(pack):
    assert set(pack) == NODE_IDS
    cats = {k: pack[k].GET_SCHEMA().category for k in pack}
    assert cats == {"DMD2Scheduler": "sampling/custom_sampling/schedulers",
                    "DMD2Sampler": "sampling/custom_sampling/samplers", "DMD2LoraLoader": "loaders",
                    "DMD2KSampler": "sampling"}
    import sys
    for heavy in ("diffusers", "peft", "gradio"):
        assert heavy not in sys.modules, f"loading the pack imported {heavy}"


@pytest.mark.parametrize("preset", list(TIMESTEPS))
def test_scheduler_sigmas_are_model_sampling_at_trained_timesteps(pack, unet_model, preset):
    sigmas = pack["DMD2Scheduler"].execute(unet_model, preset, "", 1.0)[0]
    ms = unet_model.get_model_object("model_sampling")
    want = torch.cat([ms.sigma(torch.tensor(TIMESTEPS[preset], dtype=torch.float32)), torch.zeros(1)])
    assert sigmas.dtype == torch.float32 and sigmas.ndim == 1 and sigmas[-1] == 0
    assert torch.equal(sigmas, want)
    assert torch.allclose(sigmas[:-1], torch.tensor(EXPECTED_SIGMAS[preset]), atol=1e-4)
    # ComfyUI maps each sigma back to exactly the trained timestep
    assert ms.timestep(sigmas[:-1]).round().tolist() == TIMESTEPS[preset]


def test_scheduler_custom_list_and_denoise(pack, unet_model):
    ms = unet_model.get_model_object("model_sampling")
    sigmas = pack["DMD2Scheduler"].execute(unet_model, "custom", "[999, 499]", 1.0)[0]
    assert torch.equal(sigmas, torch.cat([ms.sigma(torch.tensor([999.0, 499.0])), torch.zeros(1)]))
    half = pack["DMD2Scheduler"].execute(unet_model, "4 steps", "", 0.5)[0]
    assert torch.equal(half, torch.cat([ms.sigma(torch.tensor([499.0, 249.0])), torch.zeros(1)]))
    with pytest.raises(pack_errors(pack).ConfigError, match="strictly decreasing"):
        pack["DMD2Scheduler"].execute(unet_model, "custom", "249, 999", 1.0)


@pytest.mark.parametrize("preset", list(TIMESTEPS))
def test_sampler_matches_library_sampler(pack, unet_model, reference, preset):
    sigmas = pack["DMD2Scheduler"].execute(unet_model, preset, "", 1.0)[0]
    sampler = pack["DMD2Sampler"].execute("auto")[0]
    latent = torch.zeros(reference["latent_shape"])
    got = out_latent(unet_model, run_custom(unet_model, sampler, sigmas, latent, reference["seed"], reference))
    ok, msg = close(got, reference["samples"][preset])
    assert ok, msg
    # the all-in-one node samples the same way
    out = pack["DMD2KSampler"].execute(unet_model, positive(reference), {"samples": latent}, reference["seed"], preset, 1.0)[0]
    ok, msg = close(out_latent(unet_model, out["samples"]), reference["samples"][preset])
    assert ok, msg


def test_img2img_matches_library_sampler(pack, unet_model, reference):
    latent = in_latent(unet_model, reference["img2img_latent"])
    out = pack["DMD2KSampler"].execute(unet_model, positive(reference), {"samples": latent}, reference["seed"], "4 steps", 0.5)[0]
    ok, msg = close(out_latent(unet_model, out["samples"]), reference["samples"]["img2img 0.5"])
    assert ok, msg


class _Captured(Exception):
    pass


def first_unet_input(model, run):
    """The tensor the diffusion model itself receives on its first call (then the run is aborted)."""
    box = {}

    def hook(module, args, kwargs):
        box["x"] = (args[0] if args else kwargs["x"]).detach().clone()
        raise _Captured

    handle = model.model.diffusion_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        run()
    except _Captured:
        pass
    finally:
        handle.remove()
    return box["x"]


def test_one_step_start_is_unit_variance(pack, unet_model, reference):
    """At t=399 the UNet must see unit-variance noise; stock samplers scale the first noise by sigma (std ~0.75)."""
    latent = torch.zeros(1, 4, 96, 96)
    sigmas = pack["DMD2Scheduler"].execute(unet_model, "1 step", "", 1.0)[0]
    ours = first_unet_input(unet_model, lambda: run_custom(unet_model, pack["DMD2Sampler"].execute("auto")[0], sigmas,
                                                              latent, 5, reference))
    stock = first_unet_input(unet_model, lambda: run_custom(unet_model, comfy.samplers.sampler_object("lcm"), sigmas,
                                                               latent, 5, reference))
    assert abs(ours.std().item() - 1.0) < 0.02, ours.std().item()
    sigma = float(sigmas[0])
    assert abs(stock.std().item() - sigma / (1 + sigma**2) ** 0.5) < 0.02  # ~0.76: what the DMD2 sampler fixes
    # the all-in-one node too, and img2img starts from (latent + sigma * noise) / sqrt(1 + sigma^2) exactly
    node = first_unet_input(unet_model, lambda: pack["DMD2KSampler"].execute(
        unet_model, positive(reference), {"samples": latent}, 5, "1 step", 1.0))
    assert abs(node.std().item() - 1.0) < 0.02
    img = torch.full((1, 4, 16, 16), 0.5)
    x = first_unet_input(unet_model, lambda: pack["DMD2KSampler"].execute(
        unet_model, positive(reference), {"samples": img}, 5, "4 steps", 0.6))
    s = unet_model.get_model_object("model_sampling").sigma(torch.tensor(499.0))
    noise = comfy.sample.prepare_noise(img, 5)
    want = (unet_model.model.process_latent_in(img) + s * noise) / (1 + s**2).sqrt()
    assert torch.allclose(x, want, atol=1e-5)


def _expected_patched_weights(strength):
    """W + strength * alpha / rank * up @ down per targeted weight, mapped diffusers -> sgm by the repo's own table
    (not ComfyUI's key map)."""
    import json

    from safetensors.torch import load_file

    from trainer.models import convert

    from conftest import FIXTURES

    lora = load_file(FIXTURES / "loras" / "dmd2_test_lora.safetensors")
    base = load_file(FIXTURES / "unet" / "comfy_test_unet.safetensors")
    config = json.loads((FIXTURES / "unet" / "diffusers" / "config.json").read_text())
    from safetensors import safe_open
    with safe_open(FIXTURES / "unet" / "diffusers" / "diffusion_pytorch_model.safetensors", "pt") as f:
        dkeys = list(f.keys())
    rows = {r.diffusers: r.sgm for r in convert.unet_table(config, dkeys)}
    expected = {}
    for key in lora:
        if not key.endswith(".lora_down.weight"):
            continue
        mod = key[: -len(".lora_down.weight")]
        dpath = next(d for d in rows if d.endswith(".weight") and "lora_unet_" + d[: -len(".weight")].replace(".", "_") == mod)
        sgm = rows[dpath][len("model."):]  # ComfyUI's model state dict starts at diffusion_model.
        down, up = lora[key].float(), lora[f"{mod}.lora_up.weight"].float()
        alpha, rank = float(lora[f"{mod}.alpha"]), down.shape[0]
        w = base["model." + sgm].float()
        expected[sgm] = w + strength * alpha / rank * (up.flatten(1) @ down.flatten(1)).reshape(w.shape)
    return expected


def test_lora_loader_patches_merged_weights_and_reads_recipe(pack, unet_model):
    import json

    strength = 0.7
    model, recipe_json, report = pack["DMD2LoraLoader"].execute(unet_model, "dmd2_test_lora.safetensors", strength).args
    recipe = json.loads(recipe_json)
    assert recipe["timesteps"] == [999, 499] and recipe["source"] == "metadata" and recipe["cfg"] == 1.0
    assert recipe["rank"] == 8 and recipe["alpha"] == 4.0 and recipe["teacher"] == "comfy_test_unet"
    assert recipe["mapped_modules"] == recipe["lora_modules"] > 100, recipe
    assert "mapped onto the model" in report
    expected = _expected_patched_weights(strength)
    assert len(expected) == recipe["mapped_modules"]
    import comfy.model_management as mm

    mm.unload_all_models()
    mm.load_models_gpu([model], force_full_load=True)  # what sampling does: the weights the UNet will run with
    try:
        state = model.model.state_dict()
        worst = max((state[k].float() - v).abs().max().item() for k, v in expected.items())
    finally:
        mm.unload_all_models()
    assert worst < 1e-5, worst
    # the original model is untouched, and "from LoRA" presets read the recipe off the patched model
    ms = model.get_model_object("model_sampling")
    sigmas = pack["DMD2Scheduler"].execute(model, "from LoRA", "", 1.0)[0]
    assert torch.equal(sigmas, torch.cat([ms.sigma(torch.tensor([999.0, 499.0])), torch.zeros(1)]))
    assert pack["DMD2Scheduler"].execute(unet_model, "from LoRA", "", 1.0)[0].numel() == 5  # no LoRA: 4 steps


def test_lora_without_metadata_defaults_to_four_steps(pack, unet_model):
    import json

    _, recipe_json, _ = pack["DMD2LoraLoader"].execute(unet_model, "dmd2_test_lora_nometa.safetensors", 1.0).args
    recipe = json.loads(recipe_json)
    assert recipe["timesteps"] == [999, 749, 499, 249] and recipe["source"] == "default"


def test_ksampler_with_lora_recipe_matches_merged_library_sampler(pack, unet_model, reference):
    model = pack["DMD2LoraLoader"].execute(unet_model, "dmd2_test_lora.safetensors", 1.0)[0]
    latent = torch.zeros(reference["latent_shape"])
    out = pack["DMD2KSampler"].execute(model, positive(reference), {"samples": latent}, reference["seed"], "from LoRA", 1.0)[0]
    ok, msg = close(out_latent(model, out["samples"]), reference["samples"]["lora recipe"])
    assert ok, msg


@pytest.mark.parametrize("name,match", [
    ("sd15_lora.safetensors", r"sd15_lora.safetensors: \d+ of \d+ LoRA modules .* another architecture"),
    ("peft_lora.safetensors", r"PEFT/diffusers-format LoRA .* kohya-format"),
])
def test_lora_loader_refuses_foreign_loras(pack, unet_model, name, match):
    with pytest.raises(pack_errors(pack).LoRAFormatError, match=match) as info:
        pack["DMD2LoraLoader"].execute(unet_model, name, 1.0)
    assert "\n" not in str(info.value)
