#!/usr/bin/env bash
# One prepared run on a GPU machine: build the extension for this GPU's architecture only, run the GPU-marked tests,
# run the benchmarks, print one summary table, and write everything into $OUT when set (the device tool's output
# folder), else benchmarks/results/<date>-<gpu>/.
#
#   FLORENCE_COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu_check.sh [--quick] [--dry-run]
#
# --quick    quick benches and a time limit per step, so that the whole run ends within 8 minutes on one H200
#            (16 cores): build 140 s, info 20 s, GPU tests 150 s, benchmarks 120 s (430 s, at most 5 s more each to
#            stop, and ~20 s of set-up and summary). A step at its limit gets SIGINT first (pytest then still
#            writes its junit report and prints its summary), SIGKILL 5 s later; it counts as failed and the
#            summary says so; the files written so far stay.
# --dry-run  every step that needs no GPU, as CI runs it (.ci/run): the build (for 9.0, the H200's architecture),
#            info, collecting the GPU tests, and importing every bench and checking its optional packages. It
#            proves the script and what it calls still work without spending device time. Like the real run it
#            builds the extension in place (for 9.0): run it with the interpreter of .venv-gpu (make test-gpu-env
#            does), not with .venv's, whose extension is built for 8.0 and 9.0.
#
# The working tree on the device carries no .git: pass the commit in FLORENCE_COMMIT so every row names it.
# Writes 7 files (the device tool returns at most 8): gpu_check.log, gpu_check.json (steps, exit codes, seconds,
# skips and their reasons), info.json, gpu_tests.xml, benchmarks.jsonl (every bench's rows), benchmarks_status.json
# (which benches ran, were skipped and why, failed) and benchmark_tables_and_plots.tar.gz (CSV + PNG per bench).
# Packages the GPU machine lacks (open_clip, DeepSpeed, DALI: requirements-gpu-machine.txt) skip what needs them,
# with the reason; they are not failures. Every step runs even if an earlier one failed; the exit code is the number
# of failed steps.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
QUICK=""
DRY=0
for arg in "$@"; do
  case $arg in
    --quick) QUICK="--quick" ;;
    --dry-run) DRY=1 ;;
    *) echo "gpu_check.sh: unknown argument $arg (expected --quick, --dry-run)"; exit 2 ;;
  esac
done

GPU_SLUG=$($PY -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '_'))" 2>/dev/null || echo no_gpu)
if [ "$DRY" = 0 ] && [ "$GPU_SLUG" = no_gpu ]; then
  echo "gpu_check.sh: no CUDA GPU visible to $PY (torch.cuda.is_available() is False); use --dry-run without one"
  exit 2
fi
if [ -n "${OUT:-}" ]; then
  OUT_DIR=$OUT
elif [ "$DRY" = 1 ]; then
  OUT_DIR=$(mktemp -d)/gpu_check_dry_run
else  # a new folder per run: an earlier run's files are evidence, never overwritten or mixed into this summary
  OUT_DIR=$ROOT/benchmarks/results/$(date -u +%Y-%m-%d)-$GPU_SLUG
  n=2; base=$OUT_DIR
  while [ -e "$OUT_DIR" ]; do OUT_DIR=$base-$n; n=$((n + 1)); done
fi
mkdir -p "$OUT_DIR"
rm -f "$OUT_DIR/gpu_tests.xml" "$OUT_DIR/benchmarks_status.json"  # $OUT: the device tool empties it; never stale
LOG=$OUT_DIR/gpu_check.log
exec 3>&1 4>&2
exec > >(tee -a "$LOG") 2>&1
TEE_PID=$!

export FLORENCE_COMMIT=${FLORENCE_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
MODE=full; [ -n "$QUICK" ] && MODE=quick; [ "$DRY" = 1 ] && MODE=dry-run
echo "== florence_kernels gpu_check ($MODE) $(date -u +%Y-%m-%dT%H:%M:%SZ) commit $FLORENCE_COMMIT"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 || true
$PY -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"

declare -A STATUS LIMIT
LIMIT=([build]=140 [info]=20 [gpu_tests]=150 [benchmarks]=120)
step() {  # step NAME COMMAND...: run (within its limit under --quick), time and record the exit status
  local name=$1; shift
  echo; echo "== $name: $*"
  local t0=$(date +%s) rc
  if [ -n "$QUICK" ]; then
    timeout --signal=INT --kill-after=5 "${LIMIT[$name]}" "$@"; rc=$?
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then echo "== $name: stopped at its ${LIMIT[$name]} s limit"; rc=124; fi
  else
    "$@"; rc=$?
  fi
  STATUS[$name]="$rc $(( $(date +%s) - t0 ))"
  echo "== $name: exit $rc in $(( $(date +%s) - t0 )) s"
}

# Build only for this GPU's architecture (9.0 on an H200; 9.0 in a dry run), whatever the machine's environment
# says (an image may export a list of every architecture): a minute on 16 cores. FLORENCE_GPU_ARCH overrides.
if [ "$DRY" = 1 ]; then
  export TORCH_CUDA_ARCH_LIST=${FLORENCE_GPU_ARCH:-9.0}
else
  export TORCH_CUDA_ARCH_LIST=${FLORENCE_GPU_ARCH:-$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")}
fi
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
step build $PY setup.py --quiet build_ext --inplace
step info bash -c "$PY -m florence_kernels.info && $PY -m florence_kernels.info --json > '$OUT_DIR/info.json'"
XDIST=""
if [ "$DRY" = 1 ]; then
  step gpu_tests $PY -m pytest -m gpu tests/gpu -q -p no:cacheprovider --collect-only
else
  # Triton compiles each kernel configuration on first use, one at a time per process: pytest-xdist (on the GPU
  # machine's image) spreads the compiles over the cores.
  $PY -c "import xdist" 2>/dev/null && XDIST="-n 8"
  step gpu_tests $PY -m pytest -m gpu tests/gpu -q -p no:cacheprovider -rs $XDIST --junitxml="$OUT_DIR/gpu_tests.xml"
fi
# Per-bench .jsonl/.csv/.png would pass the device tool's 8-file limit: rows are merged into one benchmarks.jsonl,
# CSVs and plots travel in one tarball.
BENCH_TMP=$(mktemp -d)
if [ "$DRY" = 1 ]; then
  step benchmarks $PY -m benchmarks --device cuda --dtype bf16 --quick --dry-run --out "$BENCH_TMP"
else
  step benchmarks $PY -m benchmarks --device cuda --dtype bf16 $QUICK --out "$BENCH_TMP"
fi
cp "$BENCH_TMP/benchmarks_status.json" "$OUT_DIR/" 2>/dev/null || true
if [ "$DRY" = 0 ]; then
  cat "$BENCH_TMP"/*.jsonl > "$OUT_DIR/benchmarks.jsonl" 2>/dev/null || true
  tar -czf "$OUT_DIR/benchmark_tables_and_plots.tar.gz" -C "$BENCH_TMP" --exclude benchmarks_status.json . 2>/dev/null || true
fi

STEPS=""
for name in build info gpu_tests benchmarks; do
  read -r rc secs <<< "${STATUS[$name]:-127 0}"
  limit=0; [ -n "$QUICK" ] && limit=${LIMIT[$name]}
  STEPS+="$name $rc $secs $limit;"
done
$PY "$ROOT/benchmarks/gpu_check_summary.py" "$OUT_DIR" "$MODE" "$STEPS"
FAILED=$?
exec 1>&3 2>&4 3>&- 4>&-  # close the pipe to tee and let it finish writing the log before exiting
wait "$TEE_PID" 2>/dev/null || true
exit $FAILED
