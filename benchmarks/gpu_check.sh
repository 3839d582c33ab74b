#!/usr/bin/env bash
# One prepared run on a GPU machine: build the extension with that machine's python3 and torch, run the
# GPU-marked tests, run the benchmarks, and write everything (JSON + a log) into $OUT when set (the device
# tool's output folder), else benchmarks/results/<date>-<gpu>/.
#
#   FLORENCE_COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu_check.sh [--quick]
#
# The working tree on the device carries no .git: pass the commit in FLORENCE_COMMIT so every row names it.
# Writes 6 files (the device tool returns at most 8): gpu_check.log, gpu_check.json, info.json, gpu_tests.xml,
# benchmarks.jsonl (every bench's rows) and benchmark_tables_and_plots.tar.gz (CSV + PNG per bench). Every step runs even if an earlier one failed; the exit code is the
# number of failed steps.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
QUICK=""
[ "${1:-}" = "--quick" ] && QUICK="--quick"

GPU_SLUG=$($PY -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '_'))" 2>/dev/null || echo no_gpu)
OUT_DIR=${OUT:-$ROOT/benchmarks/results/$(date -u +%Y-%m-%d)-$GPU_SLUG}
mkdir -p "$OUT_DIR"
LOG=$OUT_DIR/gpu_check.log
exec > >(tee -a "$LOG") 2>&1

export FLORENCE_COMMIT=${FLORENCE_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
echo "== florence_kernels gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ) commit $FLORENCE_COMMIT"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 || true
$PY -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"

declare -A STATUS
step() {  # step NAME COMMAND...: run, time and record the exit status
  local name=$1; shift
  echo; echo "== $name: $*"
  local t0=$(date +%s)
  "$@"
  local rc=$?
  STATUS[$name]="$rc $(( $(date +%s) - t0 ))"
  echo "== $name: exit $rc in $(( $(date +%s) - t0 )) s"
}

# Build only for this GPU's architecture: a minute instead of several.
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")}
export MAX_JOBS=${MAX_JOBS:-8}
step build $PY setup.py --quiet build_ext --inplace
step info bash -c "$PY -m florence_kernels.info && $PY -m florence_kernels.info --json > '$OUT_DIR/info.json'"
step gpu_tests $PY -m pytest -m gpu tests/gpu -q -p no:cacheprovider --junitxml="$OUT_DIR/gpu_tests.xml"
# Per-bench .jsonl/.csv/.png would pass the device tool's 8-file limit: rows are merged into one benchmarks.jsonl,
# CSVs and plots travel in one tarball.
BENCH_TMP=$(mktemp -d)
step benchmarks $PY -m benchmarks --device cuda --dtype bf16 $QUICK --out "$BENCH_TMP"
cat "$BENCH_TMP"/*.jsonl > "$OUT_DIR/benchmarks.jsonl" 2>/dev/null || true
tar -czf "$OUT_DIR/benchmark_tables_and_plots.tar.gz" -C "$BENCH_TMP" . 2>/dev/null || true

FAILED=0
SUMMARY="{"
for name in build info gpu_tests benchmarks; do
  read -r rc secs <<< "${STATUS[$name]:-127 0}"
  [ "$rc" = 0 ] || FAILED=$((FAILED + 1))
  SUMMARY+="\"$name\": {\"exit\": $rc, \"seconds\": $secs}, "
done
$PY - "$OUT_DIR/gpu_check.json" "$SUMMARY" <<'PYEOF'
import datetime, json, os, platform, sys
import torch
try:
    import triton
    tv = triton.__version__
except ImportError:
    tv = None
path, steps = sys.argv[1], json.loads(sys.argv[2].rstrip(", ") + "}")
doc = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
       "commit": os.environ.get("FLORENCE_COMMIT"), "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
       "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda, "triton": tv,
       "torch_cuda_arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST"), "steps": steps}
tmp = path + ".tmp"
with open(tmp, "w") as f:
    json.dump(doc, f, indent=1)
os.replace(tmp, path)
print(json.dumps(doc, indent=1))
PYEOF
echo "== gpu_check done: $FAILED failed step(s); results in $OUT_DIR"
exit $FAILED
