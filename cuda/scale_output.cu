#include "cuda/scale_output.cuh"

#include <stdexcept>

#include "cuda/cim_ops.h"
#include "cuda/cuda_check.h"

namespace cimsweep::cuda {
namespace {

__global__ void scale_output_kernel(const double* __restrict__ acc, int images, int outs,
                                    int64_t plane, double output_scale,
                                    const float* __restrict__ bias, float* __restrict__ y) {
  const int64_t total = int64_t(images) * outs * plane, positions = int64_t(images) * plane;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int o = int((i / plane) % outs);
    y[i] = cimops::output_value(output_scale,
                                acc[cimops::accumulator_index(i, outs, plane, positions)], bias, o);
  }
}

void launch_scale_output(const double* acc, int images, int outs, int64_t plane,
                         double output_scale, const float* bias, float* y, cudaStream_t stream) {
  constexpr int kBlock = 256;
  scale_output_kernel<<<grid_for(int64_t(images) * outs * plane, kBlock), kBlock, 0, stream>>>(
      acc, images, outs, plane, output_scale, bias, y);
  CIM_CUDA_CHECK_LAUNCH();
}

}  // namespace

void scale_output(const double* acc, int images, int outs, int64_t plane, double output_scale,
                  const float* bias, float* y, cudaStream_t stream) {
  if (!acc || !y) throw std::invalid_argument("scale_output: null device pointer");
  if (images < 1 || outs < 1 || plane < 1)
    throw std::invalid_argument("scale_output: empty output");
  launch_scale_output(acc, images, outs, plane, output_scale, bias, y, stream);
}

}  // namespace cimsweep::cuda
