// Ops of the fast mode, which hands the partial sums to cuBLAS tensor-core GEMMs (fp16 inputs,
// fp32 accumulation): bit_planes_half turns the input levels of one sub-array into fp16 bit
// planes (0 and 1 are exact), floats_to_half rounds programmed operands to fp16 (cell levels up
// to 2^11 are exact, so σ = 0 stays exact; varied conductances lose bits beyond fp16's 11).
// Values are passed as raw fp16 bits (uint16_t) so that no CUDA type leaks into host code.
// CPU reference: the bit extraction of cimops::partial_sum; round-to-nearest-even fp16.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace cimsweep::cuda {

// planes [bits][width][positions]: plane b holds bit (first_bit + b) of rows r0 … r0 + width − 1.
void bit_planes_half(const uint16_t* mapped, int64_t positions, int r0, int width, int first_bit,
                     int bits, int64_t plane_stride, uint16_t* planes, cudaStream_t stream);

void floats_to_half(const float* in, int64_t count, uint16_t* out, cudaStream_t stream);

}  // namespace cimsweep::cuda
