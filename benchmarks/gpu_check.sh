# One run on a GPU machine (JAX with CUDA, orbax-checkpoint, tensorstore installed; the
# wheels of keras, namex, optree, portpicker and google-crc32c in .whl/, and of a
# current orbax-checkpoint: an image's orbax before 0.12.5 copies every array before
# writing it, which is not what this measures), about 8 minutes:
#   1. benchmarks/exactness_check.py with deterministic XLA ops: a mid-epoch interrupted
#      run vs an uninterrupted one, and a save overlapping training steps, bit for bit,
#      with the device snapshot path in use (at most 100 s);
#   2. benchmarks/checkpoint_overhead.py --mode gpu: 300M parameters, saves spaced,
#      then restore vs cold read (3 samples), then saves close, against keras's
#      callbacks, the raw floor and a no-op per-step hook (at most 440 s: on an H100
#      the close mode took about 120 s, the spaced mode about 150 s, each restore
#      sample about 25 s; what was measured is kept if it is cut short).
# Results (at most 5 files) go to $OUT. FT_GPU_CHECK_SIZE=tiny tries it on a CPU.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
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
XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_deterministic_ops=true" timeout 100 \
  python3 benchmarks/exactness_check.py --width "$WIDTH" --out "$OUT/exactness.json" >>"$LOG" 2>&1 \
  || { rc=$?; echo "exactness check failed: exit $rc" >>"$LOG"; }
export FT_BENCH_PARTIAL="$OUT/benchmark-gpu-partial.json"  # kept if the run is cut short
timeout 440 python3 benchmarks/checkpoint_overhead.py --mode gpu --sizes "$SIZE" --saves 2 \
  --modes spaced close --restores 3 --time-limit 420 --out "$OUT" >>"$LOG" 2>&1 || { rc=$?; echo "benchmark failed: exit $rc" >>"$LOG"; }
date -u >>"$LOG"
grep -v "oneDNN\|absl::InitializeLog" "$LOG" | tail -60
exit $rc
