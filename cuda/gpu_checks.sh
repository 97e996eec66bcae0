#!/usr/bin/env bash
# What a session with a GPU runs to check the CUDA backend: the backend and training-path tests
# (none may skip), compute-sanitizer on a few cases, the main job and a CIFAR-10 chip on the GPU
# against the CPU backend, the benchmark and the PyTorch baseline. Every stage runs under its own
# time limit and a failed stage does not stop the next; the summary table comes last.
# Usage: cuda/gpu_checks.sh [--prebuilt BUNDLE.tar.xz] [OUT_DIR]
#   without --prebuilt it builds build-cuda here (needs tools/install-deps.sh's libraries);
#   with it, it runs the binaries cuda/gpu_bundle.sh packed on another machine.
# Figures and logs go to OUT_DIR (default /tmp/cimsweep-gpu), also packed as OUT_DIR/gpu-logs.tar.gz.
set -uo pipefail
cd "$(dirname "$0")/.."
bundle=""
if [ "${1:-}" = "--prebuilt" ]; then bundle="${2:?--prebuilt needs a bundle}"; shift 2; fi
out=${1:-/tmp/cimsweep-gpu}
mkdir -p "$out"
logs="$out/logs"
mkdir -p "$logs"
summary="$out/summary.txt"
: > "$summary"
nvidia-smi -L | tee "$logs/nvidia-smi.txt"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.total --format=csv >> "$logs/nvidia-smi.txt"
echo "commit $(git rev-parse HEAD 2>/dev/null || echo unknown)" | tee -a "$summary"

if [ -n "$bundle" ]; then
  root=$(mktemp -d)
  tar xJf "$bundle" -C "$root"
  bin="$root/bin"
  fmnist="$root/data/fashion-mnist"
  cifar="$root/data/cifar10-jpeg"
  # CUDA's libraries from this machine's toolkit or its Python wheels, our others from the bundle.
  cuda_dirs=$(find /usr/local/cuda*/lib* /usr/lib/x86_64-linux-gnu /opt /usr/local/lib \
                \( -name 'libcublas.so.1*' -o -name 'libcudnn.so.9*' \) 2>/dev/null |
              xargs -r -n1 dirname | sort -u | tr '\n' ':')
  export LD_LIBRARY_PATH="$root/lib:${cuda_dirs}${LD_LIBRARY_PATH:-}"
  echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH" >> "$logs/nvidia-smi.txt"
  ldd "$bin/test_backends" "$bin/test_train_cuda" > "$logs/ldd.txt" 2>&1
  grep "not found" "$logs/ldd.txt" && echo "missing libraries: see ldd.txt" | tee -a "$summary"
else
  jobs=$(nproc)
  cmake -S . -B build-cuda -DCIMSWEEP_CUDA=ON -DCIMSWEEP_BENCH=ON > "$logs/cmake.log" || exit 1
  cmake --build build-cuda -j"$jobs" --target cimsweep test_backends test_train_cuda bench_cim_cuda bench_train_cuda \
    > "$logs/build.log" || { tail -40 "$logs/build.log"; exit 1; }
  bin=""
  fmnist=/usr/share/datasets/fashion-mnist
  cifar=""
fi
exe() {  # a binary of the bundle, or of build-cuda
  if [ -n "$bundle" ]; then echo "$bin/$(basename "$1")"; else echo "build-cuda/$1"; fi
}

# stage NAME SECONDS COMMAND...: runs it with a limit, logs to NAME.log, records pass/fail/time.
stage() {
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  timeout --kill-after=5 "$limit" "$@" > "$logs/$name.log" 2>&1
  local rc=$?
  local verdict=pass
  [ "$rc" -eq 0 ] || verdict="FAIL rc=$rc"
  [ "$rc" -eq 124 ] && verdict="TIMEOUT ${limit}s"
  printf '%-22s %-14s %4ds\n' "$name" "$verdict" $((SECONDS - start)) | tee -a "$summary"
  tar czf "$out/gpu-logs.tar.gz" -C "$out" logs summary.txt 2>/dev/null
  return "$rc"
}

# 1. Backend tests: GPU vs its CPU reference bit for bit, vs the CPU backend, guards, NaN, zeros.
stage test_backends 150 "$(exe tests/test_backends)" --gtest_brief=1
grep -E "^\[  (PASSED|FAILED|SKIPPED) " "$logs/test_backends.log" | tee -a "$summary"
grep -q "SKIPPED \]" "$logs/test_backends.log" && echo "test_backends: GPU tests were skipped" | tee -a "$summary"
# 2. The CUDA training path against the CPU trainer.
stage test_train_cuda 90 "$(exe tests/test_train_cuda)" --gtest_brief=1
grep -E "^\[  (PASSED|FAILED|SKIPPED) " "$logs/test_train_cuda.log" | tee -a "$summary"
# 2b. The whole-network step over 20 seeds: QAT gradients of that small network are chaotic (the
#     test allows each tensor the CPU's own spread), so one seed proves little.
stage train_seeds 90 bash -c 'rc=0; for s in $(seq 10 29); do
  CIMSWEEP_TEST_SEED=$s "$0" --gtest_filter=TrainCuda.WholeNetworkStepMatchesCpu > /dev/null 2>&1 ||
    { echo "seed $s failed"; rc=1; }; done; exit $rc' "$(exe tests/test_train_cuda)"
