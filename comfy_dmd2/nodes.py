"""The comfy-dmd2 ComfyUI nodes (V3 schema). Thin layers: the schedule and the sampler step are the pure functions of
``trainer.sampling`` that ``dmd2 generate`` uses too, so ComfyUI and diffusers sample a DMD2 student the same way.

- DMD2 Scheduler -> SIGMAS exactly at the trained timesteps (through the model's own model_sampling), ending in 0.
- DMD2 Sampler   -> SAMPLER: predict x0, re-noise with fresh seeded noise to the next sigma. From an empty latent
  the UNet sees unit-variance noise at any first sigma (stock samplers get that wrong unless sigma == sigma_max,
  e.g. for the 1-step student at t=399); img2img starts from latent + sigma * noise.
- DMD2 LoRA Loader -> MODEL with the LoRA applied (refusing files whose keys do not map), and its recipe.
- DMD2 KSampler  -> all in one: recipe timesteps, the DMD2 sampler, cfg 1 (no negative prompt).
"""
from __future__ import annotations

import json
import logging

import torch

import comfy.model_management
import comfy.model_sampling
import comfy.sample
import comfy.samplers
import comfy.utils
import folder_paths
import latent_preview
from comfy_api.latest import ComfyExtension, io

from . import lora_keys
from . import recipe as recipes
from ._shared import errors, sampling

log = logging.getLogger("comfy_dmd2")

PRESET_OPTIONS = [*recipes.PRESETS, recipes.FROM_LORA, recipes.CUSTOM]
KSAMPLER_PRESETS = [recipes.FROM_LORA, *recipes.PRESETS]
START_OPTIONS = ["auto", "from noise", "img2img"]


def _discrete_model_sampling(model):
    ms = model.get_model_object("model_sampling")
    if not isinstance(ms, comfy.model_sampling.ModelSamplingDiscrete) or not isinstance(ms, comfy.model_sampling.EPS) \
            or isinstance(ms, (comfy.model_sampling.CONST, comfy.model_sampling.EDM)):
        raise errors.UnsupportedModelError(
            f"DMD2 needs a discrete-timestep SD/SDXL model (epsilon or v-prediction); this model samples with "
            f"{type(ms).__name__}")
    return ms


def _model_recipe(model) -> dict | None:
    return model.model_options.get(recipes.MODEL_OPTIONS_KEY)


def dmd2_sigmas(model, timesteps) -> torch.Tensor:
    """Sigmas at the given integer timesteps from the model's own schedule, then 0."""
    if not timesteps:
        return torch.FloatTensor([])
    ms = _discrete_model_sampling(model)
    picked = ms.sigma(torch.tensor([float(t) for t in timesteps])).float().cpu()
    return torch.cat([picked, picked.new_zeros(1)])


class DMD2KSAMPLER(comfy.samplers.KSAMPLER):
    """The DMD2 sampler as a ComfyUI SAMPLER. It overrides ``sample`` because the first input depends on whether the
    latent is empty (KSAMPLER's noise_scaling only knows ``sigma == sigma_max``)."""

    def __init__(self, start: str = "auto"):
        super().__init__(None)
        if start not in START_OPTIONS:
            raise errors.ConfigError(f"start must be one of {START_OPTIONS}, got {start!r}")
        self.start = start

    def from_noise(self, latent_image) -> bool:
        if self.start != "auto":
            return self.start == "from noise"
        return latent_image is None or not bool(torch.any(latent_image != 0))

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None, disable_pbar=False):
        ms = model_wrap.inner_model.model_sampling
        if not isinstance(ms, comfy.model_sampling.EPS) or isinstance(ms, comfy.model_sampling.CONST):
            raise errors.UnsupportedModelError(f"the DMD2 sampler needs an SD/SDXL-type model; got {type(ms).__name__}")
        extra_args["denoise_mask"] = denoise_mask
        model_k = comfy.samplers.KSamplerX0Inpaint(model_wrap, sigmas)
        model_k.latent_image = latent_image
        model_k.noise = noise
        if latent_image is None:
            latent_image = torch.zeros_like(noise)
        x = sampling.initial_latent(noise, sigmas[0].to(noise.dtype), None if self.from_noise(latent_image) else latent_image)
        seed = extra_args.get("seed")
        if seed is None:
            noise_fn = lambda i: torch.randn(noise.shape, dtype=noise.dtype, device="cpu").to(noise.device)  # noqa: E731
        else:
            noise_fn = sampling.seeded_step_noise(seed, noise.shape, device=noise.device, dtype=noise.dtype)
        s_in = x.new_ones([x.shape[0]])
        steps = len(sigmas) - 1
        state = {"i": 0}

        def denoise(x_in, sigma):
            x0 = model_k(x_in, sigma * s_in, **extra_args)
            if callback is not None:
                callback(state["i"], x0, x_in, steps)
            state["i"] += 1
            return x0

        samples = sampling.sample_dmd2(denoise, x, sigmas, noise_fn)
        return ms.inverse_noise_scaling(sigmas[-1], samples)


