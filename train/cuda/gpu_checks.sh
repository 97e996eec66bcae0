#!/usr/bin/env bash
# What a session with a GPU runs to check the CUDA training path: build, the op-by-op and
# whole-step comparisons with the CPU engine (none may skip), compute-sanitizer memcheck, the
# training-step benchmark and the PyTorch baseline on the same network.
# Usage: train/cuda/gpu_checks.sh [OUT_DIR] [DATA_DIR]
#   OUT_DIR  figures and logs (default /tmp/cimsweep-train-gpu)
#   DATA_DIR CIFAR-10 image folders or archives for the PyTorch baseline (default ../shared/data)
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${1:-/tmp/cimsweep-train-gpu}
data=${2:-../shared/data}
mkdir -p "$out"
nvidia-smi -L
jobs=$(nproc)

cmake -S . -B build-cuda -DCIMSWEEP_CUDA=ON -DCIMSWEEP_BENCH=OFF > "$out/cmake.log"
grep -q "CUDA training path ON" "$out/cmake.log" || { grep "training path" "$out/cmake.log"; exit 1; }
cmake --build build-cuda -j"$jobs" --target test_train_cuda bench_train_cuda > "$out/build.log"

# 1. Every op and a whole QAT training step against the CPU engine.
build-cuda/tests/test_train_cuda 2>&1 | tee "$out/test_train_cuda.log" \
  | grep -E "FAILED|PASSED|SKIPPED \]|Failure|Expected|Which is|element" | tail -60
if grep -q "SKIPPED \]" "$out/test_train_cuda.log"; then echo "GPU tests were skipped"; exit 1; fi
if grep -q "FAILED" "$out/test_train_cuda.log"; then echo "GPU tests failed"; exit 1; fi

# 2. Out-of-bounds accesses in the own kernels and the cuDNN/cuBLAS calls.
/usr/local/cuda/bin/compute-sanitizer --tool memcheck --error-exitcode 1 \
  build-cuda/tests/test_train_cuda \
  --gtest_filter='TrainCuda.ElementwiseOpsAreExact:TrainCuda.FakeQuantisersAreExact:TrainCuda.ComposedBlockGradientsMatchCpu' \
  > "$out/memcheck.log" 2>&1 && echo "memcheck clean" || { tail -40 "$out/memcheck.log"; exit 1; }

# 3. Speed: ResNet-20, batch 128, fp32/mixed × float/QAT (and a few CPU steps for the ratio).
build-cuda/train/cuda/bench_train_cuda --depth 20 --batch 128 --steps 200 --cpu-steps 3 \
  | tee "$out/bench_train_cuda.jsonl"

# 4. The PyTorch baseline on the same network, when torch is installed.
if python3 -c "import torch" 2>/dev/null; then
  for precision in fp32 mixed; do
    python3 tools/train_torch_baseline.py --data "$data" --epochs 1 --precision "$precision" \
      | tee -a "$out/torch_baseline.jsonl"
    python3 tools/train_torch_baseline.py --data "$data" --epochs 1 --precision "$precision" --qat \
      | tee -a "$out/torch_baseline.jsonl"
  done
else
  echo "torch not installed: PyTorch baseline skipped"
fi
