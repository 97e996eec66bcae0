#include "cuda/half_operands.cuh"

#include <cuda_fp16.h>

#include <stdexcept>

#include "cuda/cuda_check.h"

namespace cimsweep::cuda {
namespace {

__global__ void bit_planes_half_kernel(const uint16_t* __restrict__ mapped, int64_t positions,
                                       int r0, int width, int first_bit, int bits,
                                       int64_t plane_stride, __half* __restrict__ planes) {
  const int64_t per_plane = int64_t(width) * positions, total = per_plane * bits;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int b = int(i / per_plane);
    const int64_t within = i % per_plane;  // k·positions + q
    const uint16_t level = mapped[int64_t(r0) * positions + within];
    planes[b * plane_stride + within] =
        ((level >> (first_bit + b)) & 1) ? __float2half_rn(1.0f) : __float2half_rn(0.0f);
  }
}

__global__ void floats_to_half_kernel(const float* __restrict__ in, int64_t count,
                                      __half* __restrict__ out) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < count;
       i += int64_t(gridDim.x) * blockDim.x)
    out[i] = __float2half_rn(in[i]);
}

}  // namespace

void bit_planes_half(const uint16_t* mapped, int64_t positions, int r0, int width, int first_bit,
                     int bits, int64_t plane_stride, uint16_t* planes, cudaStream_t stream) {
  if (!mapped || !planes) throw std::invalid_argument("bit_planes_half: null device pointer");
  if (positions < 1 || width < 1 || r0 < 0 || bits < 1 || first_bit < 0 || first_bit + bits > 16 ||
      plane_stride < int64_t(width) * positions)
    throw std::invalid_argument("bit_planes_half: bad shape or bits");
  constexpr int kBlock = 256;
  bit_planes_half_kernel<<<grid_for(int64_t(width) * positions * bits, kBlock), kBlock, 0,
                           stream>>>(mapped, positions, r0, width, first_bit, bits, plane_stride,
                                     reinterpret_cast<__half*>(planes));
  CIM_CUDA_CHECK_LAUNCH();
}

void floats_to_half(const float* in, int64_t count, uint16_t* out, cudaStream_t stream) {
  if (!in || !out || count < 0) throw std::invalid_argument("floats_to_half: bad arguments");
  if (count == 0) return;
  constexpr int kBlock = 256;
  floats_to_half_kernel<<<grid_for(count, kBlock), kBlock, 0, stream>>>(
      in, count, reinterpret_cast<__half*>(out));
  CIM_CUDA_CHECK_LAUNCH();
}

}  // namespace cimsweep::cuda