class DMD2Scheduler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DMD2Scheduler",
            display_name="DMD2 Scheduler",
            category="sampling/custom_sampling/schedulers",
            description="Sigmas exactly at a DMD2 student's trained timesteps (4 steps: 999, 749, 499, 249), ending in 0.",
            inputs=[
                io.Model.Input("model"),
                io.Combo.Input("preset", options=PRESET_OPTIONS, default="4 steps",
                               tooltip="4 steps: 999,749,499,249; 2 steps: 999,499; 1 step: 399; from LoRA: the recipe "
                                       "the DMD2 LoRA Loader read (4 steps if none); custom: the list below."),
                io.String.Input("custom_timesteps", default="999, 749, 499, 249",
                                tooltip="Used when preset is custom: decreasing training timesteps (0-999)."),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Below 1 (img2img), only the trained timesteps under denoise*1000 are kept."),
            ],
            outputs=[io.Sigmas.Output()],
        )

    @classmethod
    def execute(cls, model, preset, custom_timesteps, denoise) -> io.NodeOutput:
        ts = recipes.resolve_timesteps(preset, custom_timesteps, _model_recipe(model), denoise)
        return io.NodeOutput(dmd2_sigmas(model, ts))


class DMD2Sampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DMD2Sampler",
            display_name="DMD2 Sampler",
            category="sampling/custom_sampling/samplers",
            description="DMD2 / LCM-style sampling: predict x0, then add fresh seeded noise to the next sigma. Use cfg 1.",
            inputs=[
                io.Combo.Input("start", options=START_OPTIONS, default="auto",
                               tooltip="auto: an empty (all-zero) latent starts from unit-variance noise at any first "
                                       "sigma, any other latent is img2img (latent + sigma * noise)."),
            ],
            outputs=[io.Sampler.Output()],
        )

    @classmethod
    def execute(cls, start) -> io.NodeOutput:
        return io.NodeOutput(DMD2KSAMPLER(start))


def apply_lora(model, lora_name: str, strength: float):
    """(patched model, recipe, MappingReport); raises LoRAFormatError when the file does not fit the model."""
    import comfy.lora
    import comfy.lora_convert

    path = folder_paths.get_full_path_or_raise("loras", lora_name)
    try:
        tensors, metadata = comfy.utils.load_torch_file(path, safe_load=True, return_metadata=True)
    except Exception as exc:
        raise errors.LoRAFormatError(f"cannot read LoRA {lora_name}: {str(exc).splitlines()[0] if str(exc) else exc}") from None
    tensors = comfy.lora_convert.convert_lora(tensors)
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    weights = model.model.state_dict()

    def weight_shape(key):
        w = weights.get(key)
        return None if w is None else tuple(w.shape)

    report = lora_keys.analyze(tensors, key_map, weight_shape)
    lora_keys.check(report, lora_name)
    patches = comfy.lora.load_lora(tensors, {m: key_map[m] for m in report.mapped}, log_missing=False)
    recipe = recipes.recipe_from_metadata(metadata)
    new_model = model.clone()
    applied = new_model.add_patches(patches, strength)
    if len(set(applied)) != len(report.mapped):
        raise errors.LoRAFormatError(f"{lora_name}: only {len(set(applied))} of {len(report.mapped)} mapped LoRA "
                                     "modules could be patched onto the model")
    info = recipe.as_dict() | {"lora": lora_name, "strength": strength, "mapped_modules": len(report.mapped),
                               "lora_modules": report.modules, "ignored_text_encoder_modules": report.text_encoder}
    new_model.model_options[recipes.MODEL_OPTIONS_KEY] = info
    log.info("DMD2 LoRA %s: %s; recipe timesteps %s (%s)", lora_name, report.summary(), list(recipe.timesteps), recipe.source)
    return new_model, info, report


