#!/bin/bash
# Every check and benchmark that needs a GPU, in one run of about 9 minutes.
#
#   OUT=/tmp/gpu_out RECATTN_COMMIT=$(git rev-parse HEAD) \
#       bash experiments/gpu_checks.sh
#
# Run from the repository root on a machine with one NVIDIA GPU and jax
# installed. Lent GPU machines here have no network: the missing Python
# packages travel as wheels in `.whl/` (and `.whl_pins/`: flax, optax and
# orbax-checkpoint at versions inside pyproject's ranges, used only when the
# machine's own are outside them), and the prepared TFDS datasets in
# `.devdata/tfds` (see experiments/README.md, "GPU sessions").
#
# Phase A runs alone on the GPU, because it times things:
#   1. SASRec ML-1M epoch time against the lean JAX step (issue 2's goal),
#      experiments/000_speed_lean_step/bench.py;
#   2. attention throughput against cuDNN in the same process (issue 3):
#      scaled_dot, blockwise and hstu (its Pallas kernel on GPU) through
#      gpu_throughput.py (hstu_pallas_bench.py, the kernel's block-size
#      sweep, is run on its own);
#   3. the time/memory table of every variant at bf16 (bench.py).
# Phase B shares the GPU until the deadline:
#   4. GPU-only tests (cuDNN agreement with the reference);
#   5. study 003's sweep, `--jobs` runs at a time, headline rows first,
#      then studies 009 and 008 while time is left;
#      beside it, the SASRec losses that a CPU cannot afford: ML-1M with
#      exact softmax and per-position negatives, 3 seeds each
#      (001_sasrec_ml1m/sweep_loss.py), and Beauty with exact softmax.
# Everything lands in $OUT/results.tgz (repository-relative paths, packed
# again after every step, split into parts under 15 MB), the log in
# $OUT/gpu_checks.log. Unfinished runs keep their checkpoints, so a CPU or a
# later GPU session resumes them with the same sweep command.
set -u
OUT=${OUT:-/tmp/gpu_out}
# Seconds after the start to stop training and pack: a call's limit is 600 s
# and a machine's start eats a minute or two of a 15-minute lease.
DEADLINE=${DEADLINE:-520}
JOBS=${JOBS:-4}
W=/tmp/gpu_work           # results outside the repository, packed at the end
mkdir -p "$OUT" "$W"
T0=$SECONDS
LOG=$OUT/gpu_checks.log
log() { echo "[$((SECONDS - T0)) s] $*" | tee -a "$LOG"; }
left() { echo $((DEADLINE - (SECONDS - T0))); }
# step <timeout seconds> <name> <command...>: output to the log, never fatal.
step() {
  local limit=$1 name=$2; shift 2
  log "== $name (limit ${limit} s)"
  timeout --kill-after=5 "$limit" "$@" >>"$LOG" 2>&1
  log "== $name: exit $?"
}
pack() {
  rm -f "$OUT"/results.tgz.part-*
  tar czf - -C / "${W#/}" -C "$PWD" $(ls -d \
      experiments/003_attention_variants/runs \
      experiments/009_algorithm_parameters/runs \
      experiments/008_time_aware/runs \
      experiments/001_sasrec_ml1m/runs \
      experiments/003_attention_variants/prelim/sasrec_beauty_softmax_full \
      2>/dev/null) \
      | split -b 15m -d - "$OUT/results.tgz.part-"
}

