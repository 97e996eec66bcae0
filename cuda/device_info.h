// What GPUs the CUDA runtime sees, and whether one can run this build's kernels: for the backend
// choice (--backend auto) and the one-line backend notice. Built only with CUDA; plain C++.
#pragma once
#include <cstddef>
#include <string>

namespace cimsweep {

struct CudaDeviceInfo {
  int ordinal = 0;
  std::string name;
  int major = 0, minor = 0;  // compute capability
  size_t free_bytes = 0, total_bytes = 0;
  bool has_kernels = false;  // this binary holds code the GPU can run (its sm_XY or PTX for it)
  // "NVIDIA H100 80GB HBM3 (sm_90, 79.1 GiB free)"
  std::string summary() const;
};

// The oldest GPU the CUDA backend supports: Volta (tensor cores, 64-bit atomics on every path).
constexpr int kCudaMinMajor = 7;
// Below this much free memory a GPU is not chosen automatically.
constexpr size_t kCudaMinFreeBytes = size_t(1) << 30;

// Number of GPUs; 0 when there is no driver or no GPU (never throws).
int cuda_device_count();
// Properties of GPU `ordinal` (creates its context to read the free memory). Throws
// std::runtime_error when it cannot be queried.
CudaDeviceInfo cuda_device_info(int ordinal);
// Why GPU `ordinal` cannot run the CUDA backend ("" when it can): missing, too old, no code for
// it in this build, too little free memory.
std::string cuda_device_unusable_reason(int ordinal);

// "NVIDIA H100 (sm_90)" for device 0, or "" when there is no usable GPU or driver.
std::string cuda_device_summary();

}  // namespace cimsweep
