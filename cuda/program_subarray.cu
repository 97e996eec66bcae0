#include "cuda/program_subarray.cuh"

#include <stdexcept>

#include "cuda/cuda_check.h"

namespace cimsweep::cuda {
namespace {

// One thread per (output o or the reference, sub-array column k); k is the fast index so that a
// warp writes consecutive operand entries.
__global__ void program_subarray_kernel(cimops::ChipParams chip, int r0, int width, uint32_t read,
                                        float* __restrict__ operand) {
  const int64_t total = int64_t(chip.outs + 1) * width;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int o = int(i / width), k = int(i % width);
    cimops::program_operand_column(chip, r0, width, k, o, read, operand);
  }
}

void launch_program_subarray(const cimops::ChipParams& chip, int r0, int width, uint32_t read,
                             float* operand, cudaStream_t stream) {
  constexpr int kBlock = 128;  // the normal transform is long double-precision code
  program_subarray_kernel<<<grid_for(int64_t(chip.outs + 1) * width, kBlock), kBlock, 0, stream>>>(
      chip, r0, width, read, operand);
  CIM_CUDA_CHECK_LAUNCH();
}

}  // namespace

void program_subarray(const cimops::ChipParams& chip, int r0, int width, uint32_t read,
                      float* operand, cudaStream_t stream) {
  if (!chip.levels || !chip.mapped_to_logical || !operand)
    throw std::invalid_argument("program_subarray: null device pointer");
  if (width < 1 || r0 < 0 || r0 + width > chip.rows)
    throw std::invalid_argument("program_subarray: sub-array rows outside the layer");
  if (chip.chip.slices < 1 || chip.outs < 1)
    throw std::invalid_argument("program_subarray: bad slices, outputs or reference rows");
  launch_program_subarray(chip, r0, width, read, operand, stream);
}

}  // namespace cimsweep::cuda
