#!/usr/bin/env bash
# Everything that needs a GPU, in one run that fits a short lease (about 6 minutes; the lease is
# 15 minutes in all and a start costs a few): build for the card, the kernel and build tests with
# the CUDA backend, then with Triton (separate, timed pytest runs), a draft + verify step of the
# five ops captured in a CUDA graph (bench/gpu_capture.py), bounded kernel benchmarks; a one-screen
# summary last.
#
#   bash bench/gpu_check.sh            on a CUDA machine; no network needed (PIP_NO_INDEX, HF_HUB_OFFLINE)
#   bash bench/gpu_check.sh --dry-run  on a CPU: the paths, the imports, the test selection and the
#                                      benchmark script, without building or a GPU
#
# The GPU machine must hold python3 with torch, triton, pytest, hypothesis, scipy, pybind11, cmake
# and ninja (pytest-xdist is used when present). Results go to ${OUT:-bench/results}/gpu-<card>-<date>/:
# log.txt (all output, written as it comes), tests-cuda.xml / tests-triton.xml (junit),
# bench.json (rewritten after every benchmark row), summary.txt.
# Time limits per step (seconds): BUILD_TIMEOUT 180, CUDA_TIMEOUT 120, TRITON_TIMEOUT 150,
# CAPTURE_TIMEOUT 60, BENCH_TIMEOUT 90; BENCH_ITERS 20. Exit status: non-zero if any step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
PY=${PYTHON:-python3}
export PIP_NO_INDEX=1 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
unset TRITON_INTERPRET  # the real Triton compiler on the GPU (the dry run's collection sets its own)

if [ $DRY = 1 ]; then
  card=dry-run
  cap=90
else
  if ! command -v nvidia-smi >/dev/null || ! $PY -c 'import torch, sys; sys.exit(not torch.cuda.is_available())'; then
    echo "gpu_check: no CUDA device visible to $PY (use --dry-run on a CPU)" >&2
    exit 1
  fi
  card=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
  cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d '. ')
fi
slug=$(echo "$card" | tr '[:upper:]' '[:lower:]' | tr -cs 'a-z0-9' '-' | sed 's/^-//; s/-$//')
R="${OUT:-bench/results}/gpu-$slug-$(date -u +%Y%m%d-%H%M)"
mkdir -p "$R"
exec > >(tee -a "$R/log.txt") 2>&1
START=$SECONDS
steps=()  # "name|status|seconds|detail", for the summary

section() { printf '\n==================== %s  [%ds] ====================\n' "$1" $((SECONDS - START)); }
record() { steps+=("$1|$2|$3|$4"); }
junit() {  # "passed P, failed F, errors E, skipped S" of a junit file
  $PY - "$1" <<'EOF'
import sys, xml.etree.ElementTree as ET
try:
    s = ET.parse(sys.argv[1]).getroot()
    s = s if s.tag == "testsuite" else s.find("testsuite")
    t, f, e, k = (int(s.get(x, 0)) for x in ("tests", "failures", "errors", "skipped"))
    print(f"passed {t - f - e - k}, failed {f}, errors {e}, skipped {k}")
except Exception as exc:
    print(f"no junit report ({type(exc).__name__})")
EOF
}
# run NAME TIMEOUT CMD...: a timed step whose status and time go to the summary.
run() {
  local name=$1 limit=$2 t0=$SECONDS rc=0
  shift 2
  section "$name (limit ${limit}s)"
  timeout "$limit" "$@" || rc=$?
  local status=ok
  [ $rc = 0 ] || status="FAILED (exit $rc$([ $rc = 124 ] && echo ': time limit'))"
  record "$name" "$status" $((SECONDS - t0)) ""
  return $rc
}

section "machine"
if [ $DRY = 1 ]; then
  echo "dry run on $(uname -m), $(nproc) cores: no build, no GPU"
else
  nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv
  command -v nvcc >/dev/null && nvcc --version | tail -1
fi
$PY -c 'import platform, torch
try:
    import triton; tv = triton.__version__
except ImportError:
    tv = "not installed"
print(f"python {platform.python_version()}  torch {torch.__version__} (CUDA {torch.version.cuda})  triton {tv}")'
git log -1 --format='commit %h %s' 2>/dev/null || true
XDIST=()
$PY -c 'import xdist' 2>/dev/null && XDIST=(-n 8)
TESTS=(tests/kernels tests/test_build.py)
PYTEST=($PY -P -m pytest -rfE --tb=short -p no:cacheprovider "${TESTS[@]}")

