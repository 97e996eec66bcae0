#include "host/cpu/cim_cpu.h"

#include <cblas.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "common/errors.h"
#include "kernels/cim_math.h"
#include "kernels/lookup_read.h"

namespace cimsweep {
namespace {

// Output positions per work chunk: fixed (never derived from the thread count) so that every
// chunk, and so every result, is the same however many threads run.
constexpr int kChunk = 512;

}  // namespace

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
  operands_.resize(layers_.size());
  tables_.resize(layers_.size());
  calibration_max_.assign(layers_.size(), 0.0);
  program_chip(0, 0.0);
}

void CpuCimBackend::program_chip(uint32_t trial, double sigma) {
  if (!(sigma >= 0) || !std::isfinite(sigma))
    throw UserError("σ must be a finite number ≥ 0, got " + std::to_string(sigma));
  trial_ = trial;
  sigma_ = sigma;
  // A chip that stays fixed for every read is tabulated once here; `cycle` reads draw afresh.
  const bool tabulate = reads_ == CpuReads::kLookup && !config_.chip(sigma, trial, 0).redrawn_per_read();
  for (const QuantisedLayer& layer : layers_) {
    tables_[layer.index].clear();
    if (layer.digital) continue;
    operands_[layer.index].resize(layer.subarrays());
    if (tabulate) tables_[layer.index].resize(layer.subarrays());
    for (int s = 0; s < layer.subarrays(); ++s) {
      program_subarray(layer.index, s, 0, operands_[layer.index][s]);
      if (tabulate) build_lookup_table(layer.index, s, tables_[layer.index][s]);
    }
  }
}

// Entry (g, pattern, column) = the sum cim::lookup_table_entry defines over the operand's row
// `column`, sub-array rows 4g … 4g + 3; the padding columns stay 0.
void CpuCimBackend::build_lookup_table(int index, int s, std::vector<float>& table) const {
  const QuantisedLayer& layer = layers_[index];
  const int width = layer.subarray_begin[s + 1] - layer.subarray_begin[s];
  const int columns =
      config_.cells_per_weight() * layer.spec.out_channels + chip(index).reference_rows();
  const int groups = cim::lookup_groups(width), stride = cim::lookup_stride(columns);
  const std::vector<float>& operand = operands_[index][s];  // [column][row]
  table.assign(size_t(groups) * cim::kLookupPatterns * stride, 0.0f);
  for (int g = 0; g < groups; ++g) {
    const int first = g * cim::kLookupRows, rows = std::min(cim::kLookupRows, width - first);
    for (int pattern = 0; pattern < cim::kLookupPatterns; ++pattern) {
      float* entry = table.data() + (size_t(g) * cim::kLookupPatterns + pattern) * stride;
      for (int c = 0; c < columns; ++c)
        entry[c] = cim::lookup_table_entry(&operand[size_t(c) * width + first], 1, rows, pattern);
    }
  }
}

size_t CpuCimBackend::lookup_table_bytes() const {
  size_t bytes = 0;
  for (const auto& layer : tables_)
    for (const std::vector<float>& table : layer) bytes += table.size() * sizeof(float);
  return bytes;
}

size_t lookup_table_bytes(const CimLayerSpec& spec, const CimConfig& config, double sigma) {
  QuantisedLayer shape;
  map_rows(spec, config.mapping, config.subarray_rows, shape);
  const int columns =
      config.cells_per_weight() * spec.out_channels + config.chip(sigma, 0, 0).reference_rows();
  size_t bytes = 0;
  for (int s = 0; s < shape.subarrays(); ++s)
    bytes += size_t(cim::lookup_groups(shape.subarray_begin[s + 1] - shape.subarray_begin[s])) *
             cim::kLookupPatterns * cim::lookup_stride(columns) * sizeof(float);
  return bytes;
}

