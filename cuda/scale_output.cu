#include "cuda/scale_output.cuh"

#include <stdexcept>

#include "cuda/cim_ops.h"
#include "cuda/cuda_check.h"

namespace cimsweep::cuda {
namespace {

__global__ void scale_output_kernel(const double* __restrict__ codes,
                                    const double* __restrict__ common, int images, int outs,
                                    int64_t plane, double output_scale,
                                    const float* __restrict__ bias, float* __restrict__ y) {
  const int64_t total = int64_t(images) * outs * plane, positions = int64_t(images) * plane;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int o = int((i / plane) % outs);
    const int64_t acc_index = cimops::accumulator_index(i, outs, plane, positions);
    y[i] = cimops::output_value(output_scale,
                                cimops::layer_sum(codes, common, acc_index, positions), bias, o);
  }
}

void launch_scale_output(const double* codes, const double* common, int images, int outs,
                         int64_t plane, double output_scale, const float* bias, float* y,
                         cudaStream_t stream) {
  constexpr int kBlock = 256;
  scale_output_kernel<<<grid_for(int64_t(images) * outs * plane, kBlock), kBlock, 0, stream>>>(
      codes, common, images, outs, plane, output_scale, bias, y);
  CIM_CUDA_CHECK_LAUNCH();
}

}  // namespace

void scale_output(const double* codes, const double* common, int images, int outs, int64_t plane,
                  double output_scale, const float* bias, float* y, cudaStream_t stream) {
  if (!codes || !y) throw std::invalid_argument("scale_output: null device pointer");
  if (images < 1 || outs < 1 || plane < 1)
    throw std::invalid_argument("scale_output: empty output");
  launch_scale_output(codes, common, images, outs, plane, output_scale, bias, y, stream);
}

}  // namespace cimsweep::cuda