failed=0
if [ $DRY = 1 ]; then
  section "files and imports"
  for f in bench/kernel_bench.py bench/gpu_capture.py bench/triton_aot.py tests/kernels/kernel_helpers.py tests/test_build.py setup.py; do
    [ -f "$f" ] || { echo "missing: $f"; failed=1; }
  done
  for mod in torch pytest hypothesis scipy triton eagle2_kernels; do
    $PY -c "import $mod" 2>/dev/null && echo "import $mod: ok" || { echo "import $mod: FAILED"; failed=1; }
  done
  for mod in pybind11 cmake ninja xdist; do  # the GPU run builds in place (and spreads the tests)
    $PY -c "import $mod" 2>/dev/null && echo "import $mod: ok" || echo "import $mod: not here (the GPU machine has it)"
  done
  record "files and imports" "$([ $failed = 0 ] && echo ok || echo FAILED)" 0 ""
  for backend in cuda triton; do
    n=$(EAGLE2_COLLECT_CUDA=1 TRITON_INTERPRET=1 "${PYTEST[@]}" --collect-only -q -k "$backend" 2>/dev/null \
        | grep -c '::' || true)
    echo "tests selected by -k $backend: $n"
    [ "$n" -gt 0 ] || failed=1
    record "select -k $backend" "$([ "$n" -gt 0 ] && echo ok || echo 'FAILED (none)')" 0 "$n tests"
  done
  run "CUDA graph capture script (cpu, eager)" 120 $PY bench/gpu_capture.py --dry-run || failed=1
  run "benchmark script (cpu, --quick)" 300 $PY bench/kernel_bench.py --device cpu --quick --iters 1 --json "$R/bench.json" \
    || failed=1
else
  run build "${BUILD_TIMEOUT:-180}" env EAGLE2_CUDA_ARCHS="${EAGLE2_CUDA_ARCHS:-$cap}" MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
    $PY -m pip install --no-build-isolation --no-deps -e . || { failed=1; echo "gpu_check: build failed, stopping"; }
  if [ $failed = 0 ]; then
    $PY -c 'import eagle2_kernels; print("backends:", eagle2_kernels.backends())'
    run "tests: cuda" "${CUDA_TIMEOUT:-120}" "${PYTEST[@]}" "${XDIST[@]}" -k cuda --junitxml="$R/tests-cuda.xml" || failed=1
    steps[-1]+="$(junit "$R/tests-cuda.xml")"
    run "tests: triton" "${TRITON_TIMEOUT:-150}" "${PYTEST[@]}" "${XDIST[@]}" -k triton --junitxml="$R/tests-triton.xml" \
      || failed=1
    steps[-1]+="$(junit "$R/tests-triton.xml")"
    run "CUDA graph capture" "${CAPTURE_TIMEOUT:-60}" $PY bench/gpu_capture.py || failed=1
    run benchmarks "${BENCH_TIMEOUT:-90}" $PY bench/kernel_bench.py --device cuda --iters "${BENCH_ITERS:-20}" --json "$R/bench.json" \
      || failed=1
  fi
fi

section "summary"
{
  echo "gpu_check $([ $DRY = 1 ] && echo '--dry-run ')on $card, $((SECONDS - START)) s, results in $R"
  for s in "${steps[@]}"; do
    IFS='|' read -r name status secs detail <<<"$s"
    printf '  %-34s %-28s %4ss  %s\n' "$name" "$status" "$secs" "$detail"
  done
  [ -f "$R/bench.json" ] && $PY - "$R/bench.json" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
rows = [r for r in d["rows"] if r["impl"] != "reference"]
print(f"  benchmark rows: {len(d['rows'])}, problems: {len(d['problems'])}")
for r in sorted(rows, key=lambda r: -(r["speedup"] or 0))[:3] + sorted(rows, key=lambda r: r["speedup"] or 0)[:3]:
    print(f"    {r['op']:<16} {r['shape']:<30} {r['impl']:<8} {r['ms']:.4f} ms  x{r['speedup'] or 0:.2f} vs reference")
EOF
  echo "$([ $failed = 0 ] && echo 'ALL PASSED' || echo 'SOMETHING FAILED: see log.txt')"
} | tee "$R/summary.txt"
exit $failed
