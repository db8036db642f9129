#!/usr/bin/env bash
# One-go GPU benchmark session for a machine with CUDA, torch, peft, accelerate and transformers but no diffusers
# (the lent H100/H200 image). Run from the repository root; see benchmarks/README.md for how to call it through the
# device tool (carry .bench/, which holds the diffusers wheel and a copy of the naive reference).
#
#   bash benchmarks/gpu_session.sh            # train_cycle (all presets + naive reference), inference, inference --compile
#   STAGES=train bash benchmarks/gpu_session.sh   # only some stages: train | infer | compile | options (DEADLINE=560 s in all)
#   PRESETS=12gb,80gb STAGES=train ...          # the train stage on some presets only (default: all three)
#   SHAPE=tiny bash benchmarks/gpu_session.sh     # dry run of the whole script on a CPU
#
# Results go to $OUT (the device tool's return folder; benchmarks/out when unset): RESULTS-gpu.md (the sections to
# append to benchmarks/RESULTS.md), one log per benchmark, and env.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
STAGES=${STAGES:-train infer compile}
SHAPE=${SHAPE:-sdxl}            # tiny: a CPU dry run of this script
DEADLINE=${DEADLINE:-560}       # seconds for all stages together (the device tool's limit is 600 per call)
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

# diffusers from carried wheels; nothing can be downloaded on the device machine.
if ! $PY -c "import diffusers" 2>/dev/null; then
  ls .bench/wheels/*.whl >/dev/null 2>&1 || { echo "no wheels in .bench/wheels: see benchmarks/README.md" >&2; exit 3; }
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .bench/wheels/*.whl || exit 3
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# Optional unpacked packages (bitsandbytes trimmed to its CUDA 13 libraries: the whole wheel would not fit the
# 64 MiB the device tool carries).
if [ -d .bench/site ]; then export PYTHONPATH=$PWD/.bench/site${PYTHONPATH:+:$PYTHONPATH}; fi
# The naive reference lives beside the repo (../shared/reference), which does not travel: use the carried copy.
if [ -f .bench/naive_dmd2_cycle.py ]; then export DMD2_NAIVE_REFERENCE=$PWD/.bench/naive_dmd2_cycle.py; fi

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c "import torch, diffusers, peft, accelerate, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| diffusers', diffusers.__version__, '| peft', peft.__version__, '| accelerate', accelerate.__version__, '| transformers', transformers.__version__)"
  $PY -c "import bitsandbytes as b; print('bitsandbytes', b.__version__)" 2>/dev/null || echo "bitsandbytes: not installed (12gb preset uses bf16 optimizer states)"
} 2>&1 | tee "$OUT/env.txt"

# Each stage gets at most its cap and never more than what is left of DEADLINE, so a slow stage (compile, with a cold
# cache) cannot take the others' results with it: every log is already in $OUT when a stage is cut off.
stage() {  # stage NAME CAP_SECONDS ARGS...
  local name=$1 cap=$2 left=$((DEADLINE - SECONDS)); shift 2
  [ "$left" -lt "$cap" ] && cap=$left
  if [ "$cap" -lt 20 ]; then echo "skipped $name: ${left}s left of DEADLINE" | tee -a "$OUT/$name.log"; status=1; return; fi
  echo "== $name (at most ${cap}s, ${SECONDS}s elapsed)"
  timeout "$cap" $PY "$@" --shape "$SHAPE" --results "$OUT/RESULTS-gpu.md" > "$OUT/$name.log" 2>&1 || { echo "$name failed or timed out (rc $?)"; status=1; }
  tail -n 15 "$OUT/$name.log"
}
status=0
for s in $STAGES; do
  case $s in
    train)    stage train_cycle 300 benchmarks/train_cycle.py --cycles 2 --presets "${PRESETS:-12gb,24gb,80gb}" ;;  # + naive with/without checkpointing
    options)  stage train_options 240 benchmarks/train_cycle.py --cycles 2 --presets 80gb,12gb --no-reference --against-default --set dmd.critic_per_step=true ;;
    infer)    stage inference 90 benchmarks/inference.py --runs 3 ;;            # eager student vs teacher
    compile)  stage inference_compile 400 benchmarks/inference.py --runs 3 --compile ;;  # + torch.compile (CUDA graphs)
    *) echo "unknown stage $s" >&2; status=2 ;;
  esac
done
echo "done in ${SECONDS}s"
exit $status
