#include "cuda/quantise_im2col.cuh"

#include <stdexcept>

#include "cuda/cuda_check.h"

namespace cimsweep::cuda {
namespace {

// One thread per (mapped row, position), grid-stride; consecutive threads take consecutive
// positions, so the writes of a warp are contiguous.
__global__ void quantise_im2col_kernel(const float* __restrict__ x, cimops::LayerGeometry g,
                                       const int* __restrict__ mapped_to_logical, float a_max,
                                       int input_bits, uint16_t* __restrict__ mapped) {
  const int64_t total = int64_t(g.rows) * g.positions;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int r = int(i / g.positions);
    const int64_t q = i % g.positions;
    mapped[i] = cimops::mapped_input_level(x, g, mapped_to_logical[r], q, a_max, input_bits);
  }
}

void launch_quantise_im2col(const float* x, const cimops::LayerGeometry& g,
                            const int* mapped_to_logical, float a_max, int input_bits,
                            uint16_t* mapped, cudaStream_t stream) {
  constexpr int kBlock = 256;
  quantise_im2col_kernel<<<grid_for(int64_t(g.rows) * g.positions, kBlock), kBlock, 0, stream>>>(
      x, g, mapped_to_logical, a_max, input_bits, mapped);
  CIM_CUDA_CHECK_LAUNCH();
}

}  // namespace

void quantise_im2col(const float* x, const cimops::LayerGeometry& g, const int* mapped_to_logical,
                     float a_max, int input_bits, uint16_t* mapped, cudaStream_t stream) {
  if (!x || !mapped_to_logical || !mapped)
    throw std::invalid_argument("quantise_im2col: null device pointer");
  if (g.rows < 1 || g.positions < 1 || g.out_h < 1 || g.out_w < 1)
    throw std::invalid_argument("quantise_im2col: empty layer geometry");
  if (g.rows != g.in_channels * g.kernel_h * g.kernel_w)
    throw std::invalid_argument("quantise_im2col: rows != in_channels·kernel_h·kernel_w");
  if (input_bits < 1 || input_bits > 16 || !(a_max > 0))
    throw std::invalid_argument("quantise_im2col: input bits outside 1..16 or a_max ≤ 0");
  launch_quantise_im2col(x, g, mapped_to_logical, a_max, input_bits, mapped, stream);
}

}  // namespace cimsweep::cuda
