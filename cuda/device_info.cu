#include <cuda_runtime.h>

#include <string>

#include "cuda/device_info.h"

namespace cimsweep {

std::string cuda_device_summary() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
    cudaGetLastError();  // clear the sticky "no driver" error
    return "";
  }
  cudaDeviceProp prop{};
  if (cudaGetDeviceProperties(&prop, 0) != cudaSuccess) return "";
  return std::string(prop.name) + " (sm_" + std::to_string(prop.major) +
         std::to_string(prop.minor) + (count > 1 ? ", " + std::to_string(count) + " GPUs" : "") +
         ")";
}

}  // namespace cimsweep