export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
export RECATTN_DATA_DIR=$PWD/.devdata/tfds
export RECATTN_MANUAL_DIR=$PWD/.devdata/manual
PY=python3
SITE=/tmp/site
if [ -d .whl ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
      --upgrade --target "$SITE" .whl/*.whl >>"$LOG" 2>&1
fi
# flax/optax/orbax: the machine's own if inside pyproject's ranges.
if [ -d .whl_pins ] && ! $PY - <<'EOF' >>"$LOG" 2>&1
from importlib.metadata import version
from packaging.version import Version as V
ok = (V("0.12") <= V(version("flax")) < V("0.14")
      and V("0.2.5") <= V(version("optax")) < V("0.3")
      and V("0.11") <= V(version("orbax-checkpoint")) < V("0.13"))
print("machine's flax/optax/orbax inside the pins:", ok)
raise SystemExit(0 if ok else 1)
EOF
then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
      --upgrade --target "$SITE" .whl_pins/*.whl >>"$LOG" 2>&1
fi
export PYTHONPATH=$SITE:$PWD
nvidia-smi -L >>"$LOG" 2>&1
$PY -c "
import jax, flax, optax, orbax.checkpoint, tensorflow_datasets, ml_collections
print('jax', jax.__version__, 'flax', flax.__version__, 'optax',
      optax.__version__, 'tfds', tensorflow_datasets.__version__,
      jax.devices())" >>"$LOG" 2>&1 || log "imports FAILED"
log "set-up done"

# ---- Phase A: alone on the GPU -------------------------------------------
step 120 speed_lean_step $PY experiments/000_speed_lean_step/bench.py \
    --settings=default --epochs=3 --out=$W/speed_lean_step_gpu.json
step 60 gpu_throughput $PY experiments/002_attention_cost/gpu_throughput.py \
    --variants=scaled_dot,blockwise,hstu --reps=5 \
    --out=$W/gpu_throughput.json
pack
# additive and din build [B, H, L, L, hidden] tensors: short lengths only
# (at 16k, XLA's autotuner alone tries to allocate 64 GiB).
step 60 bench_bf16 $PY experiments/002_attention_cost/bench.py \
    --dtype=bfloat16 --reps=3 --max_s=2 --max_gib=60 \
    --variants=scaled_dot,dot,blockwise,local,linear,low_rank,hstu,hstu_tiled \
    --lengths=200,1024,4096,16384 --out=$W/bench_gpu_bf16.json
step 30 bench_bf16_mlp $PY experiments/002_attention_cost/bench.py \
    --dtype=bfloat16 --reps=3 --max_s=2 --max_gib=60 \
    --variants=additive,din --lengths=200,1024 \
    --out=$W/bench_gpu_bf16_mlp.json
pack

# ---- Phase B: shared ------------------------------------------------------
log "phase B: $(left) s left"
train() {  # train <name> <workdir> <config> <overrides...>
  local name=$1 workdir=$2 config=$3; shift 3
  step $(( $(left) - 10 )) "$name" $PY -m recattn.main --config="$config" \
      --workdir="$workdir" --config.progress=False "$@"
}
( export JAX_PLATFORMS=cuda; step 150 pytest_gpu $PY -m pytest -q \
    -p no:cacheprovider tests/attention_softmax_test.py -k cudnn \
    tests/attention_hstu_pallas_test.py tests/serving_incremental_test.py ) &
( train softmax_beauty \
    experiments/003_attention_variants/prelim/sasrec_beauty_softmax_full \
    configs/sasrec_beauty.py --config.loss.name=softmax ) &
( step $(( $(left) - 10 )) sweep001_loss $PY -m recattn.sweep \
    --sweep=experiments/001_sasrec_ml1m/sweep_loss.py --jobs=3 ) &
step $(( $(left) - 10 )) sweep003 $PY -m recattn.sweep \
    --sweep=experiments/003_attention_variants/sweep.py --jobs=$JOBS
# Then, while time is left: study 009 (needs study 003's ML-1M seed-0 rows;
# stops at once with a one-line error until they exist) and study 008.
for study in 009_algorithm_parameters 008_time_aware; do
  [ "$(left)" -gt 30 ] && step $(( $(left) - 10 )) "sweep_$study" \
      $PY -m recattn.sweep --sweep=experiments/$study/sweep.py --jobs=$JOBS
done
wait
log "packing"
pack
ls -la "$OUT" >>"$LOG"
log "done"
