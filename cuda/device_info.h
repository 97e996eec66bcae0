// What GPU the CUDA runtime sees, for the one-line backend notice. Built only with CUDA.
#pragma once
#include <string>

namespace cimsweep {
// "NVIDIA H100 (sm_90)" for device 0, or "" when there is no usable GPU or driver.
std::string cuda_device_summary();
}  // namespace cimsweep
