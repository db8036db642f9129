#!/usr/bin/env bash
# Creates ./.venv with everything comfy-dmd2 needs (idempotent). CPU torch by default; set TORCH_SPEC to choose
# another build, e.g. TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128".
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
# pip byte-compiles what it installs on one core (about 40 s here); compileall afterwards uses every core (24 s on 2)
if ! python -c "import torch" 2>/dev/null; then
  # shellcheck disable=SC2086
  python -m pip install -q --no-compile ${TORCH_SPEC:-torch==2.13.0} 2>&1 | grep -v '^WARNING: Location' || true
fi
constraints=${CONSTRAINTS-constraints.txt}  # the versions CI last passed with; CONSTRAINTS= for the newest
# shellcheck disable=SC2086
python -m pip install -q --no-compile ${constraints:+-c "$constraints"} -e ".[${EXTRAS:-test}]" 2>&1 \
  | grep -v '^WARNING: Location' || true
# Compiled again whenever site-packages differs from the listing last compiled (a run stopped before this line too).
# A few packages ship files that are not Python 3, which compileall reports and pip skipped silently.
site=$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if [ "$(ls "$site")" != "$(cat .venv/.compiled-listing 2>/dev/null)" ]; then
  python -m compileall -q -j 0 "$site" >/dev/null 2>&1 || true
  ls "$site" > .venv/.compiled-listing
fi
python -c "import torch, diffusers, peft, transformers" || { echo "setup failed: see pip's output above" >&2; exit 1; }
