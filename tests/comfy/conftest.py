"""tests/comfy/inprocess runs only inside ComfyUI's venv (test_comfyui.py starts it there with DMD2_IN_COMFY=1)."""
import os

collect_ignore = [] if os.environ.get("DMD2_IN_COMFY") else ["inprocess"]
