// Op partial_sums, exact mode (cim-model.md §4, "Summation order"): for each read (sub-array,
// input bit) of a group, P[row][q] = Σ_k operand[row][k]·b_t[r0 + k][q] in fp32, in the order of
// the CPU backend's table look-up reads — groups of 4 rows, each in ascending row order, then the
// groups in ascending order (cimops::partial_sum, cim::lookup_order_sum) — so that P equals its
// CPU reference, and the CPU backend's look-up read, bit for bit whatever the tiling. A tiled SIMT
// kernel rather than cuBLAS: cuBLAS does not promise a summation order, and a different order
// moves partial sums across ADC code boundaries. CPU reference: cimref::partial_sums.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace cimsweep::cuda {

struct PartialSumJob {
  const float* operand = nullptr;  // [operand_rows][width]
  int r0 = 0, width = 0, bit = 0;  // the sub-array's first mapped row and size; the input bit
  float* partials = nullptr;       // P [operand_rows][positions]
};

// Reads per launch (they travel as a kernel parameter).
constexpr int kMaxReadsPerLaunch = 64;

void partial_sums(const PartialSumJob* jobs, int count, int operand_rows, const uint16_t* mapped,
                  int rows, int64_t positions, cudaStream_t stream);

}  // namespace cimsweep::cuda
