#!/usr/bin/env bash
# The H100 verification run, as one command (device time is scarce): install flash_kda, prewarm
# the CUDA modules in parallel, run the main job, the GPU tests (fast and portable kernels), fla
# compatibility, compute-sanitizer on small shapes, and the benchmark. Logs go to $OUT.
#   usage: bash tools/device_check.sh [tests|layouts|sanitize|bench|tune|all]...
# `bench` runs tools/bench.py with fla unless NO_FLA=1; `tune` times each V-slice width of the
# tensor-core body (FLASH_KDA_CUDA_VSLICE) without fla.
set -uo pipefail
OUT=${OUT:-/tmp/flash_kda_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS=16 FLASH_KDA_CACHE_DIR=/tmp/fkcache
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -2
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
steps=${*:-all}
has() { [[ " $steps " == *" $1 "* || " $steps " == *" all "* ]]; }

t0=$(date +%s)
# Prewarm every specialisation the GPU tests use, fast and portable variants in parallel.
FLASH_KDA_BUILD_ON_IMPORT=0 python3 tools/prewarm.py --head-dims 64,128,256 --dtypes bf16,fp16 > "$OUT/prewarm_fast.log" 2>&1 &
if [[ -z "${FAST_ONLY:-}" ]]; then
  FLASH_KDA_BUILD_ON_IMPORT=0 python3 tools/prewarm.py --kernel portable --head-dims 64,128,256 --dtypes bf16,fp16 > "$OUT/prewarm_portable.log" 2>&1 &
fi
wait
tail -3 "$OUT/prewarm_fast.log"; [[ -n "${FAST_ONLY:-}" ]] || tail -3 "$OUT/prewarm_portable.log"
echo "prewarm: $(( $(date +%s) - t0 )) s"

python3 -m flash_kda 2>&1 | tee "$OUT/main_job.txt"

if has tests; then
  python3 -m pytest tests/test_correctness.py tests/test_fla_compat.py -k "cuda or fla" -q -ra -p no:cacheprovider 2>&1 | tee "$OUT/tests_fast.txt" | tail -15
  FLASH_KDA_KERNEL=portable python3 -m pytest tests/test_correctness.py -k cuda -q -ra -p no:cacheprovider 2>&1 | tee "$OUT/tests_portable.txt" | tail -8
fi
if has layouts; then
  # The tests' small shapes select only some tensor-core layouts; force each one in turn (the knobs
  # restrict the choice; a head dim without the forced layout keeps its usual one).
  for cfg in "128 512" "64 256" "32 256"; do
    set -- $cfg
    FLASH_KDA_CUDA_VSLICE=$1 FLASH_KDA_CUDA_THREADS=$2 python3 -m pytest tests/test_correctness.py -q -ra \
      -p no:cacheprovider -k "cuda and (dtypes_and_head_dims or varlen or states or extreme or nan)" 2>&1 \
      | tee "$OUT/tests_layout_${1}x${2}.txt" | tail -1 | sed "s/^/layout VS=$1 threads=$2: /"
  done
  FLASH_KDA_CUDA_VSLICE=128 FLASH_KDA_CUDA_THREADS=512 compute-sanitizer --tool memcheck --error-exitcode 3 \
    python3 tools/sanitize_case.py > "$OUT/sanitize_memcheck_128x512.txt" 2>&1
  echo "memcheck VS=128 threads=512: exit $? $(grep 'ERROR SUMMARY' "$OUT/sanitize_memcheck_128x512.txt")"
  FLASH_KDA_CUDA_VSLICE=128 FLASH_KDA_CUDA_THREADS=512 compute-sanitizer --tool racecheck --error-exitcode 3 \
    python3 tools/sanitize_case.py > "$OUT/sanitize_racecheck_128x512.txt" 2>&1
  echo "racecheck VS=128 threads=512: exit $? $(grep 'RACECHECK SUMMARY' "$OUT/sanitize_racecheck_128x512.txt")"
fi
if has sanitize; then
  for tool in memcheck racecheck; do
    for kernel in fast portable; do
      FLASH_KDA_KERNEL=$kernel compute-sanitizer --tool $tool --error-exitcode 3 python3 tools/sanitize_case.py > "$OUT/sanitize_${tool}_${kernel}.txt" 2>&1
      echo "compute-sanitizer $tool ($kernel): exit $? $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/sanitize_${tool}_${kernel}.txt" | tail -1)"
    done
  done
fi
if has bench; then
  python3 tools/bench.py ${NO_FLA:+--no-fla} 2>&1 | tee "$OUT/bench_fast.txt" | tail -20
  FLASH_KDA_KERNEL=portable python3 tools/bench.py --no-fla 2>&1 | tee "$OUT/bench_portable.txt" | tail -16
fi
if [[ " $steps " == *" tune "* ]]; then
  for cfg in "128 512" "32 256"; do
    set -- $cfg
    echo "== FLASH_KDA_CUDA_VSLICE=$1 FLASH_KDA_CUDA_THREADS=$2"
    FLASH_KDA_CUDA_VSLICE=$1 FLASH_KDA_CUDA_THREADS=$2 python3 tools/bench.py --no-fla --reps 10 2>&1 \
      | tee "$OUT/tune_${1}x${2}.txt" | tail -14
  done
fi
echo "total: $(( $(date +%s) - t0 )) s"
