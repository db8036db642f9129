"""The node pack's pure parts (no ComfyUI needed): recipe metadata, LoRA key analysis, import hygiene, workflows."""
from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

import pytest
import torch

from comfy_dmd2 import lora_keys, recipe
from trainer import sampling
from trainer.errors import ConfigError, LoRAFormatError

REPO = Path(__file__).resolve().parents[2]


# -------------------------------------------------------------------------------------------------------- recipe

def test_recipe_from_trainer_metadata():
    from trainer.export import recipe_metadata

    meta = recipe_metadata(timesteps=[999, 499], rank=64, alpha=8.0, training_steps=16000, teacher="sdxl-base",
                           teacher_hash="abc123", prediction_type="epsilon")
    r = recipe.recipe_from_metadata(meta)
    assert r.timesteps == (999, 499) and r.cfg == 1.0 and r.sampler == "dmd2" and r.source == "metadata"
    assert (r.rank, r.alpha, r.training_steps, r.teacher, r.teacher_hash) == (64, 8.0, 16000, "sdxl-base", "abc123")
    assert json.loads(r.to_json())["timesteps"] == [999, 499]


@pytest.mark.parametrize("meta", [None, {}, {"ss_network_dim": "64"}, {"dmd2.timesteps": "not json"},
                                  {"dmd2.timesteps": "[249, 999]"}, {"dmd2.timesteps": "[1000]"}])
def test_recipe_without_usable_metadata_is_the_4_step_preset(meta):
    r = recipe.recipe_from_metadata(meta)
    assert r.timesteps == (999, 749, 499, 249) and r.source == "default" and r.notes


def test_recipe_ignores_cfg_other_than_one():
    r = recipe.recipe_from_metadata({"dmd2.timesteps": "[399]", "dmd2.cfg": "4.5"})
    assert r.timesteps == (399,) and r.cfg == 1.0 and any("cfg" in n for n in r.notes)


def test_resolve_timesteps():
    assert recipe.resolve_timesteps("4 steps") == (999, 749, 499, 249)
    assert recipe.resolve_timesteps("2 steps") == (999, 499)
    assert recipe.resolve_timesteps("1 step") == (399,)
    assert recipe.resolve_timesteps("custom", "999, 749 ,499") == (999, 749, 499)
    assert recipe.resolve_timesteps("custom", "[999, 499]") == (999, 499)
    assert recipe.resolve_timesteps("from LoRA", recipe={"timesteps": [999, 499]}) == (999, 499)
    assert recipe.resolve_timesteps("from LoRA", recipe=None) == (999, 749, 499, 249)
    assert recipe.resolve_timesteps("4 steps", denoise=0.5) == (499, 249)
    assert recipe.resolve_timesteps("4 steps", denoise=0.75) == (749, 499, 249)
    assert recipe.resolve_timesteps("4 steps", denoise=0.1) == (249,)
    assert recipe.resolve_timesteps("1 step", denoise=0.3) == (399,)
    assert recipe.resolve_timesteps("4 steps", denoise=0.0) == ()


@pytest.mark.parametrize("text,match", [("", "empty"), ("999, abc", "whole numbers"), ("249, 999", "decreasing"),
                                        ("1000", "outside")])
def test_bad_custom_timesteps(text, match):
    with pytest.raises(ConfigError, match=match):
        recipe.parse_timesteps(text)


def test_sampling_helpers():
    assert sampling.denoise_timesteps((999, 749, 499, 249), 1.0) == (999, 749, 499, 249)
    with pytest.raises(ValueError):
        sampling.denoise_timesteps((999,), 0.0)
    gen = torch.Generator().manual_seed(5)
    first, second, third = (torch.randn(1, 4, 3, 3, generator=gen) for _ in range(3))
    fn = sampling.seeded_step_noise(5, (1, 4, 3, 3))
    assert torch.equal(fn(0), second) and torch.equal(fn(1), third)


# ---------------------------------------------------------------------------------------------------- LoRA keys

class _T:
    def __init__(self, *shape):
        self.shape = shape


def _kohya(module, out_f, in_f, rank=4, conv=False):
    down = _T(rank, in_f, 3, 3) if conv else _T(rank, in_f)
    up = _T(out_f, rank, 1, 1) if conv else _T(out_f, rank)
    return {f"{module}.lora_down.weight": down, f"{module}.lora_up.weight": up, f"{module}.alpha": _T()}


KEY_MAP = {"lora_unet_a_to_q": "diffusion_model.a.to_q.weight", "lora_unet_b_conv1": "diffusion_model.b.conv1.weight"}
SHAPES = {"diffusion_model.a.to_q.weight": (320, 320), "diffusion_model.b.conv1.weight": (320, 640, 3, 3)}


