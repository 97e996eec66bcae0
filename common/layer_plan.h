// The static part of one CIM layer under one configuration (cim-model.md §1, §3, §5): the weights
// quantised to levels, the rows mapped onto sub-arrays, the output scale. Every executor (the CPU
// backend, the CUDA backend and its CPU reference, the trainer's evaluation) starts from it.
#pragma once
#include <cstdint>
#include <vector>

#include "common/cim_backend.h"
#include "common/cim_config.h"

namespace cimsweep {

struct QuantisedLayer {
  CimLayerSpec spec;
  int index = 0;                 // forward-order number: keys its noise stream
  bool digital = false;          // computed digitally (quantised, exact), no CIM
  double output_scale = 0;       // multiplies the recombined integer-unit sum (§5)
  std::vector<uint16_t> levels;  // D[o][logical row], logical row = (c, i, j) row-major
  // Sub-arrays over the mapped row order: mapped row r holds logical row mapped_to_logical[r].
  std::vector<int> mapped_to_logical;
  std::vector<int> subarray_begin;  // size = sub-arrays + 1
  double adc_full_scale = 0;        // ADC `calibrated`: the measured range; `fixed`: unused

  int subarrays() const { return int(subarray_begin.size()) - 1; }
  int subarray_rows(int s) const { return subarray_begin[s + 1] - subarray_begin[s]; }
};

QuantisedLayer quantise_layer(const CimLayerSpec& spec, int index, const CimConfig& config,
                              bool digital);

// The sub-array partition alone (mapped_to_logical, subarray_begin): `kernel` maps each kernel
// position on its own and cuts its channels into blocks of R rows; `dense` cuts the (c, i, j)-
// ordered rows into consecutive blocks of R.
void map_rows(const CimLayerSpec& spec, Mapping mapping, int rows_per_subarray,
              QuantisedLayer& layer);

// The weights of the digital (quantised, exact) layer, [outs][mapped rows]: 2D − (2^wb − 1),
// small integers, so that Σ weight·A is exact in double.
std::vector<double> digital_weights(const QuantisedLayer& layer, const CimConfig& config);

}  // namespace cimsweep
