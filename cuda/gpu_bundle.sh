#!/usr/bin/env bash
# Packs a CUDA build made on this machine for a GPU machine that has the CUDA runtime (cuBLAS,
# cuDNN) but none of our Debian libraries: the binaries that cuda/gpu_checks.sh runs, the non-CUDA
# shared libraries they load (OpenBLAS, oneDNN, ...), Fashion-MNIST's test set and, if given, the
# CIFAR-10 test set. cuda/gpu_checks.sh --prebuilt BUNDLE unpacks and runs it.
# Usage: cuda/gpu_bundle.sh BUILD_DIR BUNDLE.tar.xz [CIFAR10_TEST_TAR_GZ]
#   e.g. cmake -S . -B build-cuda -DCIMSWEEP_CUDA=ON -DCIMSWEEP_BENCH=ON
#        cmake --build build-cuda -j2 --target cimsweep test_backends test_train_cuda bench_cim_cuda \
#          bench_train_cuda
#        cuda/gpu_bundle.sh build-cuda .gpu/bundle.tar.xz ../shared/data/cifar10-test-jpeg.tar.gz
set -euo pipefail
build="${1:?usage: cuda/gpu_bundle.sh BUILD_DIR BUNDLE.tar.xz [CIFAR10_TEST_TAR_GZ]}"
bundle="${2:?usage: cuda/gpu_bundle.sh BUILD_DIR BUNDLE.tar.xz [CIFAR10_TEST_TAR_GZ]}"
cifar="${3:-}"
binaries=(cimsweep tests/test_backends tests/test_train_cuda bench/bench_cim_cuda train/cuda/bench_train_cuda)
for b in "${binaries[@]}"; do
  [ -x "$build/$b" ] || { echo "gpu_bundle: $build/$b is not built (see the usage above)" >&2; exit 2; }
done
if [ -e "$bundle" ]; then echo "gpu_bundle: $bundle exists; remove it first" >&2; exit 2; fi
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/bin" "$stage/lib" "$stage/data/fashion-mnist"
for b in "${binaries[@]}"; do cp "$build/$b" "$stage/bin/"; done
# Every shared library the binaries load except the C runtime (the GPU machine has a newer one)
# and CUDA's own (the GPU machine's toolkit and driver provide those, matched to its driver).
for b in "${binaries[@]}"; do ldd "$build/$b"; done | awk '$2 == "=>" && $3 ~ /^\// {print $3}' |
  sort -u | grep -Ev '/(libc|libm|libdl|libpthread|librt|ld-linux[^/]*|libstdc\+\+|libgcc_s)\.so' |
  grep -Ev '/lib(cuda|cudart|cublas|cublasLt|cudnn[^/]*|nvrtc|nvJitLink)\.so' |
  while read -r lib; do cp -L "$lib" "$stage/lib/"; done
cp /usr/share/datasets/fashion-mnist/t10k-*-idx?-ubyte.gz "$stage/data/fashion-mnist/"
if [ -n "$cifar" ]; then mkdir -p "$stage/data/cifar10-jpeg" && tar xzf "$cifar" -C "$stage/data/cifar10-jpeg"; fi
mkdir -p "$(dirname "$bundle")"
tar cJf "$bundle" -C "$stage" .
ls -la "$bundle"
echo "gpu_bundle: $(ls "$stage/lib" | tr '\n' ' ')"
