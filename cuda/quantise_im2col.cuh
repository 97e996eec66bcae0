// Op quantise_im2col (cim-model.md §3): the layer input x [n][in][h][w] (float) becomes the integer
// input levels A in mapped row order, [rows][positions] uint16 — the operand every read takes its
// bit plane from. CPU reference: cimref::quantise_im2col.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/cim_ops.h"

namespace cimsweep::cuda {

void quantise_im2col(const float* x, const cimops::LayerGeometry& geometry,
                     const int* mapped_to_logical, float a_max, int input_bits, uint16_t* mapped,
                     cudaStream_t stream);

}  // namespace cimsweep::cuda
