// Op adc_accumulate (cim-model.md §4, §5): for every output (o, q), the reads of a group in order,
// each slice in order: acc += 2^(t + cb·m)·gain·(Q(P) − Q(Pref)) in double — the ADC and the
// shift-and-add recombination, in the CPU backend's order, so equal partial sums give equal
// accumulators bit for bit. With ADC ideal at σ = 0 the exact integer form, which also reports
// the largest partial sum (ADC calibration). CPU reference: cimops::accumulate_read in a loop.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/cim_ops.h"
#include "cuda/partial_sums.cuh"

namespace cimsweep::cuda {

struct AccumulateRead {
  int bit = 0;            // input bit t
  int subarray_rows = 0;  // rows of the read's sub-array (ADC `fixed` full scale)
};

// partials: `count` consecutive [operand_rows][positions] blocks; ranges: [count][slices] or
// null (not ADC dynamic); acc: [outs][positions] double, updated in place; largest_key: one
// order key (cimops::order_key) raised to the largest partial sum when ideal_clean, may be null.
void adc_accumulate(const cimops::ReadParams& params, const float* partials,
                    const AccumulateRead* reads, int count, const cimops::SliceRange* ranges,
                    double* acc, uint64_t* largest_key, cudaStream_t stream);

}  // namespace cimsweep::cuda
