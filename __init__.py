"""ComfyUI loads this file when the repository is cloned into ``ComfyUI/custom_nodes/``: it exposes the comfy-dmd2
node pack (V3 schema). Only ``comfy_dmd2`` and the torch-only ``trainer.sampling`` are imported here: never the
trainer's heavy dependencies (diffusers, peft, gradio)."""
from .comfy_dmd2 import comfy_entrypoint  # noqa: F401

__all__ = ["comfy_entrypoint"]
