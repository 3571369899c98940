python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
# One run on a GPU machine (JAX with CUDA, orbax-checkpoint, tensorstore installed; the
# wheels of keras, namex, optree and portpicker in .whl/), about 5 minutes:
#   1. benchmarks/exactness_check.py with deterministic XLA ops: a mid-epoch interrupted
#      run vs an uninterrupted one, and a save overlapping training steps, bit for bit,
#      with the device snapshot path in use (at most 110 s);
#   2. benchmarks/checkpoint_overhead.py --mode gpu: 300M parameters, saves close and
#      spaced, restore vs cold read, against keras's callbacks and the raw floor (at
#      most 290 s; what was measured is kept if it is cut short).
# Results (at most 5 files) go to $OUT. FT_GPU_CHECK_SIZE=tiny tries it on a CPU.
set -u
OUT=${OUT:-/tmp/ft-gpu-check}
SIZE=${FT_GPU_CHECK_SIZE:-300M}
WIDTH=${FT_GPU_CHECK_WIDTH:-1024}
mkdir -p "$OUT"
export KERAS_BACKEND=jax TF_CPP_MIN_LOG_LEVEL=3 PYTHONUNBUFFERED=1
export FT_BENCH_DIR=${FT_BENCH_DIR:-/tmp}
LOG="$OUT/gpu_check.log"
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || true
  python3 -c "import jax, keras, orbax.checkpoint as o; print('jax', jax.__version__, jax.devices(), 'keras', keras.__version__, 'orbax', o.__version__)"
} >"$LOG" 2>&1
rc=0
XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_deterministic_ops=true" timeout 110 \
  python3 benchmarks/exactness_check.py --width "$WIDTH" --out "$OUT/exactness.json" >>"$LOG" 2>&1 \
  || { rc=$?; echo "exactness check failed: exit $rc" >>"$LOG"; }
export FT_BENCH_PARTIAL="$OUT/benchmark-gpu-partial.json"  # kept if the run is cut short
timeout 290 python3 benchmarks/checkpoint_overhead.py --mode gpu --sizes "$SIZE" --saves 2 \
  --time-limit 270 --out "$OUT" >>"$LOG" 2>&1 || { rc=$?; echo "benchmark failed: exit $rc" >>"$LOG"; }
date -u >>"$LOG"
grep -v "oneDNN\|absl::InitializeLog" "$LOG" | tail -60
exit $rc
