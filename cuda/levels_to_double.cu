#include "cuda/levels_to_double.cuh"

#include <stdexcept>

#include "cuda/cuda_check.h"

namespace cimsweep::cuda {
namespace {

__global__ void levels_to_double_kernel(const uint16_t* __restrict__ mapped, int rows,
                                        int64_t positions, int64_t q0, int64_t cols,
                                        double* __restrict__ out) {
  const int64_t total = int64_t(rows) * cols;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / cols, c = i % cols;
    out[i] = double(mapped[r * positions + q0 + c]);
  }
}

void launch_levels_to_double(const uint16_t* mapped, int rows, int64_t positions, int64_t q0,
                             int64_t cols, double* out, cudaStream_t stream) {
  constexpr int kBlock = 256;
  levels_to_double_kernel<<<grid_for(int64_t(rows) * cols, kBlock), kBlock, 0, stream>>>(
      mapped, rows, positions, q0, cols, out);
  CIM_CUDA_CHECK_LAUNCH();
}

}  // namespace

void levels_to_double(const uint16_t* mapped, int rows, int64_t positions, int64_t q0, int64_t cols,
                      double* out, cudaStream_t stream) {
  if (!mapped || !out) throw std::invalid_argument("levels_to_double: null device pointer");
  if (rows < 1 || cols < 1 || q0 < 0 || q0 + cols > positions)
    throw std::invalid_argument("levels_to_double: columns outside the input");
  launch_levels_to_double(mapped, rows, positions, q0, cols, out, stream);
}

}  // namespace cimsweep::cuda
