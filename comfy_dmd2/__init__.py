"""comfy-dmd2's ComfyUI node pack (V3 schema): DMD2 Scheduler, DMD2 Sampler, DMD2 LoRA Loader, DMD2 KSampler.

ComfyUI calls :func:`comfy_entrypoint`; the nodes (which import ComfyUI's modules) load only then, so importing this
package outside ComfyUI costs nothing. Loading imports torch and the torch-only ``trainer.sampling`` /
``trainer.errors``, never diffusers, transformers, peft or gradio.
"""


async def comfy_entrypoint():
    from .nodes import DMD2Extension

    return DMD2Extension()


__all__ = ["comfy_entrypoint"]
