#!/usr/bin/env bash
# What a session with a GPU runs to check the CUDA backend: build, the backend tests (none may
# skip), compute-sanitizer on a few cases, the benchmark and the PyTorch baseline.
# Usage: cuda/gpu_checks.sh [OUT_DIR]   (figures and logs go to OUT_DIR, default /tmp/cimsweep-gpu)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-/tmp/cimsweep-gpu}
mkdir -p "$out"
nvidia-smi -L
jobs=$(nproc)

cmake -S . -B build-cuda -DCIMSWEEP_CUDA=ON -DCIMSWEEP_BENCH=ON > "$out/cmake.log"
cmake --build build-cuda -j"$jobs" --target cimsweep test_backends test_cim_layer bench_cim_cuda \
  > "$out/build.log"

# 1. Backend tests: GPU vs its CPU reference bit for bit, vs the CPU backend, guards, NaN, zeros.
build-cuda/tests/test_backends 2>&1 | tee "$out/test_backends.log" | grep -E "FAILED|PASSED|SKIPPED \]" | tail -40
if grep -q "SKIPPED \]" "$out/test_backends.log"; then echo "GPU tests were skipped"; exit 1; fi

# 2. Out-of-bounds and race checks on a few shapes (slow: one shape, every mode).
sanitizer=/usr/local/cuda/bin/compute-sanitizer
"$sanitizer" --tool memcheck --error-exitcode 1 build-cuda/tests/test_backends \
  --gtest_filter='Layers/CudaVsCpu.*/c33_k3_s2_R20_n1_*:Cuda.ProgramsTheCpuBackendsChipBitForBit' \
  > "$out/memcheck.log" 2>&1 && echo "memcheck clean" || { tail -40 "$out/memcheck.log"; exit 1; }
"$sanitizer" --tool racecheck --error-exitcode 1 build-cuda/tests/test_backends \
  --gtest_filter='Layers/CudaVsCpu.*/rgb_k3_n7_dynamic_device' \
  > "$out/racecheck.log" 2>&1 && echo "racecheck clean" || { tail -40 "$out/racecheck.log"; exit 1; }

# 3. Speed: ResNet-20/56/110, exact and fast, against the fp16 tensor-core rate and the CPU.
build-cuda/bench/bench_cim_cuda --depth 20 56 110 --images 2000 --cpu-images 50 \
  --json "$out/bench_cim_cuda.json" | tee "$out/bench_cim_cuda.log"

# 4. The PyTorch baseline, when torch is installed.
build-cuda/bench/bench_cim_cuda --dump-layer "$out/layer_dump.json"
if python3 -c "import torch" 2>/dev/null; then
  python3 tools/cim_torch_baseline.py --check "$out/layer_dump.json" --bench --depth 20 56 110 \
    | tee "$out/torch_baseline.log"
else
  echo "torch not installed: PyTorch baseline skipped"
fi
