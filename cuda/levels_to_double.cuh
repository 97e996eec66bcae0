// Op levels_to_double: columns [q0, q0 + cols) of the integer input levels [rows][positions] as a
// double matrix [rows][cols] — the B operand of the digital layer's cublasDgemm (exact: the
// products and sums are integers far below 2^53, so any summation order gives the same value).
// CPU reference: CpuCimBackend::run_digital.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace cimsweep::cuda {

void levels_to_double(const uint16_t* mapped, int rows, int64_t positions, int64_t q0, int64_t cols,
                      double* out, cudaStream_t stream);

}  // namespace cimsweep::cuda
