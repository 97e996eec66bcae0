#include "common/layer_plan.h"

#include <algorithm>
#include <cmath>
#include <string>

#include "common/errors.h"
#include "kernels/cim_math.h"

namespace cimsweep {

void map_rows(const CimLayerSpec& spec, Mapping mapping, int rows_per_subarray,
              QuantisedLayer& layer) {
  const int taps = spec.kernel_h * spec.kernel_w;
  layer.mapped_to_logical.clear();
  layer.subarray_begin = {0};
  if (mapping == Mapping::kKernel) {
    for (int tap = 0; tap < taps; ++tap) {
      for (int c0 = 0; c0 < spec.in_channels; c0 += rows_per_subarray) {
        const int c1 = std::min(spec.in_channels, c0 + rows_per_subarray);
        for (int c = c0; c < c1; ++c) layer.mapped_to_logical.push_back(c * taps + tap);
        layer.subarray_begin.push_back(int(layer.mapped_to_logical.size()));
      }
    }
  } else {
    const int rows = spec.rows();
    for (int r = 0; r < rows; ++r) layer.mapped_to_logical.push_back(r);
    for (int r0 = 0; r0 < rows; r0 += rows_per_subarray)
      layer.subarray_begin.push_back(std::min(rows, r0 + rows_per_subarray));
  }
}

QuantisedLayer quantise_layer(const CimLayerSpec& spec, int index, const CimConfig& config,
                              bool digital) {
  QuantisedLayer layer;
  layer.spec = spec;
  layer.index = index;
  layer.digital = digital;
  const int rows = spec.rows();
  const size_t count = size_t(spec.out_channels) * rows;
  if (!(spec.input_range > 0) || !std::isfinite(spec.input_range))
    throw UserError("layer '" + spec.name + "' has input range " +
                    std::to_string(spec.input_range) +
                    ": every CIM layer needs a positive a_max in cimsweep.input_ranges");

  double weight_scale = 1.0;  // what ŵ must be multiplied by to give W back
  std::vector<float> w_hat(count);
  if (config.scaling == WeightScaling::kMaxAbs) {
    float max_abs = 0;
    for (size_t i = 0; i < count; ++i) max_abs = std::max(max_abs, std::fabs(spec.weight[i]));
    weight_scale = max_abs;
    for (size_t i = 0; i < count; ++i) w_hat[i] = max_abs > 0 ? spec.weight[i] / max_abs : 0.0f;
  } else {
    const double alpha = cim::wage_alpha(rows, config.weight_bits);
    weight_scale = 1.0 / alpha;
    for (size_t i = 0; i < count; ++i)
      w_hat[i] = cim::wage_weight(spec.weight[i], alpha, config.weight_bits);
  }
  layer.levels.resize(count);
  for (size_t i = 0; i < count; ++i)
    layer.levels[i] = uint16_t(cim::weight_level(w_hat[i], config.weight_bits));

  const double denominator =
      config.neurosim_scale
          ? std::ldexp(1.0, config.weight_bits) * std::ldexp(1.0, config.input_bits)
          : double(cim::max_code(config.weight_bits)) * double(cim::max_code(config.input_bits));
  layer.output_scale = weight_scale * double(spec.input_range) / denominator;
  map_rows(spec, config.mapping, config.subarray_rows, layer);
  return layer;
}

std::vector<double> digital_weights(const QuantisedLayer& layer, const CimConfig& config) {
  const int outs = layer.spec.out_channels, rows = layer.spec.rows();
  const double offset = cim::max_code(config.weight_bits);
  std::vector<double> weights(size_t(outs) * rows);
  for (int o = 0; o < outs; ++o)
    for (int r = 0; r < rows; ++r)
      weights[size_t(o) * rows + r] =
          2.0 * layer.levels[size_t(o) * rows + layer.mapped_to_logical[r]] - offset;
  return weights;
}

}  // namespace cimsweep
