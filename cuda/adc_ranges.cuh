// Op adc_ranges (cim-model.md §4, ADC `dynamic`): the range [lo, hi] of every read's partial sums
// over the whole batch, per cell slice, for the weight columns and the reference column — the
// second pass the dynamic ADC needs before any code can be decided. Min and max are exact and
// order-free, so the result equals the CPU reference (cimref::adc_ranges) however blocks meet.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/cim_ops.h"

namespace cimsweep::cuda {

// partials: `reads` consecutive blocks of [operand_rows][positions]. keys: scratch of
// reads·(slices + ref_rows)·2 values. ranges: [reads][slices] out.
void adc_ranges(const cimops::ReadParams& params, const float* partials, int reads, uint64_t* keys,
                cimops::SliceRange* ranges, cudaStream_t stream);

}  // namespace cimsweep::cuda
