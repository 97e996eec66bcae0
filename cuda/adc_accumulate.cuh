// Op adc_accumulate (cim-model.md §4, §5, "Summation order"): the ADC and the shift-and-add
// recombination of a group of reads, split as the CPU backend splits it. Each ADC is affine in its
// code, Q(P) = a + b·k; with w = 2^(t + cb·m)·gain, for every output (o, q) the codes' part
// codes += (w·b)·k (cim::add_code), and for every position q the common part
// common += w·(a − Q(Pref)) (cim::add_common), each over the group's reads in order and each read's
// slices from 0, in double. The layer's sum is codes + common (cimops::layer_sum), so equal partial
// sums give the CPU backend's sums bit for bit. With ADC ideal at σ = 0 the exact integer form
// into the codes' part (common stays 0), which also reports the largest partial sum (ADC
// calibration). CPU reference: cimops::accumulate_codes and accumulate_common in loops.
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
// null (not ADC dynamic); codes: [outs][positions] and common: [positions] double, updated in
// place (zero before a layer's first read); largest_key: one order key (cimops::order_key) raised
// to the largest partial sum when ideal_clean, may be null.
void adc_accumulate(const cimops::ReadParams& params, const float* partials,
                    const AccumulateRead* reads, int count, const cimops::SliceRange* ranges,
                    double* codes, double* common, uint64_t* largest_key, cudaStream_t stream);

}  // namespace cimsweep::cuda
