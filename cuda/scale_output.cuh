// Op scale_output (cim-model.md §5): y[n][out][oh][ow] = float(output_scale·acc[o][q] + bias[o]),
// rounded as the CPU backend rounds it. CPU reference: cimops::output_value in a loop.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace cimsweep::cuda {

// acc: [outs][images·plane] double; bias: [outs] or null; y: [images][outs][plane].
void scale_output(const double* acc, int images, int outs, int64_t plane, double output_scale,
                  const float* bias, float* y, cudaStream_t stream);

}  // namespace cimsweep::cuda
