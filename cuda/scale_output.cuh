// Op scale_output (cim-model.md §5): y[n][out][oh][ow] = float(output_scale·acc[o][q] + bias[o]),
// acc = codes[o][q] + common[q] (cimops::layer_sum), rounded as the CPU backend rounds it. CPU
// reference: cimops::output_value of cimops::layer_sum in a loop.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace cimsweep::cuda {

// codes: [outs][images·plane] double; common: [images·plane] double, or null for a digital layer
// (codes then hold its exact sums); bias: [outs] or null; y: [images][outs][plane].
void scale_output(const double* codes, const double* common, int images, int outs, int64_t plane,
                  double output_scale, const float* bias, float* y, cudaStream_t stream);

}  // namespace cimsweep::cuda
