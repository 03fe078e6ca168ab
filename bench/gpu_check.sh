#!/usr/bin/env bash
# Everything that needs a GPU, in one run on a CUDA machine with no network (about 5-8 minutes):
# build in place, the whole test suite with CUDA visible (the tests add the 'cuda' and 'triton'
# backends when they are available), then the kernel benchmarks.
#
#   bash bench/gpu_check.sh
# python3 must hold torch and the build/test tools (setuptools, pybind11, cmake, ninja, pytest,
# hypothesis, scipy); nothing is downloaded.
# Env: PYTHON (default python3), RESULTS_DIR (default bench/results), EAGLE2_CUDA_ARCHS (default:
# the card's own), MAX_JOBS (default: all cores), TEST_TIMEOUT / BENCH_TIMEOUT in seconds
# (default 300 / 180).
# Writes RESULTS_DIR/gpu-<card>-<date>.txt (this output) and .json (benchmark rows).
# Exit status: non-zero if the build or any test failed; once built, the benchmarks run regardless.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
RESULTS_DIR=${RESULTS_DIR:-bench/results}
mkdir -p "$RESULTS_DIR"

if ! command -v nvidia-smi >/dev/null || ! $PY -c 'import torch, sys; sys.exit(not torch.cuda.is_available())'; then
  echo "gpu_check: no CUDA device visible to $PY (nvidia-smi: $(command -v nvidia-smi || echo missing))" >&2
  exit 1
fi
card=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
slug=$(echo "$card" | tr '[:upper:]' '[:lower:]' | tr -cs 'a-z0-9' '-' | sed 's/^-//; s/-$//')
stem="$RESULTS_DIR/gpu-$slug-$(date -u +%Y%m%d-%H%M)"
unset TRITON_INTERPRET  # real Triton kernels on the GPU, not the CPU interpreter

section() { printf '\n==================== %s ====================\n' "$1"; }

check() {
  local status=0 rc
  section "machine"
  nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv
  command -v nvcc >/dev/null && nvcc --version | tail -1
  $PY -c 'import platform, torch
try:
    import triton
    tv = triton.__version__
except ImportError:
    tv = "not installed"
print(f"python {platform.python_version()}  torch {torch.__version__} (CUDA {torch.version.cuda})  triton {tv}")'

  section "build (pip install --no-build-isolation --no-deps -e .)"
  local cap
  cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d '. ')
  if ! EAGLE2_CUDA_ARCHS=${EAGLE2_CUDA_ARCHS:-$cap} MAX_JOBS=${MAX_JOBS:-$(nproc)} \
      $PY -m pip install --no-build-isolation --no-deps --no-index -e .; then
    echo "gpu_check: build failed"
    return 1
  fi
  $PY -c 'import re
from importlib.metadata import PackageNotFoundError, requires, version
missing = []
for req in requires("eagle2-kernels"):
    if "extra ==" not in req:
        try:
            version(re.split(r"[ <>=!~;\[]", req, maxsplit=1)[0])
        except PackageNotFoundError:
            missing.append(req)
print("runtime dependencies missing here:", ", ".join(missing) or "none")
import eagle2_kernels
print("backends:", eagle2_kernels.backends())'

  section "tests"
  timeout "${TEST_TIMEOUT:-300}" $PY -m pytest -q -rs --durations=15 -p no:cacheprovider tests || status=$?
  echo "tests exit status: $status"

  section "benchmarks"
  timeout "${BENCH_TIMEOUT:-180}" $PY bench/kernels.py --device cuda --json "$stem.json" || {
    rc=$?
    echo "benchmarks exit status: $rc"
    [ "$status" -ne 0 ] || status=$rc
  }

  section "done"
  echo "results: $stem.txt $stem.json"
  return "$status"
}

check 2>&1 | tee "$stem.txt"
exit "${PIPESTATUS[0]}"
