#!/usr/bin/env bash
# The GPU verification run (H100, H200), as one command (device time is scarce): install flash_kda, prewarm
# the CUDA modules in parallel, run the main job, the GPU tests (fast and portable kernels), fla
# compatibility, compute-sanitizer on small shapes, and the benchmark. Everything printed also goes,
# as it happens, to $OUT/summary.txt, and the full logs are packed into $OUT/logs.tar.gz after each
# step: a run cut short by a time limit still returns what it did (two files, under the device
# tool's limit on returned files).
#   usage: bash tools/device_check.sh [quick|tests|layouts|sanitize|bench|kernels|tune|ab|pieces|ncu|all]...
# `bench` runs tools/bench.py with fla unless NO_FLA=1 (which also skips the fla test); `kernels`
# prints per-kernel times for each two-kernel layout; `tune` times each kernel form and layout of
# $LAYOUTS (below) without fla; `ncu` profiles the two kernels with Nsight Compute; `ab` times the
# working tree's kernels against another revision's (AB_CSRC, see the step); `pieces` checks and
# times FLASH_KDA_CUDA_PIECES (PIECES_SWEEP). `quick`, `kernels`, `tune`, `ab`, `pieces` and `ncu` run
# only when named (not in `all`). FAST_ONLY=1 skips the portable build and tests.
set -uo pipefail
OUT=${OUT:-/tmp/flash_kda_out}; LOG=${LOG_DIR:-/tmp/flash_kda_logs}; mkdir -p "$OUT" "$LOG"
exec > >(tee -a "$OUT/summary.txt") 2>&1
pack() { mkdir -p "$LOG/build"; cp /tmp/fkcache/logs/*.log "$LOG/build/" 2>/dev/null; tar -czf "$OUT/logs.tar.gz" -C "$LOG" . 2>/dev/null; }
export PYTHONUNBUFFERED=1 MAX_JOBS=16 FLASH_KDA_CACHE_DIR=/tmp/fkcache
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -2
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee "$LOG/gpu.txt"
steps=${*:-all}
has() { [[ " $steps " == *" $1 "* || " $steps " == *" all "* ]]; }

t0=$(date +%s)
# Prewarm every specialisation the GPU tests use (PREWARM_DIMS / PREWARM_DTYPES narrow it), fast and
# portable variants in parallel. A watchdog copies the build progress and the compiler processes
# into the summary every 30 s, so a build that stalls shows where.
dims=${PREWARM_DIMS:-64,128,256}; dts=${PREWARM_DTYPES:-bf16,fp16}
FLASH_KDA_BUILD_ON_IMPORT=0 python3 tools/prewarm.py --head-dims $dims --dtypes $dts > "$LOG/prewarm_fast.log" 2>&1 &
pw=$!; pids=$pw
if [[ -z "${FAST_ONLY:-}" ]]; then
  FLASH_KDA_BUILD_ON_IMPORT=0 python3 tools/prewarm.py --kernel portable --head-dims $dims --dtypes $dts > "$LOG/prewarm_portable.log" 2>&1 &
  pids="$pids $!"
fi
( while kill -0 $pw 2>/dev/null; do sleep 30
    echo "[prewarm +$(( $(date +%s) - t0 )) s] $(grep -c '\.\.\.' "$LOG/prewarm_fast.log") started;" \
      "compilers: $(ps -eo etimes=,comm= | awk '$2 ~ /cicc|ptxas|cc1plus|nvcc|ninja|ld/ {printf "%s(%ss) ", $2, $1}')"
    pack; done ) &
# Wait on these pids only: a bare `wait` also waits for the `tee` of the exec line above (bash 5.1
# counts the last process substitution), which never ends.
wait $pids
tail -8 "$LOG/prewarm_fast.log"; [[ -n "${FAST_ONLY:-}" ]] || tail -3 "$LOG/prewarm_portable.log"
echo "prewarm: $(( $(date +%s) - t0 )) s"

python3 -m flash_kda 2>&1 | tee "$LOG/main_job.txt"

pack
if [[ " $steps " == *" quick "* ]]; then
  # The fused form's main job for comparison (the run above is the default, two-kernel form), and
  # per-kernel times of the default.
  FLASH_KDA_CUDA_SPLIT=0 python3 -m flash_kda 2>&1 | tee "$LOG/main_job_fused.txt" | grep -E "accuracy|speed|result"
  python3 tools/kernel_times.py ${KERNEL_SHAPES:-} 2>&1 | grep "^|" | tee "$LOG/kernels_quick.txt"
  # where the host time goes: front end, raw op, the binding's workspace allocation
  python3 tools/host_overhead.py --reps 300 2>&1 | tee "$LOG/host_overhead.txt" | grep -E "^  "
fi
pack
if has tests; then
  fla_test=tests/test_fla_compat.py; [[ -z "${NO_FLA:-}" ]] || fla_test=
  # (test_wgmma: one wgmma on the GPU against the emulator's model of it, sm_90 only)
  python3 -m pytest tests/test_wgmma.py -q -ra -p no:cacheprovider 2>&1 | tee "$LOG/tests_wgmma.txt" | tail -4
  python3 -m pytest tests/test_correctness.py tests/test_properties.py $fla_test -k "cuda or fla" -q -ra -p no:cacheprovider 2>&1 | tee "$LOG/tests_fast.txt" | tail -15
  # The fused form (FLASH_KDA_CUDA_SPLIT=0) on the whole GPU suite, the caller-workspace test included.
  FLASH_KDA_CUDA_SPLIT=0 python3 -m pytest tests/test_correctness.py -k cuda -q -ra -p no:cacheprovider 2>&1 | tee "$LOG/tests_fused.txt" | tail -3
  [[ -n "${FAST_ONLY:-}" ]] || FLASH_KDA_KERNEL=portable python3 -m pytest tests/test_correctness.py -k cuda -q -ra -p no:cacheprovider 2>&1 | tee "$LOG/tests_portable.txt" | tail -8
fi
# Kernel forms and layouts of the tensor-core path, as "split VS threads": split 1 is the two-kernel
# form (preparation + recurrence; the default on sm_80+; its threads are VS / 16 warps),
# 0 the fused body (FLASH_KDA_CUDA_SPLIT=0). The knobs restrict the choice; a
# head dim without the forced layout keeps its usual one.
LAYOUTS=${LAYOUTS:-"1,128,256 1,64,128 1,32,64 0,128,512 0,32,256"}
pack
if has layouts; then
  # The tests' small shapes select only some layouts; force each one in turn.
  for cfg in $LAYOUTS; do
    IFS=, read -r sp vs th <<< "$cfg"
    FLASH_KDA_CUDA_SPLIT=$sp FLASH_KDA_CUDA_VSLICE=$vs FLASH_KDA_CUDA_THREADS=$th python3 -m pytest tests/test_correctness.py -q -ra \
      -p no:cacheprovider -k "cuda and (dtypes_and_head_dims or varlen or states or extreme or nan)" 2>&1 \
      | tee "$LOG/tests_layout_${sp}_${vs}x${th}.txt" | tail -1 | sed "s/^/layout split=$sp VS=$vs threads=$th: /"
  done
  FLASH_KDA_CUDA_PREP_THREADS=256 python3 -m pytest tests/test_correctness.py -q -ra -p no:cacheprovider \
    -k "cuda and (dtypes_and_head_dims or varlen or states or extreme or nan)" 2>&1 \
    | tee "$LOG/tests_prep256.txt" | tail -1 | sed "s/^/preparation 256 threads: /"
fi
pack
if has sanitize; then
  # kernel,split[,cluster]: cluster 1 forces the recurrence's V slices into clusters kept in step
  # (FLASH_KDA_CUDA_CLUSTER=1): the small grids here would otherwise run only the plain recurrence,
  # and the in-step one has code of its own (its records come by bulk copies and mbarriers).
  for cfg in ${SANITIZE:-fast,1 fast,1,1 fast,0 portable,1}; do
    IFS=, read -r k sp cl <<< "$cfg"; cl=${cl:-}
    name="${k}_split${sp}${cl:+_cluster$cl}"
    for tool in memcheck racecheck; do
      FLASH_KDA_KERNEL=$k FLASH_KDA_CUDA_SPLIT=$sp FLASH_KDA_CUDA_CLUSTER=$cl compute-sanitizer --tool $tool --error-exitcode 3 python3 tools/sanitize_case.py > "$LOG/sanitize_${tool}_$name.txt" 2>&1
      echo "compute-sanitizer $tool ($k, split=$sp${cl:+, cluster=$cl}): exit $? $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$LOG/sanitize_${tool}_$name.txt" | tail -1)"
    done
  done
fi
pack
if has bench; then
  # Our kernels on every shape first (quick), then side by side with fla on ${FLA_SHAPES:-all}
  # shapes (fla's first call of a shape compiles and autotunes for tens of seconds).
  # (grep, not tail: rows reach the summary as they are printed, so a run cut short keeps them)
  python3 tools/bench.py --no-fla 2>&1 | tee "$LOG/bench_fast.txt" | grep --line-buffered -E "^\||host"
  if [[ -z "${NO_FLA:-}" ]]; then
    python3 tools/bench.py --shapes "${FLA_SHAPES:-all}" 2>&1 | tee "$LOG/bench_fla.txt" | grep --line-buffered -E "^\||host|fla|ours"
  fi
  [[ -n "${FAST_ONLY:-}" ]] || FLASH_KDA_KERNEL=portable python3 tools/bench.py --no-fla 2>&1 | tee "$LOG/bench_portable.txt" | tail -16
fi
pack
if [[ " $steps " == *" kernels "* ]]; then
  # Per-kernel times (tools/kernel_times.py) of each two-kernel layout and preparation width.
  for cfg in $LAYOUTS; do
    IFS=, read -r sp vs th <<< "$cfg"
    [[ $sp == 1 ]] || continue
    echo "== recurrence VS=$vs threads=$th"
    FLASH_KDA_CUDA_SPLIT=1 FLASH_KDA_CUDA_VSLICE=$vs FLASH_KDA_CUDA_THREADS=$th python3 tools/kernel_times.py ${KERNEL_SHAPES:-} 2>&1 | grep "^|" | tee "$LOG/kernels_${vs}x${th}.txt"
  done
  echo "== preparation 256 threads"
  FLASH_KDA_CUDA_PREP_THREADS=256 python3 tools/kernel_times.py ${KERNEL_SHAPES:-} 2>&1 | grep "^|" | tee "$LOG/kernels_prep256.txt"
fi
pack
if [[ " $steps " == *" tune "* ]]; then
  for cfg in $LAYOUTS; do
    IFS=, read -r sp vs th <<< "$cfg"
    echo "== FLASH_KDA_CUDA_SPLIT=$sp FLASH_KDA_CUDA_VSLICE=$vs FLASH_KDA_CUDA_THREADS=$th"
    FLASH_KDA_CUDA_SPLIT=$sp FLASH_KDA_CUDA_VSLICE=$vs FLASH_KDA_CUDA_THREADS=$th python3 tools/bench.py --no-fla --reps ${TUNE_REPS:-10} 2>&1 \
      | tee "$LOG/tune_${sp}_${vs}x${th}.txt" | tail -14
  done
fi
pack
if [[ " $steps " == *" ab "* ]]; then
  # A/B timing of kernel-source revisions in one run: the working tree's against AB_CSRC, one or
  # more copies (space-separated) of other revisions' flash_kda/csrc (prepare them before the call,
  # e.g.
  #   mkdir -p .ab/main && git archive main flash_kda/csrc | tar -x -C .ab/main
  # and pass AB_CSRC=.ab/main/flash_kda/csrc; .ab is git-ignored: name it in the device tool's carry).
  # Per kernel: tools/ab_kernels.py, AB_ROUNDS interleaved rounds (default 3); then whole calls.
  : "${AB_CSRC:?AB_CSRC names the other csrc copies}"
  i=0; sides="--side this="
  for csrc in $AB_CSRC; do sides="$sides --side other$i=$(realpath "$csrc")"; i=$(( i + 1 )); done
  python3 tools/ab_kernels.py $sides --rounds ${AB_ROUNDS:-3} ${KERNEL_SHAPES:-} 2>&1 | tee "$LOG/ab_kernels.txt"
  i=0
  for csrc in this $AB_CSRC; do
    side=this; [[ $csrc == this ]] && csrc= || { csrc=$(realpath "$csrc"); side=other$i; i=$(( i + 1 )); }
    echo "== $side sources${csrc:+ ($csrc)}, whole calls"
    FLASH_KDA_CSRC_DIR=$csrc python3 tools/bench.py --no-fla 2>&1 | tee "$LOG/ab_bench_$side.txt" | grep --line-buffered -E "^\||host"
  done
fi
pack
if [[ " $steps " == *" pieces "* ]]; then
  # FLASH_KDA_CUDA_PIECES (docs/cuda.md, docs/next-overlap.md): the GPU suite with every dense call
  # cut in 3 pieces, both sanitizers with pieces, then whole calls for each k of $PIECES_SWEEP on the
  # long dense shapes, one process per k (the launcher reads the variable once per process).
  FLASH_KDA_CUDA_PIECES=3 python3 -m pytest tests/test_correctness.py -k "cuda or pieces" -q -ra -p no:cacheprovider 2>&1 \
    | tee "$LOG/tests_pieces3.txt" | tail -1 | sed "s/^/GPU suite, pieces=3: /"
  for tool in memcheck racecheck; do
    FLASH_KDA_CUDA_PIECES=3 FLASH_KDA_KERNEL=fast compute-sanitizer --tool $tool --error-exitcode 3 python3 tools/sanitize_case.py > "$LOG/sanitize_${tool}_pieces3.txt" 2>&1
    echo "compute-sanitizer $tool (pieces=3): exit $? $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$LOG/sanitize_${tool}_pieces3.txt" | tail -1)"
  done
  for k in ${PIECES_SWEEP:-1 2 4 8 16 1}; do
    echo "== pieces $k"
    FLASH_KDA_CUDA_PIECES=$k python3 tools/bench.py --no-fla --no-states --reps ${TUNE_REPS:-20} --only "T=32768,T=8192" 2>&1 \
      | tee "$LOG/pieces_bench_$k.txt" | grep --line-buffered -E "^\| T"
  done
fi
pack
if [[ " $steps " == *" ncu "* ]]; then
  # Nsight Compute on each kernel of the default form, second call of tools/profile_case.py (warm
  # module), T=2048 H=96 unless NCU_SHAPE="T H" (NCU_KERNELS narrows the kernels); the full report,
  # the stall counters and the SASS listing go to the logs; headlines, the top stall reasons and the
  # per-phase split (tools/ncu_segments.py) here.
  for k in ${NCU_KERNELS:-kda_prep_kernel kda_recurrence_kernel}; do
    ncu --set full -k "regex:$k" --launch-skip 1 -c 1 --import-source yes -f -o "/tmp/ncu_$k" \
      python3 tools/profile_case.py ${NCU_SHAPE:-2048 96} > "$LOG/ncu_${k}_run.txt" 2>&1
    ncu -i "/tmp/ncu_$k.ncu-rep" --page details > "$LOG/ncu_$k.txt" 2>&1
    # stall reasons (raw counters) and the per-instruction SASS view with its sampled stalls
    ncu -i "/tmp/ncu_$k.ncu-rep" --page raw 2>&1 | grep -E "smsp__average_warp(s|_latency)_issue_stalled|smsp__pcsamp_warps_issue_stalled" \
      > "$LOG/ncu_${k}_stalls.txt"
    ncu -i "/tmp/ncu_$k.ncu-rep" --page source --print-source sass > "$LOG/ncu_${k}_sass.txt" 2>&1
    python3 tools/ncu_segments.py "$LOG/ncu_${k}_sass.txt" > "$LOG/ncu_${k}_segments.txt" 2>&1
    grep -E "^ +(Duration|DRAM Throughput|Memory Throughput|Compute \(SM\) Throughput|Registers Per Thread|Achieved Occupancy|Theoretical Occupancy|Block Limit (Registers|Shared Mem)|Warp Cycles Per Issued Instruction|Executed Ipc Active) " \
      "$LOG/ncu_$k.txt" | sed "s/^ */$k: /"
    grep average_warps_issue_stalled "$LOG/ncu_${k}_stalls.txt" | sort -k3 -g -r | head -6 | sed "s/^ */$k: /"
    sed "s/^/$k: /" "$LOG/ncu_${k}_segments.txt"
  done
fi
echo "total: $(( $(date +%s) - t0 )) s"
pack
