// Op program_subarray (cim-model.md §1, §2): one sub-array's GEMM operand
// [slices·outs + ref_rows][width] — cell levels at σ = 0, else varied conductances with the
// Philox noise of (seed, trial, layer, cell, read), bit-identical to the CPU backend's. Mode
// `device` programs every sub-array once per trial (read 0); mode `cycle` once per read.
// CPU reference: cimref::program_subarray (and CpuCimBackend::programmed_subarray).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/cim_ops.h"

namespace cimsweep::cuda {

// `chip.levels` and `chip.mapped_to_logical` are device pointers; `operand` holds
// (slices·outs + ref_rows)·width floats.
void program_subarray(const cimops::ChipParams& chip, int r0, int width, uint32_t read,
                      float* operand, cudaStream_t stream);

}  // namespace cimsweep::cuda
