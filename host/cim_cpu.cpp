#include "host/cim_cpu.h"

#include <cblas.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "host/errors.h"
#include "kernels/cim_math.h"

namespace cimsweep {
namespace {

// Output positions per work chunk: fixed (never derived from the thread count) so that every
// chunk, and so every result, is the same however many threads run.
constexpr int kChunk = 512;

// WAGE's per-layer scale (Wu et al. 2018, eqs. 7-8): α = max(Shift(L_min / L_std), 1) with
// L_std = sqrt(6 / fan_in), L_min = β·2^(1−wb), β = 1.5, Shift(x) = 2^round(log2 x).
double wage_alpha(int fan_in, int weight_bits) {
  const double limit_std = std::sqrt(6.0 / fan_in);
  const double limit_min = 1.5 * std::ldexp(1.0, 1 - weight_bits);
  const double shifted = std::ldexp(1.0, int(std::lround(std::log2(limit_min / limit_std))));
  return std::max(shifted, 1.0);
}

// Sub-array partition: `kernel` maps each kernel position on its own and cuts its channels into
// blocks of R rows; `dense` cuts the (c, i, j)-ordered rows into consecutive blocks of R.
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

}  // namespace

int reference_rows(const CimConfig& config, double sigma) {
  return (config.reference_variation && sigma > 0) ? config.cells_per_weight() : 1;
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
    const double alpha = wage_alpha(rows, config.weight_bits);
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

CpuCimBackend::CpuCimBackend(const std::vector<CimLayerSpec>& layers, const CimConfig& config)
    : config_(config) {
  config_.validate();
  // Threads split the work chunks; each chunk's GEMM must then run on its own thread only.
  openblas_set_num_threads(1);
  for (const std::string& name : config_.digital_layers) {
    const bool known = std::any_of(layers.begin(), layers.end(),
                                   [&](const CimLayerSpec& l) { return l.name == name; });
    if (!known)
      throw UserError("--digital-layers names '" + name +
                      "', which is not a layer of this model: see `cimsweep info MODEL`");
  }
  for (size_t i = 0; i < layers.size(); ++i) {
    const bool digital = std::find(config_.digital_layers.begin(), config_.digital_layers.end(),
                                   layers[i].name) != config_.digital_layers.end();
    layers_.push_back(quantise_layer(layers[i], int(i), config_, digital));
  }
  chip_.resize(layers_.size());
  calibration_max_.assign(layers_.size(), 0.0);
  program_chip(0, 0.0);
}

void CpuCimBackend::program_chip(uint32_t trial, double sigma) {
  if (!(sigma >= 0) || !std::isfinite(sigma))
    throw UserError("σ must be a finite number ≥ 0, got " + std::to_string(sigma));
  key_ = cim::NoiseKey{config_.seed, trial};
  sigma_ = sigma;
  for (const QuantisedLayer& layer : layers_) {
    if (layer.digital) continue;
    chip_[layer.index].resize(layer.subarrays());
    for (int s = 0; s < layer.subarrays(); ++s)
      program_subarray(layer.index, s, 0, chip_[layer.index][s]);
  }
}

void CpuCimBackend::program_subarray(int index, int s, uint32_t read,
                                     std::vector<float>& operand) const {
  const QuantisedLayer& layer = layers_[index];
  const int outs = layer.spec.out_channels, rows = layer.spec.rows();
  const int slices = config_.cells_per_weight(), cell_bits = config_.cell_bits;
  const int r0 = layer.subarray_begin[s], width = layer.subarray_begin[s + 1] - r0;
  const int ref_rows = reference_rows(config_, sigma_);
  const double inv_onoff = config_.inv_onoff();
  const bool clean = sigma_ == 0;
  operand.assign(size_t(slices * outs + ref_rows) * width, 0.0f);
  const double g_ref = cim::reference_conductance(cell_bits, inv_onoff);

#pragma omp parallel for schedule(static) if (size_t(width) * outs * slices >= 4096)
  for (int k = 0; k < width; ++k) {
    const int logical = layer.mapped_to_logical[r0 + k];
    for (int o = 0; o < outs; ++o) {
      const int level = layer.levels[size_t(o) * rows + logical];
      const uint64_t first_cell = (uint64_t(o) * rows + logical) * slices;
      float z[4];
      uint64_t cached_group = ~uint64_t{0};
      for (int m = 0; m < slices; ++m) {
        const int cell = cim::cell_level(level, m, cell_bits);
        double value = cell;  // σ = 0: integer levels, so that partial sums are exact (§7)
        if (!clean) {
          const uint64_t cell_id = first_cell + m;
          if ((cell_id >> 2) != cached_group) {
            cached_group = cell_id >> 2;
            cim::normal4(key_, uint32_t(index), cim::kWeightCells, cached_group, read, z);
          }
          value = cim::vary_conductance(cim::cell_conductance(cell, cell_bits, inv_onoff), sigma_,
                                        z[cell_id & 3], config_.clamp_at_zero);
        }
        operand[size_t(m * outs + o) * width + k] = float(value);
      }
    }
    for (int m = 0; m < ref_rows; ++m) {
      double value = 1.0;  // the all-ones row: it counts Σ b
      if (ref_rows > 1) {
        const float z = cim::cell_noise(key_, uint32_t(index), cim::kReferenceCells,
                                        uint64_t(logical) * slices + m, read);
        value = cim::vary_conductance(g_ref, sigma_, z, config_.clamp_at_zero);
      }
      operand[size_t(slices * outs + m) * width + k] = float(value);
    }
  }
}

void CpuCimBackend::set_calibrating(bool on) {
  if (on) {
    std::fill(calibration_max_.begin(), calibration_max_.end(), 0.0);
  } else if (calibrating_) {
    for (QuantisedLayer& layer : layers_) layer.adc_full_scale = calibration_max_[layer.index];
  }
  calibrating_ = on;
}

void CpuCimBackend::run_layer(int index, const float* x, int n, int h, int w, float* y) {
  const QuantisedLayer& layer = layers_.at(size_t(index));
  const CimLayerSpec& spec = layer.spec;
  const int out_h = spec.output_size(h, spec.kernel_h), out_w = spec.output_size(w, spec.kernel_w);
  if (out_h < 1 || out_w < 1)
    throw UserError("layer '" + spec.name + "' gets a " + std::to_string(h) + "×" +
                    std::to_string(w) + " input, too small for its kernel: use larger images");
  const int npos = n * out_h * out_w;
  const int taps = spec.kernel_h * spec.kernel_w, rows = spec.rows();

  // §3: quantise the input once, then gather it into the mapped row order (im2col).
  std::vector<uint16_t> levels(size_t(n) * spec.in_channels * h * w);
  // Parallel loops pay off only on large layers; small ones stay on one thread (a barrier costs
  // far more than their work, above all on a loaded machine).
  const bool large = size_t(npos) * rows >= (size_t(1) << 16);
#pragma omp parallel for schedule(static) if (large)
  for (long long i = 0; i < (long long)levels.size(); ++i)
    levels[i] = uint16_t(cim::input_level(x[i], spec.input_range, config_.input_bits));

  std::vector<uint16_t> mapped(size_t(rows) * npos);
#pragma omp parallel for schedule(static) if (large)
  for (int r = 0; r < rows; ++r) {
    const int logical = layer.mapped_to_logical[r];
    const int c = logical / taps, i = (logical % taps) / spec.kernel_w, j = logical % spec.kernel_w;
    uint16_t* out_row = mapped.data() + size_t(r) * npos;
    for (int img = 0; img < n; ++img) {
      const uint16_t* plane = levels.data() + (size_t(img) * spec.in_channels + c) * h * w;
      for (int oy = 0; oy < out_h; ++oy) {
        const int iy = oy * spec.stride - spec.pad + i;
        for (int ox = 0; ox < out_w; ++ox) {
          const int ix = ox * spec.stride - spec.pad + j;
          *out_row++ = (iy >= 0 && iy < h && ix >= 0 && ix < w) ? plane[iy * w + ix] : 0;
        }
      }
    }
  }

  std::vector<double> acc(size_t(spec.out_channels) * npos, 0.0);
  if (layer.digital || all_digital_) {
    run_digital(layer, mapped, npos, acc);
  } else {
    run_cim(layer, mapped, npos, acc);
  }

  const int plane = out_h * out_w;
#pragma omp parallel for schedule(static) if (large)
  for (int o = 0; o < spec.out_channels; ++o) {
    const double bias = spec.bias ? double(spec.bias[o]) : 0.0;
    const double* acc_row = acc.data() + size_t(o) * npos;
    for (int img = 0; img < n; ++img) {
      float* out_plane = y + (size_t(img) * spec.out_channels + o) * plane;
      const double* src = acc_row + size_t(img) * plane;
      for (int p = 0; p < plane; ++p) out_plane[p] = float(layer.output_scale * src[p] + bias);
    }
  }
}

// The quantised digital layer: Σ (2D − (2^wb − 1))·A, exact in double (integers below 2^53).
void CpuCimBackend::run_digital(const QuantisedLayer& layer, const std::vector<uint16_t>& mapped,
                                int npos, std::vector<double>& acc) const {
  const int outs = layer.spec.out_channels, rows = layer.spec.rows();
  const double offset = cim::max_code(config_.weight_bits);
  std::vector<double> weights(size_t(outs) * rows);
  for (int o = 0; o < outs; ++o)
    for (int r = 0; r < rows; ++r)
      weights[size_t(o) * rows + r] =
          2.0 * layer.levels[size_t(o) * rows + layer.mapped_to_logical[r]] - offset;
  const int chunks = (npos + kChunk - 1) / kChunk;
#pragma omp parallel if (chunks > 1)
  {
    std::vector<double> inputs(size_t(rows) * kChunk);
#pragma omp for schedule(dynamic)
    for (int chunk = 0; chunk < chunks; ++chunk) {
      const int n0 = chunk * kChunk, cols = std::min(kChunk, npos - n0);
      for (int r = 0; r < rows; ++r)
        for (int q = 0; q < cols; ++q)
          inputs[size_t(r) * cols + q] = mapped[size_t(r) * npos + n0 + q];
      cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, outs, cols, rows, 1.0, weights.data(),
                  rows, inputs.data(), cols, 0.0, acc.data() + n0, npos);
    }
  }
}

namespace {

// How one read's partial sums become ADC codes, for one chunk of columns.
struct ReadContext {
  int outs, slices, ref_rows, cell_bits, adc_bits, subarray_rows;
  AdcMode adc;
  bool clean, ideal_clean;
  double inv_onoff, g_ref, gain, full_scale;
  // dynamic ADC ranges per slice: weights, then reference
  const double* lo;
  const double* hi;
  const double* ref_lo;
  const double* ref_hi;
};

// Partial sums in level units: the GEMM gives them directly when σ > 0; at σ = 0 it gives the
// exact integer Σ d·b, scaled here together with the Σ b count (§7).
template <bool kClean>
struct PartialSum {
  cim::CleanPartialSum clean;
  double operator()(float raw, float count) const {
    return kClean ? clean(double(raw), double(count)) : double(raw);
  }
};

inline double reference_sum(const ReadContext& ctx, const float* p, int ld, int q, int m) {
  const float* ref = p + size_t(ctx.slices * ctx.outs) * ld;
  if (ctx.ref_rows == 1) return cim::mul_rn(ctx.g_ref, ref[q]);
  return ref[size_t(m) * ld + q];
}

// Min/max of every slice's partial sums and reference sums over a chunk (ADC `dynamic`).
template <bool kClean>
void chunk_ranges_for(const ReadContext& ctx, const float* p, int ld, int cols, double* lo,
                      double* hi, double* ref_lo, double* ref_hi) {
  const PartialSum<kClean> partial{cim::CleanPartialSum(ctx.cell_bits, ctx.inv_onoff)};
  const float* counts = p + size_t(ctx.slices * ctx.outs) * ld;
  for (int m = 0; m < ctx.slices; ++m) {
    double mn = std::numeric_limits<double>::infinity(), mx = -mn;
    for (int o = 0; o < ctx.outs; ++o) {
      const float* row = p + size_t(m * ctx.outs + o) * ld;
#pragma omp simd reduction(min : mn) reduction(max : mx)
      for (int q = 0; q < cols; ++q) {
        const double v = partial(row[q], counts[q]);
        mn = std::min(mn, v);
        mx = std::max(mx, v);
      }
    }
    lo[m] = mn;
    hi[m] = mx;
    double rmn = std::numeric_limits<double>::infinity(), rmx = -rmn;
    for (int q = 0; q < cols; ++q) {
      const double v = reference_sum(ctx, p, ld, q, m);
      rmn = v < rmn ? v : rmn;
      rmx = v > rmx ? v : rmx;
    }
    ref_lo[m] = rmn;
    ref_hi[m] = rmx;
  }
}

void chunk_ranges(const ReadContext& ctx, const float* p, int ld, int cols, double* lo, double* hi,
                  double* ref_lo, double* ref_hi) {
  if (ctx.clean)
    chunk_ranges_for<true>(ctx, p, ld, cols, lo, hi, ref_lo, ref_hi);
  else
    chunk_ranges_for<false>(ctx, p, ld, cols, lo, hi, ref_lo, ref_hi);
}

// acc[q] += place·gain·(Q(P[q]) − Q(Pref)[q]) over one output row: the hot loop of the CPU
// backend, instantiated per ADC kind so that it vectorises.
template <bool kClean, class Quantise>
void accumulate_row(const PartialSum<kClean>& partial, const Quantise& quantise,
                    const float* __restrict row, const float* __restrict counts,
                    const double* __restrict ref_codes, double place, double gain,
                    double* __restrict out, int cols) {
#pragma omp simd
  for (int q = 0; q < cols; ++q)
    out[q] += place * (gain * (quantise(partial(row[q], counts[q])) - ref_codes[q]));
}

// Calls `body` with the branch-free form of the ADC of one read.
template <class Body>
void with_quantiser(const cim::DynamicAdc& adc, const Body& body) {
  if (adc.identity)
    body(cim::IdealAdc());
  else
    body([adc](double x) { return adc.quantise(x); });
}
template <class Body>
void with_quantiser(const cim::FixedAdc& adc, const Body& body) {
  if (adc.step > 0.0)
    body([adc](double x) { return adc.quantise(x); });
  else
    body([](double) { return 0.0; });
}
template <class Body>
void with_quantiser(const cim::IdealAdc& adc, const Body& body) {
  body(adc);
}

template <bool kClean, class MakeAdc>
void accumulate_chunk_for(const ReadContext& ctx, const MakeAdc& make_adc, const float* p, int ld,
                          int cols, int bit, double* acc, int acc_ld,
                          std::vector<double>& ref_codes) {
  const PartialSum<kClean> partial{cim::CleanPartialSum(ctx.cell_bits, ctx.inv_onoff)};
  const float* counts = p + size_t(ctx.slices * ctx.outs) * ld;
  ref_codes.resize(size_t(ctx.slices) * cols);
  for (int m = 0; m < ctx.slices; ++m) {
    const auto ref_adc = make_adc(ctx.ref_lo[m], ctx.ref_hi[m]);
    for (int q = 0; q < cols; ++q)
      ref_codes[size_t(m) * cols + q] = ref_adc(reference_sum(ctx, p, ld, q, m));
  }
  for (int m = 0; m < ctx.slices; ++m) {
    const double place = std::ldexp(1.0, bit + ctx.cell_bits * m);
    with_quantiser(make_adc(ctx.lo[m], ctx.hi[m]), [&](const auto& quantise) {
      for (int o = 0; o < ctx.outs; ++o)
        accumulate_row(partial, quantise, p + size_t(m * ctx.outs + o) * ld, counts,
                       ref_codes.data() + size_t(m) * cols, place, ctx.gain,
                       acc + size_t(o) * acc_ld, cols);
    });
  }
}

// The σ = 0, ideal-ADC read: (P − Pref)·gain = 2·Σd·b − L·Σb exactly (§5, §7). Also what ADC
// calibration runs, so it reports the largest partial sum.
double accumulate_exact_chunk(const ReadContext& ctx, const float* p, int ld, int cols, int bit,
                              double* acc, int acc_ld) {
  const PartialSum<true> partial{cim::CleanPartialSum(ctx.cell_bits, ctx.inv_onoff)};
  const float* counts = p + size_t(ctx.slices * ctx.outs) * ld;
  const double levels = cim::max_code(ctx.cell_bits);
  double largest = 0;
  for (int q = 0; q < cols; ++q) largest = std::max(largest, cim::mul_rn(ctx.g_ref, counts[q]));
  for (int m = 0; m < ctx.slices; ++m) {
    const double place = std::ldexp(1.0, bit + ctx.cell_bits * m);
    for (int o = 0; o < ctx.outs; ++o) {
      const float* row = p + size_t(m * ctx.outs + o) * ld;
      double* out = acc + size_t(o) * acc_ld;
      for (int q = 0; q < cols; ++q) {
        largest = std::max(largest, partial(row[q], counts[q]));
        out[q] += place * (2.0 * double(row[q]) - levels * double(counts[q]));
      }
    }
  }
  return largest;
}

// ADC and shift-and-add of one read for a chunk: acc[o][q] += 2^t·2^(cb·m)·gain·(Q(P) − Q(Pref)).
// Returns the largest partial sum of the read when it is the exact one (ADC calibration), else 0.
double accumulate_chunk(const ReadContext& ctx, const float* p, int ld, int cols, int bit,
                        double* acc, int acc_ld, std::vector<double>& ref_codes) {
  if (ctx.ideal_clean) return accumulate_exact_chunk(ctx, p, ld, cols, bit, acc, acc_ld);
  auto run = [&](const auto& make_adc) {
    if (ctx.clean)
      accumulate_chunk_for<true>(ctx, make_adc, p, ld, cols, bit, acc, acc_ld, ref_codes);
    else
      accumulate_chunk_for<false>(ctx, make_adc, p, ld, cols, bit, acc, acc_ld, ref_codes);
    return 0.0;
  };
  switch (ctx.adc) {
    case AdcMode::kDynamic:
      return run([&](double lo, double hi) { return cim::DynamicAdc(lo, hi, ctx.adc_bits); });
    case AdcMode::kFixed: {
      const double full_scale = double(ctx.subarray_rows) * cim::max_code(ctx.cell_bits);
      return run([&](double, double) { return cim::FixedAdc(full_scale, ctx.adc_bits); });
    }
    case AdcMode::kCalibrated:
      return run([&](double, double) { return cim::FixedAdc(ctx.full_scale, ctx.adc_bits); });
    case AdcMode::kIdeal:
      return run([](double, double) { return cim::IdealAdc(); });
  }
  return 0;
}

}  // namespace

void CpuCimBackend::run_cim(const QuantisedLayer& layer, const std::vector<uint16_t>& mapped,
                            int npos, std::vector<double>& acc) {
  const int outs = layer.spec.out_channels, slices = config_.cells_per_weight();
  const int ref_rows = reference_rows(config_, sigma_);
  const int operand_rows = slices * outs + ref_rows;
  const bool calibrating = calibrating_;
  const AdcMode adc = calibrating ? AdcMode::kIdeal : config_.adc;
  const bool dynamic = adc == AdcMode::kDynamic;
  const bool cycle = config_.variation == VariationMode::kCycle && sigma_ > 0;
  if (adc == AdcMode::kCalibrated && !(layer.adc_full_scale > 0))
    throw UserError("ADC 'calibrated' needs a calibration run first (internal: layer '" +
                    layer.spec.name + "' has no range)");
  const int chunks = (npos + kChunk - 1) / kChunk;

  ReadContext ctx{};
  ctx.outs = outs;
  ctx.slices = slices;
  ctx.ref_rows = ref_rows;
  ctx.cell_bits = config_.cell_bits;
  ctx.adc_bits = config_.adc_bits;
  ctx.adc = adc;
  ctx.clean = sigma_ == 0;
  ctx.ideal_clean = ctx.clean && adc == AdcMode::kIdeal;
  ctx.inv_onoff = config_.inv_onoff();
  ctx.g_ref = cim::reference_conductance(config_.cell_bits, ctx.inv_onoff);
  ctx.gain = cim::recombination_gain(ctx.inv_onoff);
  ctx.full_scale = layer.adc_full_scale;

  const int subarrays = layer.subarrays(), input_bits = config_.input_bits;
  const int reads = subarrays * input_bits;  // reads per cell slice
  // Mode `cycle` draws every read's conductances afresh: program them all up front, so that the
  // chunks below can run every read on their own.
  std::vector<std::vector<float>> read_operands;
  if (cycle) {
    read_operands.resize(reads);
    for (int s = 0; s < subarrays; ++s)
      for (int bit = 0; bit < input_bits; ++bit)
        program_subarray(layer.index, s, 1 + batch_index_ * input_bits + bit,
                         read_operands[s * input_bits + bit]);
  }
  const std::vector<std::vector<float>>& operands = chip_[layer.index];

  // Each chunk of output positions runs all its reads while its partial sums and accumulators
  // stay in cache. Per read: the bit plane, then one GEMM over all cell slices and the reference.
  auto gemm_read = [&](int s, int bit, int n0, int cols, std::vector<float>& bits, float* p) {
    const int r0 = layer.subarray_begin[s], width = layer.subarray_begin[s + 1] - r0;
    for (int k = 0; k < width; ++k) {
      const uint16_t* src = mapped.data() + size_t(r0 + k) * npos + n0;
      float* dst = bits.data() + size_t(k) * cols;
      for (int q = 0; q < cols; ++q) dst[q] = float((src[q] >> bit) & 1);
    }
    const float* operand = cycle ? read_operands[s * input_bits + bit].data() : operands[s].data();
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, operand_rows, cols, width, 1.0f, operand,
                width, bits.data(), cols, 0.0f, p, cols);
  };
  int max_width = 0;
  for (int s = 0; s < subarrays; ++s)
    max_width = std::max(max_width, layer.subarray_begin[s + 1] - layer.subarray_begin[s]);

