#!/usr/bin/env bash
# One-go GPU benchmark session for a machine with CUDA, torch, peft, accelerate and transformers but no diffusers
# (the lent H100/H200 image). Run from the repository root; see benchmarks/README.md for how to call it through the
# device tool (carry .bench/, which holds the diffusers wheel and a copy of the naive reference).
#
#   bash benchmarks/gpu_session.sh            # train_cycle (all presets + naive reference), inference, inference --compile
#   STAGES=train bash benchmarks/gpu_session.sh   # only some stages: train | infer | compile (at most ~570 s in all)
#
# Results go to $OUT (the device tool's return folder; benchmarks/out when unset): RESULTS-gpu.md (the sections to
# append to benchmarks/RESULTS.md), one log per benchmark, and env.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
STAGES=${STAGES:-train infer compile}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

# diffusers (and optionally bitsandbytes) from carried wheels; nothing can be downloaded on the device machine.
if ! $PY -c "import diffusers" 2>/dev/null; then
  ls .bench/wheels/*.whl >/dev/null 2>&1 || { echo "no wheels in .bench/wheels: see benchmarks/README.md" >&2; exit 3; }
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .bench/wheels/*.whl || exit 3
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# The naive reference lives beside the repo (../shared/reference), which does not travel: use the carried copy.
if [ -f .bench/naive_dmd2_cycle.py ]; then export DMD2_NAIVE_REFERENCE=$PWD/.bench/naive_dmd2_cycle.py; fi

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c "import torch, diffusers, peft, accelerate, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| diffusers', diffusers.__version__, '| peft', peft.__version__, '| accelerate', accelerate.__version__, '| transformers', transformers.__version__)"
  $PY -c "import bitsandbytes as b; print('bitsandbytes', b.__version__)" 2>/dev/null || echo "bitsandbytes: not installed (12gb preset uses bf16 optimizer states)"
} 2>&1 | tee "$OUT/env.txt"

status=0
for stage in $STAGES; do
  case $stage in
    train)    # ~4 min on an H100: 3 presets + naive with/without checkpointing, 2 timed cycles each
      timeout 330 $PY benchmarks/train_cycle.py --shape sdxl --cycles 2 --results "$OUT/RESULTS-gpu.md" 2>&1 | tee "$OUT/train_cycle.log" || status=1 ;;
    infer)    # ~1 min: eager student vs teacher
      timeout 90 $PY benchmarks/inference.py --shape sdxl --runs 3 --results "$OUT/RESULTS-gpu.md" 2>&1 | tee "$OUT/inference.log" || status=1 ;;
    compile)  # ~2-3 min: the same with torch.compile (CUDA graphs), compile time included in warmup_s
      timeout 150 $PY benchmarks/inference.py --shape sdxl --runs 3 --compile --results "$OUT/RESULTS-gpu.md" 2>&1 | tee "$OUT/inference_compile.log" || status=1 ;;
    *) echo "unknown stage $stage" >&2; status=2 ;;
  esac
done
exit $status
