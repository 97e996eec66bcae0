// The CPU reference of the CUDA backend (llm.c style): each function loops the per-element
// function of cuda/cim_ops.h that the matching kernel runs per thread, in the order the CUDA
// backend runs its kernels. A GPU result must equal its reference bit for bit; the reference
// itself is checked against CpuCimBackend on machines without a GPU: bit for bit, except on
// `cycle` chips at σ > 0, which the CPU backend reads through OpenBLAS GEMMs.
#pragma once
#include <cstdint>
#include <vector>

#include "cuda/cim_ops.h"
#include "common/cim_config.h"
#include "common/layer_plan.h"

namespace cimsweep::cimref {

// Kernel quantise_im2col: [rows][positions] input levels in mapped row order.
std::vector<uint16_t> quantise_im2col(const QuantisedLayer& layer, const CimConfig& config,
                                      const float* x, const cimops::LayerGeometry& g);

// Kernel program_subarray: sub-array s's operand [slices·outs + ref_rows][width] for one read
// number (0: the chip of variation mode `device`).
std::vector<float> program_subarray(const QuantisedLayer& layer, const CimConfig& config,
                                    double sigma, uint32_t trial, int s, uint32_t read);

// Kernel partial_sums: one read's partial sums [operand_rows][positions], in the CPU backend's
// look-up order (cimops::partial_sum).
std::vector<float> partial_sums(const std::vector<float>& operand, int operand_rows, int width,
                                const std::vector<uint16_t>& mapped, int64_t positions, int r0,
                                int bit);

// Kernel adc_ranges: one read's dynamic-ADC ranges, one per slice.
std::vector<cimops::SliceRange> adc_ranges(const cimops::ReadParams& p,
                                           const std::vector<float>& P);

// The whole layer as the CUDA backend computes it in exact mode: y [n][out][oh][ow]. `largest`
// (optional) receives the largest partial sum when calibrating.
struct LayerRun {
  double sigma = 0;
  uint32_t trial = 0, batch_index = 0;
  bool calibrating = false, all_digital = false;
};
std::vector<float> run_layer(const QuantisedLayer& layer, const CimConfig& config,
                             const LayerRun& run, const float* x, int n, int h, int w,
                             double* largest = nullptr);

}  // namespace cimsweep::cimref