  // ADC `dynamic`: every read's range spans the whole batch, so a first pass over the chunks
  // finds the ranges (the GEMMs are cheaper to redo than the partial sums are to keep).
  const size_t ranges_per_chunk = size_t(reads) * slices;
  std::vector<double> lo(ranges_per_chunk), hi(ranges_per_chunk);
  std::vector<double> ref_lo(ranges_per_chunk), ref_hi(ranges_per_chunk);
  if (dynamic) {
    std::vector<double> found(size_t(chunks) * ranges_per_chunk * 4);
#pragma omp parallel if (chunks > 1)
    {
      std::vector<float> bits(size_t(max_width) * kChunk), p(size_t(operand_rows) * kChunk);
#pragma omp for schedule(dynamic)
      for (int chunk = 0; chunk < chunks; ++chunk) {
        const int n0 = chunk * kChunk, cols = std::min(kChunk, npos - n0);
        for (int read = 0; read < reads; ++read) {
          gemm_read(read / input_bits, read % input_bits, n0, cols, bits, p.data());
          double* at = &found[(size_t(chunk) * reads + read) * slices * 4];
          chunk_ranges(ctx, p.data(), cols, cols, at, at + slices, at + 2 * slices,
                       at + 3 * slices);
        }
      }
    }
    for (size_t i = 0; i < ranges_per_chunk; ++i) {
      lo[i] = ref_lo[i] = std::numeric_limits<double>::infinity();
      hi[i] = ref_hi[i] = -std::numeric_limits<double>::infinity();
    }
    for (int chunk = 0; chunk < chunks; ++chunk)
      for (int read = 0; read < reads; ++read)
        for (int m = 0; m < slices; ++m) {
          const double* at = &found[(size_t(chunk) * reads + read) * slices * 4];
          const size_t i = size_t(read) * slices + m;
          lo[i] = std::min(lo[i], at[m]);
          hi[i] = std::max(hi[i], at[slices + m]);
          ref_lo[i] = std::min(ref_lo[i], at[2 * slices + m]);
          ref_hi[i] = std::max(ref_hi[i], at[3 * slices + m]);
        }
  }

