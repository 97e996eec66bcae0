#include "cuda/cim_reference.h"

#include <algorithm>
#include <limits>

#include "cuda/cim_plan.h"

namespace cimsweep::cimref {

using cimops::LayerGeometry;
using cimops::ReadParams;
using cimops::SliceRange;

std::vector<uint16_t> quantise_im2col(const QuantisedLayer& layer, const CimConfig& config,
                                      const float* x, const LayerGeometry& g) {
  std::vector<uint16_t> mapped(size_t(g.rows) * size_t(g.positions));
  for (int r = 0; r < g.rows; ++r)
    for (int64_t q = 0; q < g.positions; ++q)
      mapped[size_t(r) * g.positions + q] = cimops::mapped_input_level(
          x, g, layer.mapped_to_logical[r], q, layer.spec.input_range, config.input_bits);
  return mapped;
}

std::vector<float> program_subarray(const QuantisedLayer& layer, const CimConfig& config,
                                    double sigma, uint32_t trial, int s, uint32_t read) {
  cimops::ChipParams p = cimops::make_chip_params(layer, config, sigma, trial);
  p.levels = layer.levels.data();
  p.mapped_to_logical = layer.mapped_to_logical.data();
  const int r0 = layer.subarray_begin[s], width = layer.subarray_begin[s + 1] - r0;
  std::vector<float> operand(size_t(p.operand_rows()) * width, 0.0f);
  for (int o = 0; o <= p.outs; ++o)
    for (int k = 0; k < width; ++k)
      cimops::program_operand_column(p, r0, width, k, o, read, operand.data());
  return operand;
}

std::vector<float> partial_sums(const std::vector<float>& operand, int operand_rows, int width,
                                const std::vector<uint16_t>& mapped, int64_t positions, int r0,
                                int bit) {
  std::vector<float> P(size_t(operand_rows) * positions);
  for (int row = 0; row < operand_rows; ++row)
    for (int64_t q = 0; q < positions; ++q)
      P[size_t(row) * positions + q] = cimops::partial_sum(
          operand.data() + size_t(row) * width, width, mapped.data(), positions, r0, q, bit);
  return P;
}

std::vector<SliceRange> adc_ranges(const ReadParams& p, const std::vector<float>& P) {
  const double inf = std::numeric_limits<double>::infinity();
  std::vector<double> lo(p.slices + p.ref_rows, inf), hi(p.slices + p.ref_rows, -inf);
  for (int row = 0; row < p.operand_rows(); ++row) {
    const int slot = cimops::range_slot(p, row);
    for (int64_t q = 0; q < p.positions; ++q) {
      const double v = cimops::range_value(p, P.data(), row, q);
      lo[slot] = std::min(lo[slot], v);
      hi[slot] = std::max(hi[slot], v);
    }
  }
  std::vector<SliceRange> ranges(p.slices);
  for (int m = 0; m < p.slices; ++m) {
    const int ref = p.slices + (p.ref_rows == 1 ? 0 : m);
    ranges[m] = SliceRange{lo[m], hi[m], lo[ref], hi[ref]};
  }
  return ranges;
}

std::vector<float> run_layer(const QuantisedLayer& layer, const CimConfig& config,
                             const LayerRun& run, const float* x, int n, int h, int w,
                             double* largest) {
  const LayerGeometry g = cimops::make_geometry(layer.spec, n, h, w);
  const std::vector<uint16_t> mapped = quantise_im2col(layer, config, x, g);
  const int outs = g.out_channels;
  const int64_t positions = g.positions;
  // The codes' part [outs][positions] (a digital layer's exact sums) and the common part
  // [positions] of the CIM layer's sums (cim-model.md §5, "Summation order").
  std::vector<double> codes(size_t(outs) * positions, 0.0), common;
  double most = 0;

  if (layer.digital || run.all_digital) {
    const std::vector<double> weights = digital_weights(layer, config);
    for (int o = 0; o < outs; ++o)
      for (int r = 0; r < g.rows; ++r)
        for (int64_t q = 0; q < positions; ++q)
          codes[size_t(o) * positions + q] +=
              weights[size_t(o) * g.rows + r] * double(mapped[size_t(r) * positions + q]);
  } else {
    common.assign(size_t(positions), 0.0);
    const ReadParams p =
        cimops::make_read_params(layer, config, run.sigma, run.calibrating, positions);
    const bool cycle = config.chip(run.sigma, run.trial, layer.index).redrawn_per_read();
    for (int s = 0; s < layer.subarrays(); ++s) {
      const int r0 = layer.subarray_begin[s], width = layer.subarray_begin[s + 1] - r0;
      const std::vector<float> chip = program_subarray(layer, config, run.sigma, run.trial, s, 0);
      for (int bit = 0; bit < config.input_bits; ++bit) {
        const std::vector<float> operand =
            cycle ? program_subarray(
                        layer, config, run.sigma, run.trial, s,
                        cim::ChipModel::cycle_read(run.batch_index, config.input_bits, bit))
                  : chip;
        const std::vector<float> P =
            partial_sums(operand, p.operand_rows(), width, mapped, positions, r0, bit);
        std::vector<SliceRange> ranges;
        if (p.adc == AdcMode::kDynamic) ranges = adc_ranges(p, P);
        const SliceRange* read_ranges = ranges.empty() ? nullptr : ranges.data();
        for (int o = 0; o < outs; ++o)
          for (int64_t q = 0; q < positions; ++q) {
            double& sum = codes[size_t(o) * positions + q];
            sum = cimops::accumulate_codes(p, P.data(), read_ranges, width, bit, o, q, sum, &most);
          }
        for (int64_t q = 0; q < positions; ++q)
          common[q] = cimops::accumulate_common(p, P.data(), read_ranges, width, bit, q, common[q]);
      }
    }
  }
  if (largest) *largest = most;

  std::vector<float> y(size_t(n) * outs * g.out_h * g.out_w);
  const int64_t plane = int64_t(g.out_h) * g.out_w;
  for (size_t i = 0; i < y.size(); ++i) {
    const int o = int((int64_t(i) / plane) % outs);
    const int64_t acc_index = cimops::accumulator_index(int64_t(i), outs, plane, positions);
    y[i] = cimops::output_value(
        layer.output_scale,
        cimops::layer_sum(codes.data(), common.empty() ? nullptr : common.data(), acc_index,
                          positions),
        layer.spec.bias, o);
  }
  return y;
}

}  // namespace cimsweep::cimref
