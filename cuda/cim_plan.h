// From the host's description of a layer (QuantisedLayer, CimConfig, σ) to the plain parameter
// structs of cuda/cim_ops.h, shared by the CUDA backend and its CPU reference; the chip and the
// read set-up themselves come from kernels/chip_model.h, as the CPU backend's. Header-only, no CUDA.
#pragma once
#include <cstdint>

#include "cuda/cim_ops.h"
#include "common/cim_config.h"
#include "common/layer_plan.h"

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

// The chip and the layer's shape; the device pointers (levels, mapped_to_logical) are filled in
// by the caller.
inline ChipParams make_chip_params(const QuantisedLayer& layer, const CimConfig& config,
                                   double sigma, uint32_t trial) {
  ChipParams p;
  p.chip = config.chip(sigma, trial, layer.index);
  p.rows = layer.spec.rows();
  p.outs = layer.spec.out_channels;
  return p;
}

// The read set-up of the layer's chip (cim::make_read_setup) for a batch of `positions`.
inline ReadParams make_read_params(const QuantisedLayer& layer, const CimConfig& config,
                                   double sigma, bool calibrating, int64_t positions) {
  ReadParams p;
  static_cast<cim::ReadSetup&>(p) = cim::make_read_setup(
      config.chip(sigma, 0, layer.index), layer.spec.out_channels, config.adc, config.adc_bits,
      config.input_bits, calibrating, layer.adc_full_scale);
  p.positions = positions;
  return p;
}

}  // namespace cimsweep::cimops