  double largest = 0;
#pragma omp parallel if (chunks > 1) reduction(max : largest)
  {
    std::vector<float> bits(size_t(max_width) * kChunk), p(size_t(operand_rows) * kChunk);
    std::vector<double> tile(size_t(outs) * kChunk), ref_codes;
    ReadContext read_ctx = ctx;
#pragma omp for schedule(dynamic)
    for (int chunk = 0; chunk < chunks; ++chunk) {
      const int n0 = chunk * kChunk, cols = std::min(kChunk, npos - n0);
      std::fill(tile.begin(), tile.begin() + size_t(outs) * cols, 0.0);
      for (int read = 0; read < reads; ++read) {
        const int s = read / input_bits, bit = read % input_bits;
        gemm_read(s, bit, n0, cols, bits, p.data());
        read_ctx.subarray_rows = layer.subarray_begin[s + 1] - layer.subarray_begin[s];
        read_ctx.lo = &lo[size_t(read) * slices];
        read_ctx.hi = &hi[size_t(read) * slices];
        read_ctx.ref_lo = &ref_lo[size_t(read) * slices];
        read_ctx.ref_hi = &ref_hi[size_t(read) * slices];
        largest = std::max(largest, accumulate_chunk(read_ctx, p.data(), cols, cols, bit,
                                                     tile.data(), cols, ref_codes));
      }
      for (int o = 0; o < outs; ++o)
        std::copy_n(tile.data() + size_t(o) * cols, cols, acc.data() + size_t(o) * npos + n0);
    }
  }
  if (calibrating) calibration_max_[layer.index] = std::max(calibration_max_[layer.index], largest);
}

}  // namespace cimsweep
