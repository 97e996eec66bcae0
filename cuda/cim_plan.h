// From the host's description of a layer (QuantisedLayer, CimConfig, σ) to the plain parameter
// structs of cuda/cim_ops.h, shared by the CUDA backend and its CPU reference so that both read
// the configuration the same way. Header-only, no CUDA.
#pragma once
#include <cstdint>

#include "cuda/cim_ops.h"
#include "common/cim_config.h"
#include "host/cpu/cim_cpu.h"

namespace cimsweep::cimops {

inline LayerGeometry make_geometry(const CimLayerSpec& spec, int images, int h, int w) {
  LayerGeometry g;
  g.in_channels = spec.in_channels;
  g.in_h = h;
  g.in_w = w;
  g.kernel_h = spec.kernel_h;
  g.kernel_w = spec.kernel_w;
  g.stride = spec.stride;
  g.pad = spec.pad;
  g.out_channels = spec.out_channels;
  g.out_h = spec.output_size(h, spec.kernel_h);
  g.out_w = spec.output_size(w, spec.kernel_w);
  g.images = images;
  g.rows = spec.rows();
  g.positions = int64_t(images) * g.out_h * g.out_w;
  return g;
}

// Device pointers (levels, mapped_to_logical) are filled in by the caller.
inline ChipParams make_chip_params(const QuantisedLayer& layer, const CimConfig& config,
                                   double sigma, uint32_t trial) {
  ChipParams p;
  p.rows = layer.spec.rows();
  p.outs = layer.spec.out_channels;
  p.slices = config.cells_per_weight();
  p.cell_bits = config.cell_bits;
  p.ref_rows = reference_rows(config, sigma);
  p.inv_onoff = config.inv_onoff();
  p.sigma = sigma;
  p.clamp_at_zero = config.clamp_at_zero;
  p.key = cim::NoiseKey{config.seed, trial};
  p.layer = uint32_t(layer.index);
  return p;
}

inline AdcKind adc_kind(AdcMode mode) {
  switch (mode) {
    case AdcMode::kDynamic:
      return AdcKind::kDynamic;
    case AdcMode::kFixed:
      return AdcKind::kFixed;
    case AdcMode::kCalibrated:
      return AdcKind::kCalibrated;
    case AdcMode::kIdeal:
      return AdcKind::kIdeal;
  }
  return AdcKind::kIdeal;
}

// As CpuCimBackend::run_cim sets up its ReadContext: while calibrating, the ADC is ideal.
inline ReadParams make_read_params(const QuantisedLayer& layer, const CimConfig& config,
                                   double sigma, bool calibrating, int64_t positions) {
  ReadParams p;
  p.outs = layer.spec.out_channels;
  p.slices = config.cells_per_weight();
  p.ref_rows = reference_rows(config, sigma);
  p.cell_bits = config.cell_bits;
  p.adc_bits = config.adc_bits;
  p.input_bits = config.input_bits;
  p.adc = calibrating ? AdcKind::kIdeal : adc_kind(config.adc);
  p.clean = sigma == 0;
  p.ideal_clean = p.clean && p.adc == AdcKind::kIdeal;
  p.inv_onoff = config.inv_onoff();
  p.g_ref = cim::reference_conductance(config.cell_bits, p.inv_onoff);
  p.gain = cim::recombination_gain(p.inv_onoff);
  p.calibrated_full_scale = layer.adc_full_scale;
  p.positions = positions;
  return p;
}

// Mode `cycle` draws a read's conductances afresh: read number 1 + batch·ab + bit, as the CPU.
inline uint32_t cycle_read_number(uint32_t batch_index, int input_bits, int bit) {
  return 1 + batch_index * uint32_t(input_bits) + uint32_t(bit);
}

// Weights of the digital path in mapped row order: 2D − (2^wb − 1), exact small integers.
inline std::vector<double> digital_weights(const QuantisedLayer& layer, const CimConfig& config) {
  const int outs = layer.spec.out_channels, rows = layer.spec.rows();
  const double offset = cim::max_code(config.weight_bits);
  std::vector<double> weights(size_t(outs) * rows);
  for (int o = 0; o < outs; ++o)
    for (int r = 0; r < rows; ++r)
      weights[size_t(o) * rows + r] =
          2.0 * layer.levels[size_t(o) * rows + layer.mapped_to_logical[r]] - offset;
  return weights;
}

}  // namespace cimsweep::cimops
