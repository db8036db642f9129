"""The repo's torch-only shared modules. In ComfyUI the repo folder is the package (``<folder>.comfy_dmd2``), so the
trainer is a sibling package reached relatively; pip-installed, ``trainer`` is top level."""
try:
    from ..trainer import errors, sampling  # noqa: F401  (repo cloned into ComfyUI/custom_nodes/)
except ImportError:
    from trainer import errors, sampling  # noqa: F401  (pip install, or the repo root on sys.path)

__all__ = ["errors", "sampling"]
