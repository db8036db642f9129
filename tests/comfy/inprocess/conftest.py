"""Loads ComfyUI 0.3.75 in-process (CPU) and the comfy-dmd2 pack through ComfyUI's own custom-node loader.

Environment: DMD2_COMFYUI_DIR (the unpacked ComfyUI tree), DMD2_COMFY_FIXTURES (tests/comfy/fixtures.py's output).
"""
from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
COMFY_DIR = Path(os.environ["DMD2_COMFYUI_DIR"])
FIXTURES = Path(os.environ["DMD2_COMFY_FIXTURES"])

sys.path.insert(0, str(COMFY_DIR))
if str(REPO) not in sys.path:
    sys.path.append(str(REPO))  # trainer.* for the checks' own expectations (after ComfyUI's modules)
_argv, sys.argv = sys.argv, [str(COMFY_DIR / "main.py"), "--cpu"]
import comfy.options  # noqa: E402

comfy.options.enable_args_parsing()
import comfy.model_management  # noqa: E402,F401  (reads --cpu)

sys.argv = _argv

import folder_paths  # noqa: E402
import nodes  # noqa: E402

folder_paths.add_model_folder_path("loras", str(FIXTURES / "loras"), is_default=True)
folder_paths.add_model_folder_path("diffusion_models", str(FIXTURES / "unet"), is_default=True)


@pytest.fixture(scope="session")
def pack():
    """The node classes, registered by ComfyUI's loader from the repo folder as it would be in custom_nodes/."""
    before = set(nodes.NODE_CLASS_MAPPINGS)
    ok = asyncio.run(nodes.load_custom_node(str(REPO)))
    assert ok, "ComfyUI's loader did not load the pack (see the log above)"
    added = {k: nodes.NODE_CLASS_MAPPINGS[k] for k in set(nodes.NODE_CLASS_MAPPINGS) - before}
    return added


@pytest.fixture(scope="session")
def reference():
    import torch

    return torch.load(FIXTURES / "reference.pt")


@pytest.fixture(scope="session")
def unet_model():
    import comfy.sd
    import comfy.utils

    sd = comfy.utils.load_torch_file(str(FIXTURES / "unet" / "comfy_test_unet.safetensors"))
    return comfy.sd.load_diffusion_model_state_dict(sd)
