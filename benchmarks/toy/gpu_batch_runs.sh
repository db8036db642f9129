#!/usr/bin/env bash
# The toy distillation at GPU batch sizes (NOTES.md point 28), in one call of the device tool: train several runs of
# demo.yaml side by side on one GPU until TRAIN_END seconds, then score every checkpoint with the three classifiers
# (score_checkpoints.py) until END seconds. A run cut at TRAIN_END saves a checkpoint first (SIGINT), so a short lease
# still scores what was trained. Needs the diffusers wheel in .bench/wheels (benchmarks/README.md), carried:
#
#   run(command="TRAIN_END=290 END=360 bash benchmarks/toy/gpu_batch_runs.sh > $OUT/log 2>&1", carry=[".bench"], timeout_s=420)
#   run(command="ONLY='4s-b1024-s0 1s-b1024-s0' TRAIN_END=430 END=560 bash ...", ...)   # two of the runs, longer
#   DRY=1 PYTHON=.venv/bin/python bash benchmarks/toy/gpu_batch_runs.sh   # the same on a CPU, tiny, in about a minute
#   PROFILE=window ...   # point 38: batch 256, 1,200 iterations, DMD2's DMD window against dmd.t_below_step, seeds 0-1
#   PROFILE=gan ...      # point 44: batch 256, 1,200 iterations, GAN weights 1.0 / 0.2 and 3.0 / 0.6, seeds 0-1
#
# Everything (logs, scores.jsonl per run, the final LoRAs) comes back as one $OUT/results.tgz: the device tool returns
# only a few files per call. A second call while the machine is still warm resumes the runs (and their logs and scores)
# from /tmp/toy_gpu_work, which survives between calls on the same machine.
set -u
cd "$(dirname "$0")/../.."
RETURN=${OUT:-/tmp/toy_gpu_out}; WORK=/tmp/toy_gpu_work; LOGS=$WORK/logs; RUNS=$WORK/runs
mkdir -p "$RETURN" "$LOGS" "$RUNS"
PY=${PYTHON:-python3}
# fp32 weights as on the CPU, with TF32 matrix products (convolutions use TF32 by default).
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1
if ! $PY -c "import diffusers" 2>/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .bench/wheels/*.whl || exit 3
  export PYTHONPATH=/tmp/site
fi
{ nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; nproc
  $PY -c "import torch, diffusers, peft; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'peft', peft.__version__)"
} > "$LOGS/env.txt" 2>&1
cat "$LOGS/env.txt"
TRAIN_END=${TRAIN_END:-290}; END=${END:-360}
SCORE=benchmarks/toy/score_checkpoints.py
# name -> overrides on top of demo.yaml; MIN: first checkpoint scored at sampling seed 0; LATE: from there also at 1, 2.
if [ "${DRY:-0}" = 1 ]; then
  DEVICE=cpu; export OMP_NUM_THREADS=1
  COMMON="mixed_precision=no steps=20 checkpoint_every=10"
  declare -A SETS=([4s-b8-s0]="batch_size=8 micro_batch_size=8 seed=0" [1s-b8-s0]="batch_size=8 micro_batch_size=8 seed=0 student.timesteps=1")
  declare -A MIN=([4s-b8-s0]=10 [1s-b8-s0]=10); LATE=20; FIRST=20
  if [ "${PROFILE:-}" = window ]; then  # the window profile's pair in miniature
    declare -A SETS=([4s-b8-s0]="batch_size=8 micro_batch_size=8 seed=0" [4s-b8w-s0]="batch_size=8 micro_batch_size=8 seed=0 dmd.t_below_step=true")
    declare -A MIN=([4s-b8-s0]=10 [4s-b8w-s0]=10)
  elif [ "${PROFILE:-}" = gan ]; then  # the gan profile's stronger GAN in miniature
    declare -A SETS=([4s-b8g1-s0]="batch_size=8 micro_batch_size=8 seed=0 gan.student_weight=1.0 gan.critic_weight=0.2")
    declare -A MIN=([4s-b8g1-s0]=10)
  fi
elif [ "${PROFILE:-}" = window ] || [ "${PROFILE:-}" = gan ]; then  # batch 256, 1,200 iterations, training seeds 0-1
  DEVICE=cuda; export OMP_NUM_THREADS=3
  COMMON="mixed_precision=no checkpoint_every=100 steps=1200 batch_size=256 micro_batch_size=256"
  if [ "$PROFILE" = window ]; then
    declare -A SETS=([4s-b256-s0]="seed=0" [4s-b256-s1]="seed=1"
                     [4s-b256w-s0]="seed=0 dmd.t_below_step=true" [4s-b256w-s1]="seed=1 dmd.t_below_step=true")
  else
    declare -A SETS=([4s-b256g1-s0]="seed=0 gan.student_weight=1.0 gan.critic_weight=0.2"
                     [4s-b256g1-s1]="seed=1 gan.student_weight=1.0 gan.critic_weight=0.2"
                     [4s-b256g3-s0]="seed=0 gan.student_weight=3.0 gan.critic_weight=0.6"
                     [4s-b256g3-s1]="seed=1 gan.student_weight=3.0 gan.critic_weight=0.6")
  fi
  declare -A MIN=(); for name in "${!SETS[@]}"; do MIN[$name]=600; done; LATE=1000; FIRST=200
else
  DEVICE=cuda; export OMP_NUM_THREADS=3
  # steps=4000: the deadline ends the runs (the learning rate is constant, so the trajectory does not depend on steps)
  COMMON="mixed_precision=no checkpoint_every=100 steps=4000"
  declare -A SETS=(
    [4s-b1024-s0]="batch_size=1024 micro_batch_size=1024 seed=0"
    [4s-b1024-s1]="batch_size=1024 micro_batch_size=1024 seed=1"
    [1s-b1024-s0]="batch_size=1024 micro_batch_size=1024 seed=0 student.timesteps=1 checkpoint_every=200"
  )
  declare -A MIN=([4s-b1024-s0]=400 [4s-b1024-s1]=400 [1s-b1024-s0]=800); LATE=1000; FIRST=400
fi
if [ -n "${ONLY:-}" ]; then  # ONLY="4s-b1024-s0 1s-b1024-s0": just these runs (fewer runs, more iterations each)
  for name in "${!SETS[@]}"; do [[ " $ONLY " == *" $name "* ]] || unset "SETS[$name]"; done
fi

bounded() {  # bounded DEADLINE SIGNAL CMD...: run CMD until DEADLINE seconds into this script, or skip it if that has passed
  local left=$(($1 - SECONDS)) sig=$2; shift 2
  [ $left -lt 5 ] && { echo "skipped, deadline passed: $*"; return 124; }
  timeout -s "$sig" $left "$@"
}
for name in "${!SETS[@]}"; do
  (
    bounded $TRAIN_END INT $PY $SCORE $RUNS/$name --train --no-score --set $COMMON ${SETS[$name]} >> "$LOGS/$name.train.log" 2>&1
    echo "train rc $? at ${SECONDS}s" >> "$LOGS/$name.train.log"
    # Every FIRST-th checkpoint first, then the rest (each pass newest first), so a deadline leaves a spread scored.
    bounded $END KILL $PY $SCORE $RUNS/$name --min-step ${MIN[$name]} --every $FIRST --device $DEVICE >> "$LOGS/$name.score.log" 2>&1
    bounded $END KILL $PY $SCORE $RUNS/$name --min-step ${MIN[$name]} --device $DEVICE >> "$LOGS/$name.score.log" 2>&1
    bounded $END KILL $PY $SCORE $RUNS/$name --min-step $LATE --seeds 1,2 --device $DEVICE >> "$LOGS/$name.score.log" 2>&1
    echo "scoring ended at ${SECONDS}s" >> "$LOGS/$name.score.log"
  ) &
done
while [ "$(jobs -r | wc -l)" -gt 0 ]; do  # progress every 15 s: GPU load and each run's progress bar
  sleep 15
  echo "${SECONDS}s: $(nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader 2>/dev/null)"
  for name in "${!SETS[@]}"; do
    printf '  %s %s\n' "$name" "$(tail -c 200 "$LOGS/$name.train.log" | tr '\r' '\n' | grep -a 'it/s\|s/it' | tail -1 | cut -c1-60)"
  done
done
wait
for name in "${!SETS[@]}"; do
  cp "$RUNS/$name/scores.jsonl" "$LOGS/$name.scores.jsonl" 2>/dev/null
  ls "$RUNS/$name/checkpoints" > "$LOGS/$name.checkpoints.txt" 2>/dev/null
  for f in "$RUNS/$name"/*.safetensors; do [ -f "$f" ] && cp "$f" "$LOGS/$name.lora.safetensors"; done
  echo "$name: $(grep -a 'train rc' "$LOGS/$name.train.log") / $(grep -a 'scoring ended' "$LOGS/$name.score.log")"
done
tar czf "$RETURN/results.tgz" -C "$LOGS" .
echo "done in ${SECONDS}s: $RETURN/results.tgz"