def test_analyze_maps_everything():
    tensors = {**_kohya("lora_unet_a_to_q", 320, 320), **_kohya("lora_unet_b_conv1", 320, 640, conv=True),
               **_kohya("lora_te1_text_model_encoder_layers_0_mlp_fc1", 3072, 768)}
    rep = lora_keys.analyze(tensors, KEY_MAP, SHAPES.get)
    assert rep.fmt == "kohya" and rep.ok and rep.modules == 2 and len(rep.mapped) == 2 and rep.text_encoder == 1
    lora_keys.check(rep, "x.safetensors")
    assert "2 of 2 LoRA modules mapped" in rep.summary()


def test_analyze_refuses_unmapped_and_misshapen():
    rep = lora_keys.analyze({**_kohya("lora_unet_a_to_q", 320, 320), **_kohya("lora_unet_zz_to_k", 320, 768)},
                            KEY_MAP, SHAPES.get)
    assert rep.unmapped == ["lora_unet_zz_to_k"]
    with pytest.raises(LoRAFormatError, match=r"1 of 2 LoRA modules name no layer .* another architecture"):
        lora_keys.check(rep, "sd15.safetensors")
    rep = lora_keys.analyze(_kohya("lora_unet_a_to_q", 320, 768), KEY_MAP, SHAPES.get)
    assert rep.mismatched == ["lora_unet_a_to_q"]
    with pytest.raises(LoRAFormatError, match="do not fit the shapes"):
        lora_keys.check(rep, "x.safetensors")


def test_analyze_refuses_peft_even_where_keys_map():
    tensors = {"unet.a.to_q.lora_A.weight": _T(4, 320), "unet.a.to_q.lora_B.weight": _T(320, 4)}
    rep = lora_keys.analyze(tensors, {"unet.a.to_q": "diffusion_model.a.to_q.weight"}, SHAPES.get)
    assert rep.fmt == "peft" and not rep.ok
    with pytest.raises(LoRAFormatError, match="PEFT/diffusers-format"):
        lora_keys.check(rep, "peft.safetensors")


def test_analyze_refuses_text_encoder_only_and_empty():
    with pytest.raises(LoRAFormatError, match="only text-encoder layers"):
        lora_keys.check(lora_keys.analyze(_kohya("lora_te_x", 8, 8), KEY_MAP, SHAPES.get), "te.safetensors")
    with pytest.raises(LoRAFormatError, match="no LoRA layers"):
        lora_keys.check(lora_keys.analyze({"foo": _T(1)}, KEY_MAP, SHAPES.get), "junk.safetensors")


# ------------------------------------------------------------------------------------------------ import hygiene

HEAVY = {"diffusers", "transformers", "peft", "gradio", "accelerate", "huggingface_hub"}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = ("." * node.level) + (node.module or "")
            names.add(base)
            names.update(f"{base}.{a.name}" if node.module else f"{base}{a.name}" for a in node.names)
    return names


def test_pack_imports_only_torch_and_torch_only_trainer_modules():
    """What ComfyUI loads: the root __init__, comfy_dmd2/*, and the trainer modules they reach."""
    files = [REPO / "__init__.py", *sorted((REPO / "comfy_dmd2").glob("*.py"))]
    reached = {"trainer/errors.py", "trainer/sampling.py", "trainer/__init__.py"}
    for f in files:
        for name in _imports(f):
            top = name.lstrip(".").split(".")[0]
            assert top not in HEAVY, f"{f.name} imports {name}"
            if "trainer" in name:
                assert name.split("trainer")[-1].lstrip(".").split(".")[0] in ("", "errors", "sampling"), (f.name, name)
    for rel in reached:
        for name in _imports(REPO / rel):
            assert name.split(".")[0] in {"__future__", "typing", "torch"}, (rel, name)
    assert not any(hasattr(m, "NODE_CLASS_MAPPINGS") for m in (sys.modules.get("comfy_dmd2"),))


def test_importing_the_pack_outside_comfyui_is_free():
    import subprocess

    code = ("import sys, comfy_dmd2, comfy_dmd2.recipe, comfy_dmd2.lora_keys; "
            "print(sorted(m for m in ('diffusers','transformers','peft','gradio','comfy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------------------------------------------- workflows

def test_workflow_files_are_generated_and_consistent():
    sys.path.insert(0, str(REPO / "workflows"))
    try:
        import make_workflows
    finally:
        sys.path.pop(0)
    files = make_workflows.render()
    stale = [str(p.relative_to(REPO)) for p, text in files.items() if not p.exists() or p.read_text() != text]
    assert not stale, f"run python workflows/make_workflows.py: {stale}"
    for name in make_workflows.WORKFLOWS:
        ui = json.loads((REPO / "workflows" / "ui" / f"{name}.json").read_text())
        api = json.loads((REPO / "workflows" / "api" / f"{name}.json").read_text())
        assert {str(n["id"]) for n in ui["nodes"]} == set(api)
        assert any(n["type"].startswith("DMD2") for n in ui["nodes"])
        for n in ui["nodes"]:
            if n["type"] == "DMD2KSampler":
                assert "cfg" not in api[str(n["id"])]["inputs"]
            if n["type"] == "KSampler" and "Teacher" not in n.get("title", ""):
                pytest.fail(f"{name}: a stock KSampler that is not the teacher")
