#!/usr/bin/env bash
# Installs everything cimsweep needs to build, test and run its default job, from Debian's
# packages. Safe to run again. The CUDA toolkit (optional) is not installed here: the build uses
# it when /usr/local/cuda/bin/nvcc exists.
set -euo pipefail

packages=(
  build-essential cmake pkg-config git
  libcli11-dev nlohmann-json3-dev libtomlplusplus-dev   # command line, JSON, sweep files
  libstb-dev zlib1g-dev                                  # images, IDX.gz
  librandom123-dev                                       # Philox noise streams
  libopenblas-dev                                        # GEMMs of the CPU backend (+ OpenMP via gcc)
  libdnnl-dev                                            # oneDNN: the training engine's convolutions
  ocl-icd-opencl-dev                                     # Debian's oneDNN CMake config requires OpenCL
  libgtest-dev libgmock-dev                              # tests
  dataset-fashion-mnist                                  # the default data set
)
# Optional: --with-slurm adds a Slurm controller, node daemon and munge, which the integration
# test tests/slurm/run_slurm_test.sh starts as a one-node cluster (it is skipped without them).
# --with-python adds Debian's PyTorch, numpy and matplotlib for /usr/bin/python3: the tools/ scripts
# (training the model zoo, golden values) and the tests that check them against cimsweep.
# --with-fuzz adds clang with its sanitizer/libFuzzer runtimes and OpenMP (presets asan, fuzz; CI).
for arg in "$@"; do
  case "$arg" in
    --with-slurm) packages+=(slurm-wlm munge) ;;
    --with-fuzz) packages+=(clang libclang-rt-dev libomp-dev) ;;
    --with-python) packages+=(python3-torch python3-numpy python3-matplotlib) ;;
    *) echo "install-deps: unknown option '$arg' (known: --with-slurm, --with-fuzz, --with-python)" >&2
       exit 2 ;;
  esac
done

sudo=""
if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -eq 0 ]; then
  echo "install-deps: all ${#packages[@]} packages already installed"
  exit 0
fi
echo "install-deps: installing ${missing[*]}"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