void CpuCimBackend::program_subarray(int index, int s, uint32_t read,
                                     std::vector<float>& operand) const {
  const QuantisedLayer& layer = layers_[index];
  const cim::ChipModel chip = this->chip(index);
  const int outs = layer.spec.out_channels, rows = layer.spec.rows(), slices = chip.slices;
  const int r0 = layer.subarray_begin[s], width = layer.subarray_rows(s);
  const int ref_rows = chip.reference_rows();
  operand.assign(size_t(slices * outs + ref_rows) * width, 0.0f);

#pragma omp parallel for schedule(static) if (size_t(width) * outs * slices >= 4096)
  for (int k = 0; k < width; ++k) {
    const int logical = layer.mapped_to_logical[r0 + k];
    for (int o = 0; o < outs; ++o)
      chip.program_weight(layer.levels[size_t(o) * rows + logical],
                          (uint64_t(o) * rows + logical) * slices, read,
                          &operand[size_t(o) * width + k], int64_t(outs) * width);
    for (int m = 0; m < ref_rows; ++m)
      operand[size_t(slices * outs + m) * width + k] = chip.reference_cell(logical, m, read);
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
  const std::vector<double> weights = digital_weights(layer, config_);
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

// How one read's partial sums become ADC codes, for one chunk of columns: the layer's read set-up
// and the read's own sub-array rows and dynamic ranges.
struct ReadContext : cim::ReadSetup {
  int subarray_rows = 0;
  // dynamic ADC ranges per slice: weights, then reference
  const double* lo = nullptr;
  const double* hi = nullptr;
  const double* ref_lo = nullptr;
  const double* ref_hi = nullptr;
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

// codes[q] += code_weight·k(P[q]) over one output row (cim::add_code): the hot loop of the GEMM
// reads, instantiated per ADC kind so that it vectorises.
template <bool kClean, class Code>
void add_codes_row(const PartialSum<kClean>& partial, const Code& code,
                   const float* __restrict row, const float* __restrict counts, double code_weight,
                   double* __restrict codes, int cols) {
#pragma omp simd
  for (int q = 0; q < cols; ++q) codes[q] = cim::add_code(codes[q], code_weight, code(partial(row[q], counts[q])));
}

// Calls body(code, adc) with the branch-free code function of one read's ADC: at σ = 0 (`clean`)
// the exact division by the step, at σ > 0 the multiplication by its reciprocal (cim_math.h);
// `adc` gives the code's offset and step.
template <class Body>
void with_code(const cim::DynamicAdc& adc, bool clean, const Body& body) {
  if (adc.identity)
    body([](double x) { return x; }, adc);
  else if (clean)
    body([adc](double x) { return adc.code(x); }, adc);
  else
    body([adc](double x) { return adc.code_noisy(x); }, adc);
}
template <class Body>
void with_code(const cim::FixedAdc& adc, bool clean, const Body& body) {
  if (!(adc.step > 0.0))
    body([](double) { return 0.0; }, adc);
  else if (clean)
    body([adc](double x) { return adc.code(x); }, adc);
  else
    body([adc](double x) { return adc.code_noisy(x); }, adc);
}
template <class Body>
void with_code(const cim::IdealAdc& adc, bool, const Body& body) {
  body([](double x) { return x; }, adc);
}

// One read of a chunk in the order of cim::add_code / cim::add_common: codes[o][q] (row stride
// acc_ld) and the positions' common part common[q].
template <bool kClean, class MakeAdc>
void accumulate_chunk_for(const ReadContext& ctx, const MakeAdc& make_adc, const float* p, int ld,
                          int cols, int bit, double* codes, int acc_ld, double* common) {
  const PartialSum<kClean> partial{cim::CleanPartialSum(ctx.cell_bits, ctx.inv_onoff)};
  const float* counts = p + size_t(ctx.slices * ctx.outs) * ld;
  for (int m = 0; m < ctx.slices; ++m) {
    const double weight = cim::read_weight(ctx.gain, bit, m, ctx.cell_bits);
    const auto ref_adc = make_adc(ctx.ref_lo[m], ctx.ref_hi[m], ctx.subarray_rows);
    with_code(make_adc(ctx.lo[m], ctx.hi[m], ctx.subarray_rows), kClean,
              [&](const auto& code, const auto& adc) {
                const double offset = adc.code_offset();
                for (int q = 0; q < cols; ++q)
                  common[q] = cim::add_common(common[q], weight, offset,
                                              ref_adc(reference_sum(ctx, p, ld, q, m),
                                                      ctx.ref_rows > 1));
                const double code_weight = cim::mul_rn(weight, adc.code_step());
                for (int o = 0; o < ctx.outs; ++o)
                  add_codes_row(partial, code, p + size_t(m * ctx.outs + o) * ld, counts,
                                code_weight, codes + size_t(o) * acc_ld, cols);
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

// Calls run(make_adc) with the ADC of ctx.adc: make_adc(lo, hi, rows) gives the ADC of one read
// and slice (lo, hi: its dynamic range, used by `dynamic` only).
// slice (lo, hi: its dynamic range, used by `dynamic` only; rows: the sub-array's rows, `fixed`).
template <class Run>
double with_adc(const ReadContext& ctx, const Run& run) {
  switch (ctx.adc) {
    case AdcMode::kDynamic:
      return run([&](double lo, double hi, int) { return cim::DynamicAdc(lo, hi, ctx.adc_bits); });
    case AdcMode::kFixed:
      return run([&](double, double, int rows) {
        return cim::FixedAdc(double(rows) * cim::max_code(ctx.cell_bits), ctx.adc_bits);
      });
    case AdcMode::kCalibrated:
      return run([&](double, double, int) {
        return cim::FixedAdc(ctx.calibrated_full_scale, ctx.adc_bits);
      });
    case AdcMode::kIdeal:
      return run([](double, double, int) { return cim::IdealAdc(); });
  }
  return 0;
}

// ADC and shift-and-add of one read for a chunk: 2^t·2^(cb·m)·gain·(Q(P) − Q(Pref)) added in the
// order of cim::add_code (into acc[o][q]) and cim::add_common (into common[q]).
// Returns the largest partial sum of the read when it is the exact one (ADC calibration), else 0.
double accumulate_chunk(const ReadContext& ctx, const float* p, int ld, int cols, int bit,
                        double* acc, int acc_ld, double* common) {
  if (ctx.ideal_clean) return accumulate_exact_chunk(ctx, p, ld, cols, bit, acc, acc_ld);
  return with_adc(ctx, [&](const auto& make_adc) {
    if (ctx.clean)
      accumulate_chunk_for<true>(ctx, make_adc, p, ld, cols, bit, acc, acc_ld, common);
    else
      accumulate_chunk_for<false>(ctx, make_adc, p, ld, cols, bit, acc, acc_ld, common);
    return 0.0;
  });
}

// Every chunk's dynamic ranges [chunk][read][lo, hi, ref_lo, ref_hi][slice] merged into the
// layer's per-read ranges (min and max: the same in any order).
void merge_ranges(const std::vector<double>& found, int chunks, int reads, int slices,
                  std::vector<double>& lo, std::vector<double>& hi, std::vector<double>& ref_lo,
                  std::vector<double>& ref_hi) {
  const double inf = std::numeric_limits<double>::infinity();
  std::fill(lo.begin(), lo.end(), inf);
  std::fill(ref_lo.begin(), ref_lo.end(), inf);
  std::fill(hi.begin(), hi.end(), -inf);
  std::fill(ref_hi.begin(), ref_hi.end(), -inf);
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

// ---------------------------------------------------------------------------------------------
// Table-lookup reads (device chips): kernels/lookup_read.h gives the order of every sum; the
// loops below run it for a tile of output positions at once, the columns vectorised.

// Output positions per tile: the tile's partial sums and accumulators stay in L1/L2.
constexpr int kTile = 32;

// The bit patterns of one tile and sub-array: patterns[(t·groups + g)·kTile + q], bit i of each
// the bit t of row i's level (cim::lookup_pattern), built row by row so that the loops over the
// tile's positions vectorise.
void tile_patterns(const QuantisedLayer& layer, int s, const std::vector<uint16_t>& mapped,
                   int npos, int q0, int cols, int input_bits, std::vector<uint8_t>& patterns) {
  const int r0 = layer.subarray_begin[s], width = layer.subarray_begin[s + 1] - r0;
  const int groups = cim::lookup_groups(width);
  patterns.resize(size_t(input_bits) * groups * kTile);
  for (int g = 0; g < groups; ++g) {
    const int rows = std::min(cim::kLookupRows, width - g * cim::kLookupRows);
    const uint16_t* levels = mapped.data() + size_t(r0 + g * cim::kLookupRows) * npos + q0;
    for (int t = 0; t < input_bits; ++t) {
      uint8_t* __restrict out = patterns.data() + (size_t(t) * groups + g) * kTile;
      for (int q = 0; q < cols; ++q) out[q] = 0;
      for (int i = 0; i < rows; ++i) {
        const uint16_t* __restrict row = levels + size_t(i) * npos;
        for (int q = 0; q < cols; ++q) out[q] |= uint8_t(((row[q] >> t) & 1) << i);
      }
    }
  }
}

// Eight float lanes (GCC/Clang vector extension; may sit at any float's address). The lanes are
// independent columns, so the width changes the speed, never a sum.
typedef float Lanes __attribute__((vector_size(32), aligned(4), may_alias));
static_assert(cim::kLookupColumnAlign == 8, "a table row is a whole number of Lanes");

// Columns [c0, c0 + 8·kBlocks) of one position: group 0's entry, then groups 1, 2, … added, held
// in registers over all groups.
template <int kBlocks>
inline void position_partial_sums(const float* __restrict table, int stride, int groups,
                                  const uint8_t* __restrict patterns, int c0,
                                  float* __restrict out) {
  const Lanes* first = reinterpret_cast<const Lanes*>(table + size_t(patterns[0]) * stride + c0);
  Lanes sum[kBlocks];
#pragma GCC unroll 8
  for (int b = 0; b < kBlocks; ++b) sum[b] = first[b];
  for (int g = 1; g < groups; ++g) {
    const Lanes* entry = reinterpret_cast<const Lanes*>(
        table + (size_t(g) * cim::kLookupPatterns + patterns[g * kTile]) * stride + c0);
#pragma GCC unroll 8
    for (int b = 0; b < kBlocks; ++b) sum[b] = sum[b] + entry[b];
  }
  Lanes* dst = reinterpret_cast<Lanes*>(out + c0);
#pragma GCC unroll 8
  for (int b = 0; b < kBlocks; ++b) dst[b] = sum[b];
}

// Partial sums of one read for every position of a tile: p[q·stride + column], each column the
// sum cim::lookup_partial_sum defines (group 0's entry, then groups 1, 2, … added in turn).
void tile_partial_sums(const std::vector<float>& table, int stride, int groups,
                       const uint8_t* patterns, int cols, float* __restrict p) {
  constexpr int kWide = 4;  // 32 columns per pass: four registers of sums
  for (int q = 0; q < cols; ++q) {
    float* out = p + size_t(q) * stride;
    int c0 = 0;
    for (; c0 + 8 * kWide <= stride; c0 += 8 * kWide)
      position_partial_sums<kWide>(table.data(), stride, groups, patterns + q, c0, out);
    for (; c0 < stride; c0 += 8)
      position_partial_sums<1>(table.data(), stride, groups, patterns + q, c0, out);
  }
}

// What the ADC of slice m sees for a position's weights: the partial sum in level units.
template <bool kClean>
inline double level_units(const cim::CleanPartialSum& clean, float raw, double count) {
  return kClean ? clean(double(raw), count) : double(raw);
}

inline double position_reference(const ReadContext& ctx, const float* p, int m) {
  const float* ref = p + ctx.slices * ctx.outs;
  return ctx.ref_rows == 1 ? cim::mul_rn(ctx.g_ref, double(ref[0])) : double(ref[m]);
}

// Smallest and largest of row[0 … n), eight lanes at a time (min and max: any order).
inline void row_min_max(const float* row, int n, float* lo, float* hi) {
  float mn = std::numeric_limits<float>::infinity(), mx = -mn;
  int o = 0;
  if (n >= 8) {
    Lanes vmn = *reinterpret_cast<const Lanes*>(row), vmx = vmn;
    for (o = 8; o + 8 <= n; o += 8) {
      const Lanes v = *reinterpret_cast<const Lanes*>(row + o);
      vmn = v < vmn ? v : vmn;
      vmx = v > vmx ? v : vmx;
    }
    for (int l = 0; l < 8; ++l) {
      mn = vmn[l] < mn ? vmn[l] : mn;
      mx = vmx[l] > mx ? vmx[l] : mx;
    }
  }
  for (; o < n; ++o) {
    mn = row[o] < mn ? row[o] : mn;
    mx = row[o] > mx ? row[o] : mx;
  }
  *lo = mn;
  *hi = mx;
}

// Every read of one chunk, tile by tile, in the order sub-array, input bit: per tile of positions
// [q0, q0 + tile), begin_tile(tile), then for each read the tile's partial sums in `p`
// (p[q·stride + column]) and read(s, t, rows, tile), then end_tile(q0, tile).
template <class BeginTile, class Read, class EndTile>
void for_each_tile_read(const QuantisedLayer& layer,
                        const std::vector<std::vector<float>>& tables, int stride,
                        const std::vector<uint16_t>& mapped, int npos, int n0, int cols,
                        int input_bits, std::vector<uint8_t>& patterns, std::vector<float>& p,
                        const BeginTile& begin_tile, const Read& read, const EndTile& end_tile) {
  for (int q0 = 0; q0 < cols; q0 += kTile) {
    const int tile = std::min(kTile, cols - q0);
    begin_tile(tile);
    for (int s = 0; s < layer.subarrays(); ++s) {
      const int rows = layer.subarray_begin[s + 1] - layer.subarray_begin[s];
      const int groups = cim::lookup_groups(rows);
      tile_patterns(layer, s, mapped, npos, n0 + q0, tile, input_bits, patterns);
      for (int t = 0; t < input_bits; ++t) {
        tile_partial_sums(tables[s], stride, groups, patterns.data() + size_t(t) * groups * kTile,
                          tile, p.data());
        read(s, t, rows, tile);
      }
    }
    end_tile(q0, tile);
  }
}

// ADC `dynamic`, first pass: every read's ranges over one chunk, from its partial sums (the
// partial sum in level units rises with the raw sum, so the raw min and max are converted).
template <bool kClean>
void lookup_ranges_chunk(const ReadContext& ctx, const QuantisedLayer& layer,
                         const std::vector<std::vector<float>>& tables, int stride,
                         const std::vector<uint16_t>& mapped, int npos, int n0, int cols,
                         int input_bits, double* found, std::vector<uint8_t>& patterns,
                         std::vector<float>& p) {
  const cim::CleanPartialSum clean(ctx.cell_bits, ctx.inv_onoff);
  const int slices = ctx.slices, outs = ctx.outs, reads = layer.subarrays() * input_bits;
  const double inf = std::numeric_limits<double>::infinity();
  for (int i = 0; i < reads * slices; ++i) {
    found[size_t(i / slices) * slices * 4 + i % slices] = inf;
    found[size_t(i / slices) * slices * 4 + slices + i % slices] = -inf;
    found[size_t(i / slices) * slices * 4 + 2 * slices + i % slices] = inf;
    found[size_t(i / slices) * slices * 4 + 3 * slices + i % slices] = -inf;
  }
  for_each_tile_read(
      layer, tables, stride, mapped, npos, n0, cols, input_bits, patterns, p, [](int) {},
      [&](int s, int t, int, int tile) {
        double* at = found + size_t(s * input_bits + t) * slices * 4;
        for (int q = 0; q < tile; ++q) {
          const float* pq = p.data() + size_t(q) * stride;
          const double count = double(pq[slices * outs]);
          for (int m = 0; m < slices; ++m) {
            float mn, mx;
            row_min_max(pq + m * outs, outs, &mn, &mx);
            at[m] = std::min(at[m], level_units<kClean>(clean, mn, count));
            at[slices + m] = std::max(at[slices + m], level_units<kClean>(clean, mx, count));
            const double ref = position_reference(ctx, pq, m);
            at[2 * slices + m] = std::min(at[2 * slices + m], ref);
            at[3 * slices + m] = std::max(at[3 * slices + m], ref);
          }
        }
      },
      [](int, int) {});
}

// A tile's accumulators: the codes' part [q][o] and the part common to a position's outputs [q]
// (cim::add_code, cim::add_common), zeroed per tile and written to acc[o][position] as their sum.
struct TileSums {
  std::vector<double> codes, common;
  void clear(int tile, int outs) {
    std::fill(codes.begin(), codes.begin() + size_t(tile) * outs, 0.0);
    std::fill(common.begin(), common.begin() + tile, 0.0);
  }
  void write(int tile, int outs, int npos, int first, double* acc) const {
    for (int q = 0; q < tile; ++q)
      for (int o = 0; o < outs; ++o)
        acc[size_t(o) * npos + first + q] = cim::add_rn(codes[size_t(q) * outs + o], common[q]);
  }
};

// The read, the ADC and the shift-and-add of one chunk, fused per tile: for every sub-array and
// input bit the tile's partial sums are looked up, converted and added into the tile's sums in
// the order of cim::add_code and cim::add_common (sub-array, bit, slice).
template <bool kClean, class MakeAdc>
void lookup_accumulate_chunk(const ReadContext& ctx, const MakeAdc& make_adc,
                             const QuantisedLayer& layer,
                             const std::vector<std::vector<float>>& tables, int stride,
                             const std::vector<uint16_t>& mapped, int npos, int n0, int cols,
                             int input_bits, const double* lo, const double* hi,
                             const double* ref_lo, const double* ref_hi, double* acc,
                             std::vector<uint8_t>& patterns, std::vector<float>& p,
                             TileSums& sums) {
  const cim::CleanPartialSum clean(ctx.cell_bits, ctx.inv_onoff);
  const int slices = ctx.slices, outs = ctx.outs;
  const bool noisy_reference = ctx.ref_rows > 1;
  for_each_tile_read(
      layer, tables, stride, mapped, npos, n0, cols, input_bits, patterns, p,
      [&](int tile) { sums.clear(tile, outs); },
      [&](int s, int t, int rows, int tile) {
        const size_t read = size_t(s) * input_bits + t;
        for (int m = 0; m < slices; ++m) {
          const double weight = cim::read_weight(ctx.gain, t, m, ctx.cell_bits);
          const auto ref_adc = make_adc(ref_lo[read * slices + m], ref_hi[read * slices + m], rows);
          const auto adc_of_read = make_adc(lo[read * slices + m], hi[read * slices + m], rows);
          const double offset = adc_of_read.code_offset();
          // The reference's level Q(Pref) = its offset + step·code, per position, in one loop
          // over the tile that vectorises (the reference is noise-free unless it varies itself).
          with_code(ref_adc, !noisy_reference, [&](const auto& ref_code, const auto& adc) {
            const double ref_offset = adc.code_offset(), ref_step = adc.code_step();
            double* __restrict common = sums.common.data();
            const float* __restrict ref = p.data() + slices * outs + (ctx.ref_rows == 1 ? 0 : m);
            const bool counted = ctx.ref_rows == 1;  // the all-ones row: Pref = g_ref·Σb
            for (int q = 0; q < tile; ++q) {
              const double x = counted ? cim::mul_rn(ctx.g_ref, double(ref[size_t(q) * stride]))
                                       : double(ref[size_t(q) * stride]);
              const double level = cim::add_rn(ref_offset, cim::mul_rn(ref_step, ref_code(x)));
              common[q] = cim::add_common(common[q], weight, offset, level);
            }
          });
          with_code(adc_of_read, kClean,
                    [&](const auto& code, const auto& adc) {
                      const double code_weight = cim::mul_rn(weight, adc.code_step());
                      for (int q = 0; q < tile; ++q) {
                        const float* pq = p.data() + size_t(q) * stride;
                        const float* __restrict row = pq + m * outs;
                        double* __restrict out = sums.codes.data() + size_t(q) * outs;
                        const double count = double(pq[slices * outs]);
#pragma omp simd
                        for (int o = 0; o < outs; ++o)
                          out[o] = cim::add_code(out[o], code_weight,
                                                 code(level_units<kClean>(clean, row[o], count)));
                      }
                    });
        }
      },
      [&](int q0, int tile) { sums.write(tile, outs, npos, n0 + q0, acc); });
}

// The σ = 0, ideal-ADC read by table look-up (and ADC calibration): 2·Σd·b − L·Σb exactly.
double lookup_exact_chunk(const ReadContext& ctx, const QuantisedLayer& layer,
                          const std::vector<std::vector<float>>& tables, int stride,
                          const std::vector<uint16_t>& mapped, int npos, int n0, int cols,
                          int input_bits, double* acc, std::vector<uint8_t>& patterns,
                          std::vector<float>& p, TileSums& sums) {
  const cim::CleanPartialSum clean(ctx.cell_bits, ctx.inv_onoff);
  const int slices = ctx.slices, outs = ctx.outs;
  const double levels = cim::max_code(ctx.cell_bits);
  double largest = 0;
  for_each_tile_read(
      layer, tables, stride, mapped, npos, n0, cols, input_bits, patterns, p,
      [&](int tile) { sums.clear(tile, outs); },
      [&](int, int t, int, int tile) {
        for (int q = 0; q < tile; ++q) {
          const float* pq = p.data() + size_t(q) * stride;
          const double count = double(pq[slices * outs]);
          largest = std::max(largest, cim::mul_rn(ctx.g_ref, count));
          double* out = sums.codes.data() + size_t(q) * outs;
          for (int m = 0; m < slices; ++m) {
            const double place = std::ldexp(1.0, t + ctx.cell_bits * m);
            for (int o = 0; o < outs; ++o) {
              const float raw = pq[m * outs + o];
              largest = std::max(largest, clean(double(raw), count));
              out[o] += place * (2.0 * double(raw) - levels * count);
            }
          }
        }
      },
      [&](int q0, int tile) { sums.write(tile, outs, npos, n0 + q0, acc); });
  return largest;
}

// The lookup path of run_cim: the same chunks of output positions as the GEMM path, each run on
// its own, so that the result does not depend on the thread count.
double lookup_layer(const ReadContext& ctx, const QuantisedLayer& layer,
                    const std::vector<std::vector<float>>& tables, int input_bits,
                    const std::vector<uint16_t>& mapped, int npos, std::vector<double>& acc) {
  const int slices = ctx.slices, outs = ctx.outs;
  const int stride = cim::lookup_stride(slices * outs + ctx.ref_rows);
  const int reads = layer.subarrays() * input_bits;
  const int chunks = (npos + kChunk - 1) / kChunk;
  int max_groups = 0;
  for (int s = 0; s < layer.subarrays(); ++s)
    max_groups = std::max(
        max_groups, cim::lookup_groups(layer.subarray_begin[s + 1] - layer.subarray_begin[s]));
  // Each thread's tile buffers: bit patterns, partial sums, accumulators.
  struct Scratch {
    std::vector<uint8_t> patterns;
    std::vector<float> p;
    TileSums sums;
  };
  auto make_scratch = [&] {
    return Scratch{std::vector<uint8_t>(size_t(input_bits) * max_groups * kTile),
                   std::vector<float>(size_t(kTile) * stride),
                   TileSums{std::vector<double>(size_t(kTile) * outs), std::vector<double>(kTile)}};
  };

  const size_t ranges = size_t(reads) * slices;
  std::vector<double> lo(ranges), hi(ranges), ref_lo(ranges), ref_hi(ranges);
  if (ctx.adc == AdcMode::kDynamic) {
    std::vector<double> found(size_t(chunks) * ranges * 4);
#pragma omp parallel if (chunks > 1)
    {
      Scratch scratch = make_scratch();
#pragma omp for schedule(dynamic)
      for (int chunk = 0; chunk < chunks; ++chunk) {
        const int n0 = chunk * kChunk, cols = std::min(kChunk, npos - n0);
        double* at = &found[size_t(chunk) * ranges * 4];
        if (ctx.clean)
          lookup_ranges_chunk<true>(ctx, layer, tables, stride, mapped, npos, n0, cols, input_bits,
                                    at, scratch.patterns, scratch.p);
        else
          lookup_ranges_chunk<false>(ctx, layer, tables, stride, mapped, npos, n0, cols, input_bits,
                                     at, scratch.patterns, scratch.p);
      }
    }
    merge_ranges(found, chunks, reads, slices, lo, hi, ref_lo, ref_hi);
  }

  double largest = 0;
#pragma omp parallel if (chunks > 1) reduction(max : largest)
  {
    Scratch scratch = make_scratch();
    std::vector<uint8_t>& patterns = scratch.patterns;
    std::vector<float>& p = scratch.p;
    TileSums& sums = scratch.sums;
#pragma omp for schedule(dynamic)
    for (int chunk = 0; chunk < chunks; ++chunk) {
      const int n0 = chunk * kChunk, cols = std::min(kChunk, npos - n0);
      if (ctx.ideal_clean) {
        largest =
            std::max(largest, lookup_exact_chunk(ctx, layer, tables, stride, mapped, npos, n0, cols,
                                                 input_bits, acc.data(), patterns, p, sums));
        continue;
      }
      with_adc(ctx, [&](const auto& make_adc) {
        if (ctx.clean)
          lookup_accumulate_chunk<true>(ctx, make_adc, layer, tables, stride, mapped, npos, n0,
                                        cols, input_bits, lo.data(), hi.data(), ref_lo.data(),
                                        ref_hi.data(), acc.data(), patterns, p, sums);
        else
          lookup_accumulate_chunk<false>(ctx, make_adc, layer, tables, stride, mapped, npos, n0,
                                         cols, input_bits, lo.data(), hi.data(), ref_lo.data(),
                                         ref_hi.data(), acc.data(), patterns, p, sums);
        return 0.0;
      });
    }
  }
  return largest;
}

}  // namespace

void CpuCimBackend::run_cim(const QuantisedLayer& layer, const std::vector<uint16_t>& mapped,
                            int npos, std::vector<double>& acc) {
  const cim::ChipModel chip = this->chip(layer.index);
  const bool calibrating = calibrating_;
  ReadContext ctx;
  static_cast<cim::ReadSetup&>(ctx) =
      cim::make_read_setup(chip, layer.spec.out_channels, config_.adc, config_.adc_bits,
                           config_.input_bits, calibrating, layer.adc_full_scale);
  const int outs = ctx.outs, slices = ctx.slices;
  const int operand_rows = ctx.operand_rows();
  const bool dynamic = ctx.adc == AdcMode::kDynamic;
  const bool cycle = chip.redrawn_per_read();
  if (ctx.adc == AdcMode::kCalibrated && !(layer.adc_full_scale > 0))
    throw UserError("ADC 'calibrated' needs a calibration run first (internal: layer '" +
                    layer.spec.name + "' has no range)");
  const int chunks = (npos + kChunk - 1) / kChunk;

  if (!cycle && !tables_[layer.index].empty()) {  // tabulated by program_chip
    const double largest =
        lookup_layer(ctx, layer, tables_[layer.index], config_.input_bits, mapped, npos, acc);
    if (calibrating)
      calibration_max_[layer.index] = std::max(calibration_max_[layer.index], largest);
    return;
  }
  const int subarrays = layer.subarrays(), input_bits = config_.input_bits;
  const int reads = subarrays * input_bits;  // reads per cell slice
  // Mode `cycle` draws every read's conductances afresh: program them all up front, so that the
  // chunks below can run every read on their own.
  std::vector<std::vector<float>> read_operands;
  if (cycle) {
    read_operands.resize(reads);
    for (int s = 0; s < subarrays; ++s)
      for (int bit = 0; bit < input_bits; ++bit)
        program_subarray(layer.index, s, cim::ChipModel::cycle_read(batch_index_, input_bits, bit),
                         read_operands[s * input_bits + bit]);
  }
  const std::vector<std::vector<float>>& operands = operands_[layer.index];

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
    merge_ranges(found, chunks, reads, slices, lo, hi, ref_lo, ref_hi);
  }

  double largest = 0;
#pragma omp parallel if (chunks > 1) reduction(max : largest)
  {
    std::vector<float> bits(size_t(max_width) * kChunk), p(size_t(operand_rows) * kChunk);
    std::vector<double> tile(size_t(outs) * kChunk), common(kChunk);
    ReadContext read_ctx = ctx;
#pragma omp for schedule(dynamic)
    for (int chunk = 0; chunk < chunks; ++chunk) {
      const int n0 = chunk * kChunk, cols = std::min(kChunk, npos - n0);
      std::fill(tile.begin(), tile.begin() + size_t(outs) * cols, 0.0);
      std::fill(common.begin(), common.end(), 0.0);
      for (int read = 0; read < reads; ++read) {
        const int s = read / input_bits, bit = read % input_bits;
        gemm_read(s, bit, n0, cols, bits, p.data());
        read_ctx.subarray_rows = layer.subarray_begin[s + 1] - layer.subarray_begin[s];
        read_ctx.lo = &lo[size_t(read) * slices];
        read_ctx.hi = &hi[size_t(read) * slices];
        read_ctx.ref_lo = &ref_lo[size_t(read) * slices];
        read_ctx.ref_hi = &ref_hi[size_t(read) * slices];
        largest = std::max(largest, accumulate_chunk(read_ctx, p.data(), cols, cols, bit,
                                                     tile.data(), cols, common.data()));
      }
      for (int o = 0; o < outs; ++o)
        for (int q = 0; q < cols; ++q)
          acc[size_t(o) * npos + n0 + q] = cim::add_rn(tile[size_t(o) * cols + q], common[q]);
    }
  }
  if (calibrating) calibration_max_[layer.index] = std::max(calibration_max_[layer.index], largest);
}

}  // namespace cimsweep
