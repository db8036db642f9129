"""ComfyUI loads this file when the repository is cloned into ``ComfyUI/custom_nodes/``: it exposes the comfy-dmd2
node pack (V3 schema). The pack is imported lazily, on ComfyUI's first look-up of ``comfy_entrypoint``, so that
importing this folder as a package elsewhere (pytest, tools) costs nothing. The pack imports only torch and the
torch-only ``trainer.sampling``: never the trainer's heavy dependencies (diffusers, peft, gradio)."""


def __getattr__(name: str):
    if name == "comfy_entrypoint":
        from .comfy_dmd2 import comfy_entrypoint

        return comfy_entrypoint
    raise AttributeError(name)
