#!/usr/bin/env bash
# One pass on a machine with a CUDA GPU (and torch): build the kernels there,
# run the CUDA tests, run the kernels under compute-sanitizer, and benchmark
# them against torch. Logs and the benchmark's JSON go to $OUT.
#
#   OUT=/tmp/device bash bench/device_check.sh
set -u
OUT=${OUT:-/tmp/protoserve-device}
PY=${PYTHON:-python3}
BUILD=${BUILD:-/tmp/protoserve-build}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PATH="$PATH:/usr/local/cuda/bin"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
$PY -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__)'

echo "== build (sm_80, sm_90)"
t0=$(date +%s)
if ! { cmake -S csrc -B "$BUILD" -G Ninja -DPROTOSERVE_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="80;90" \
        -DPython_EXECUTABLE="$(command -v "$PY")" -Dpybind11_DIR="$($PY -m pybind11 --cmakedir)" \
     && cmake --build "$BUILD" -j "$(nproc)"; } >"$OUT/build.log" 2>&1; then
  tail -60 "$OUT/build.log"
  exit 1
fi
echo "built in $(( $(date +%s) - t0 )) s"
cp "$BUILD"/_kernels*.so "$BUILD"/cuda/_kernels_cuda*.so server/

echo "== CUDA tests"
$PY -m pytest -q -p no:cacheprovider -rfE --timeout 300 tests/test_kernels_cuda.py 2>&1 | tee "$OUT/tests.log" | tail -40
tests_rc=${PIPESTATUS[0]}

echo "== compute-sanitizer"
for tool in memcheck racecheck; do
  timeout 150 compute-sanitizer --tool $tool --error-exitcode 9 $PY bench/cuda_sanitize.py \
    >"$OUT/sanitize-$tool.log" 2>&1
  echo "$tool: rc $?"; tail -5 "$OUT/sanitize-$tool.log"
done

echo "== benchmark"
$PY bench/kernels_cuda.py --json "$OUT/bench_cuda.json" --profile 64x1000x512 2>&1 | tee "$OUT/bench.log"
exit "$tests_rc"
