#include <cuda_runtime.h>

#include <cstdio>
#include <stdexcept>
#include <string>

#include "cuda/device_info.h"

namespace cimsweep {
namespace {

// Compiled like every other kernel of the library: if the GPU can load it, it can load them all.
__global__ void probe_kernel() {}

}  // namespace

std::string CudaDeviceInfo::summary() const {
  char text[256];
  std::snprintf(text, sizeof text, "%s (sm_%d%d, %.1f GiB free)", name.c_str(), major, minor,
                double(free_bytes) / double(size_t(1) << 30));
  return text;
}

int cuda_device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" error
    return 0;
  }
  return count;
}

CudaDeviceInfo cuda_device_info(int ordinal) {
  CudaDeviceInfo info;
  info.ordinal = ordinal;
  cudaDeviceProp prop{};
  if (cudaGetDeviceProperties(&prop, ordinal) != cudaSuccess) {
    cudaGetLastError();
    throw std::runtime_error("cannot query GPU " + std::to_string(ordinal));
  }
  info.name = prop.name;
  info.major = prop.major;
  info.minor = prop.minor;
  int previous = 0;
  cudaGetDevice(&previous);
  if (cudaSetDevice(ordinal) == cudaSuccess) {
    if (cudaMemGetInfo(&info.free_bytes, &info.total_bytes) != cudaSuccess) cudaGetLastError();
    cudaFuncAttributes attributes{};
    info.has_kernels = cudaFuncGetAttributes(&attributes, probe_kernel) == cudaSuccess;
    cudaGetLastError();
    cudaSetDevice(previous);
  } else {
    cudaGetLastError();
  }
  return info;
}

std::string cuda_device_unusable_reason(int ordinal) {
  const int count = cuda_device_count();
  if (count == 0) return "no GPU found";
  if (ordinal < 0 || ordinal >= count)
    return "there is no GPU " + std::to_string(ordinal) + " (this machine has " +
           std::to_string(count) + ")";
  CudaDeviceInfo info;
  try {
    info = cuda_device_info(ordinal);
  } catch (const std::exception& e) {
    return e.what();
  }
  const std::string sm = std::to_string(info.major) + std::to_string(info.minor);
  if (info.major < kCudaMinMajor)
    return "GPU " + std::to_string(ordinal) + " (" + info.name + ") is sm_" + sm +
           "; the CUDA backend needs sm_70 or newer";
  if (!info.has_kernels)
    return "this build has no code for GPU " + std::to_string(ordinal) + " (sm_" + sm +
           "): rebuild with -DCIMSWEEP_CUDA_ARCHITECTURES=" + sm;
  if (info.free_bytes < kCudaMinFreeBytes)
    return "GPU " + std::to_string(ordinal) + " has only " + std::to_string(info.free_bytes >> 20) +
           " MiB free";
  return "";
}

std::string cuda_device_summary() {
  if (cuda_device_count() == 0) return "";
  cudaDeviceProp prop{};
  if (cudaGetDeviceProperties(&prop, 0) != cudaSuccess) {
    cudaGetLastError();
    return "";
  }
  int count = 0;
  cudaGetDeviceCount(&count);
  return std::string(prop.name) + " (sm_" + std::to_string(prop.major) +
         std::to_string(prop.minor) + (count > 1 ? ", " + std::to_string(count) + " GPUs" : "") +
         ")";
}

}  // namespace cimsweep
