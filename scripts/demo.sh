#!/usr/bin/env bash
# Sets up ./.venv and runs the demo: distills the bundled toy teacher into a 4-step LoRA (and a 1-step one), writes
# outputs/demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=test bash scripts/setup_env.sh
. .venv/bin/activate
dmd2 demo "$@"
