#!/usr/bin/env bash
# GPU benchmark of empf_jax against the PyTorch reference (one NVIDIA GPU, e.g. an H200).
#
#   OUT=/path/to/results bash benchmarks/gpu.sh            # on the GPU machine, < 6 minutes
#   OUT=/tmp/gpu_dry bash benchmarks/gpu.sh --dry-run      # the same sequence on the CPU, tiny sizes
#
# ResNet-18 (binary weights), T=4, 32x32x3, batch 64, fp32: online training, random-step training
# and evaluation, JAX and PyTorch alternating in one process per mode, so that JAX's
# peak_bytes_in_use (a process-wide peak) belongs to one mode; then BPTT, and JAX alone in bfloat16
# at batch 256, while the time budget lasts. Every step writes one JSON file to $OUT
# (benchmarks/throughput.py --device=gpu). Compiled programs go to a persistent cache
# ($JAX_COMPILATION_CACHE_DIR, default /tmp/empf_jax_compilation_cache), so a second run skips
# compilation. Nothing is downloaded.
set -euo pipefail

DRY_RUN=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    *) echo "unknown argument: $arg (allowed: --dry-run)" >&2; exit 2 ;;
  esac
done

cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT to the folder for the JSON results}
mkdir -p "$OUT"
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/empf_jax_compilation_cache}
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0
export JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=0
export XLA_PYTHON_CLIENT_PREALLOCATE=false
PYTHON=${PYTHON:-python3}
OPTIONAL_STEP=${OPTIONAL_STEP:-75}  # seconds an optional step is expected to need

if [ "$DRY_RUN" = 1 ]; then
  BUDGET=${BUDGET:-900}  # a shared CPU can be slow; the sizes are tiny
  COMMON=(--device=cpu --smoke)
else
  BUDGET=${BUDGET:-330}  # seconds for the whole script; optional steps start only with time left
  COMMON=(--device=gpu --batch=64 --time_steps=4 --size=32 --repeats=5 --iters=10 --warmup=2)
fi

run_step() {  # run_step NAME REQUIRED(0/1) FLAGS...
  local name=$1 required=$2
  shift 2
  local left=$((BUDGET - SECONDS))
  if [ "$required" = 0 ] && [ "$left" -lt "$OPTIONAL_STEP" ]; then
    echo "== $name: skipped (${left} s of the budget left)"
    return 0
  fi
  if [ "$left" -le 0 ]; then
    echo "== $name: skipped (time budget spent)"
    return 0
  fi
  echo "== $name (${left} s left): $PYTHON -m benchmarks.throughput ${COMMON[*]} $*"
  if ! timeout "$left" "$PYTHON" -m benchmarks.throughput "${COMMON[@]}" "$@" \
      --out="$OUT/$name.json"; then
    echo "== $name: failed or timed out" >&2
    FAILED=1
  fi
}

FAILED=0
"$PYTHON" - <<'EOF' | tee "$OUT/environment.txt"
import jax, torch
print("jax", jax.__version__, "devices", jax.devices())
print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "-")
EOF
run_step fp32_b64_online 1 --modes=online
run_step fp32_b64_random_step 1 --modes=random_step
run_step fp32_b64_eval 1 --modes=eval
run_step fp32_b64_bptt 0 --modes=bptt
if [ "$DRY_RUN" = 1 ]; then
  run_step bf16_jax 0 --frameworks=jax --dtype=bfloat16 --modes=online,random_step,eval
else
  run_step bf16_b256_jax 0 --frameworks=jax --dtype=bfloat16 --batch=256 \
    --modes=online,random_step,eval
fi
echo "== done in ${SECONDS} s; results in $OUT"
exit "$FAILED"