class DMD2LoraLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DMD2LoraLoader",
            display_name="DMD2 LoRA Loader",
            category="loaders",
            description="Applies a (kohya-format) DMD2 LoRA to the model and reads its sampling recipe. Fails with a "
                        "clear message when the LoRA's keys do not map onto the model, instead of a silent log line.",
            inputs=[
                io.Model.Input("model"),
                io.Combo.Input("lora_name", options=folder_paths.get_filename_list("loras")),
                io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="1.0 on the teacher it was distilled from; 0.5-0.75 on other fine-tunes."),
            ],
            outputs=[
                io.Model.Output(),
                io.String.Output(display_name="recipe", tooltip="JSON: timesteps, cfg, sampler, rank, alpha, teacher, ..."),
                io.String.Output(display_name="report", tooltip="How many LoRA modules mapped onto the model."),
            ],
        )

    @classmethod
    def execute(cls, model, lora_name, strength) -> io.NodeOutput:
        new_model, info, report = apply_lora(model, lora_name, strength)
        text = f"{report.summary()}; timesteps {info['timesteps']} ({info['source']})"
        return io.NodeOutput(new_model, json.dumps(info, indent=2), text)


class DMD2KSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DMD2KSampler",
            display_name="DMD2 KSampler",
            category="sampling",
            description="All-in-one DMD2 sampling: the student's trained timesteps (from the LoRA's recipe by "
                        "default), the DMD2 sampler and cfg 1. No negative prompt: DMD2 students ignore it.",
            inputs=[
                io.Model.Input("model"),
                io.Conditioning.Input("positive"),
                io.Latent.Input("latent_image"),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True),
                io.Combo.Input("preset", options=KSAMPLER_PRESETS, default=recipes.FROM_LORA,
                               tooltip="from LoRA: the recipe the DMD2 LoRA Loader read (4 steps if none)."),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Below 1 (img2img), only the trained timesteps under denoise*1000 are used."),
            ],
            outputs=[io.Latent.Output()],
        )

    @classmethod
    def execute(cls, model, positive, latent_image, seed, preset, denoise) -> io.NodeOutput:
        ts = recipes.resolve_timesteps(preset, "", _model_recipe(model), denoise)
        sigmas = dmd2_sigmas(model, ts)
        out = latent_image.copy()
        latent = comfy.sample.fix_empty_latent_channels(model, latent_image["samples"])
        if len(sigmas) == 0:
            out["samples"] = latent
            return io.NodeOutput(out)
        noise = comfy.sample.prepare_noise(latent, seed, latent_image.get("batch_index"))
        guider = comfy.samplers.CFGGuider(model)
        guider.inner_set_conds({"positive": positive})
        guider.set_cfg(1.0)
        callback = latent_preview.prepare_callback(model, len(sigmas) - 1)
        samples = guider.sample(noise, latent, DMD2KSAMPLER("auto"), sigmas, denoise_mask=latent_image.get("noise_mask"),
                                callback=callback, disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
        out["samples"] = samples.to(comfy.model_management.intermediate_device())
        return io.NodeOutput(out)


NODES = [DMD2Scheduler, DMD2Sampler, DMD2LoraLoader, DMD2KSampler]


class DMD2Extension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return NODES