cat "$logs/train_seeds.log" >> "$summary"

# 3. The README's main job on the GPU: it must print the README's table (the CPU backend's).
stage main_job_cuda 60 "$(exe cimsweep)" sweep --spec sweeps/fmnist-quick.toml --data "$fmnist" \
  --backend cuda --quiet
grep "^|" "$logs/main_job_cuda.log" > "$logs/main_job_cuda.table"
awk '/^\$ build\/cimsweep sweep --spec sweeps\/fmnist-quick.toml$/ {on=1; next}
     on && /^\|/ {print} on && /^```/ {exit}' README.md > "$logs/main_job_readme.table"
if [ -s "$logs/main_job_cuda.table" ] && cmp -s "$logs/main_job_cuda.table" "$logs/main_job_readme.table"; then
  echo "main job on the GPU: the README's table, identical" | tee -a "$summary"
else
  echo "main job on the GPU differs from the README's table:" | tee -a "$summary"
  diff "$logs/main_job_readme.table" "$logs/main_job_cuda.table" | tee -a "$summary"
fi

# 4. CIFAR-10 ResNet-20 (shipped model, JPEG test set): 500 images, 3 chips at σ = 0.1 on both
#    backends (same table expected), then 10 chips over all 10,000 images on the GPU (chips/hour).
if [ -n "$cifar" ] && [ -d "$cifar/test" ]; then
  for backend in cpu cuda; do
    stage "cifar_500_$backend" 60 "$(exe cimsweep)" eval models/cifar10-resnet20.safetensors \
      --data "$cifar" --limit 500 --sigma 0.1 --trials 3 --backend "$backend" --quiet
    grep "^|" "$logs/cifar_500_$backend.log" > "$logs/cifar_500_$backend.table"
  done
  if [ -s "$logs/cifar_500_cuda.table" ] && cmp -s "$logs/cifar_500_cpu.table" "$logs/cifar_500_cuda.table"; then
    echo "CIFAR-10 R20, 500 images, 3 chips, σ = 0.1: CPU and GPU tables identical" | tee -a "$summary"
  else
    echo "CIFAR-10 R20 500-image tables differ (CPU < > GPU):" | tee -a "$summary"
    diff "$logs/cifar_500_cpu.table" "$logs/cifar_500_cuda.table" | tee -a "$summary"
  fi
  # 3 chips + the clean pass: 38 s on an H200 (2026-12-04); 10 chips did not fit 90 s.
  stage cifar_10k_cuda 90 "$(exe cimsweep)" eval models/cifar10-resnet20.safetensors \
    --data "$cifar" --sigma 0.1 --trials 3 --backend cuda --quiet
  grep "^|" "$logs/cifar_10k_cuda.log" | tee -a "$summary"
fi

# 5. Speed: ResNet-20/56/110, exact and fast, against the fp16 tensor-core rate (157 s on an
#    H200; the CPU comparison is stage 4's, so --cpu-images 0). Line-buffered: a run cut off at
#    its limit keeps the networks it finished.
stage bench_cim_cuda 200 stdbuf -oL "$(exe bench/bench_cim_cuda)" --depth 20 56 110 \
  --images 2000 --cpu-images 0 --json "$out/bench_cim_cuda.json"
tail -40 "$logs/bench_cim_cuda.log"

# 6. Training speed: ResNet-20, batch 128, fp32/mixed x float/QAT (a few CPU steps for the ratio).
stage bench_train_cuda 60 "$(exe train/cuda/bench_train_cuda)" --depth 20 --batch 128 --steps 200 \
  --cpu-steps 3
cp "$logs/bench_train_cuda.log" "$out/bench_train_cuda.jsonl"

# 7. Out-of-bounds and race checks on a few shapes (slow: one shape, every mode).
sanitizer=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
stage memcheck 75 "$sanitizer" --tool memcheck --error-exitcode 1 "$(exe tests/test_backends)" \
  --gtest_filter='Layers/CudaVsCpu.*/c33_k3_s2_R20_n1_*:Cuda.ProgramsTheCpuBackendsChipBitForBit'
stage racecheck 50 "$sanitizer" --tool racecheck --error-exitcode 1 "$(exe tests/test_backends)" \
  --gtest_filter='Layers/CudaVsCpu.*/rgb_k3_n7_dynamic_device'

stage memcheck_train 60 "$sanitizer" --tool memcheck --error-exitcode 1 "$(exe tests/test_train_cuda)" \
  --gtest_filter='TrainCuda.ElementwiseOpsAreExact:TrainCuda.FakeQuantisersAreExact:TrainCuda.ComposedBlockGradientsMatchCpu'

# 8. The PyTorch baseline, when torch is installed.
"$(exe bench/bench_cim_cuda)" --dump-layer "$logs/layer_dump.json" > /dev/null 2>&1
if python3 -c "import torch" 2>/dev/null; then
  stage torch_baseline 60 python3 tools/cim_torch_baseline.py --check "$logs/layer_dump.json" \
    --bench --depth 20 56 110
  tail -20 "$logs/torch_baseline.log"
else
  echo "torch not installed: PyTorch baseline skipped" | tee -a "$summary"
fi
echo "=== summary"
cat "$summary"
