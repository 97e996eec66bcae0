// Backends against each other, in the style of ggml's test-backend-ops: every layer shape over
// awkward sizes (channels 3, 33, 130, 132, 260; kernels 1, 3, 5; stride 2; batches 1, 2, 7;
// sub-arrays that do not divide the rows) × every ADC and variation mode, on fresh random inputs
// with printed seeds.
//
//  * Always (no GPU needed): the backend choice (--backend auto|cpu|cuda), and the CPU reference
//    of the CUDA kernels (cuda/cim_reference.cpp, the same per-element code the kernels run)
//    against CpuCimBackend — so the GPU's numerics are checked before any GPU runs them. The two
//    sum partial sums, ADC codes and the split shift-and-add in the same order (cim-model.md §4
//    and §5, "Summation order"), so they agree bit for bit: layer outputs and whole-network logits,
//    every ADC, σ from 0 to 0.6. The one exception is a `cycle` chip at σ > 0, which the CPU reads
//    as OpenBLAS GEMMs (an order OpenBLAS picks per CPU); there the outputs that differ are counted
//    and bounded.
//  * With a GPU: CudaCimBackend against that reference (bit for bit) and so against CpuCimBackend
//    as the reference agrees with it; the fast mode within fp16 rounding; guard bytes after every
//    device buffer and after the host output, no NaN, outputs not all zero. Without a GPU, or in a
//    build without CUDA, these tests are skipped.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <iostream>
#include <random>
#include <string>
#include <vector>

#include "cuda/cim_ops.h"
#include "cuda/cim_plan.h"
#include "cuda/cim_reference.h"
#include "host/backends.h"
#include "common/errors.h"
#include "host/cpu/cim_cpu.h"
#include "host/io/model_file.h"
#include "kernels/lookup_read.h"
#include "tests/test_util.h"

#if defined(CIMSWEEP_HAVE_CUDA)
#include "cuda/cuda_backend.h"
#include "cuda/device_info.h"
#endif

namespace {

using namespace cimsweep;

// ---------------------------------------------------------------------------------------------
// Backend choice (pure logic, no GPU query)

GpuSurvey usable_gpu() {
  GpuSurvey s;
  s.built_with_cuda = true;
  s.description = "Test GPU (sm_90, 79.0 GiB free)";
  return s;
}

TEST(BackendChoice, CpuIsAlwaysTheCpu) {
  const BackendResolution r = decide_backend("cpu", 0, usable_gpu());
  EXPECT_EQ(r.choice.kind, BackendChoice::Kind::kCpu);
  EXPECT_EQ(r.reason, "requested");
}

TEST(BackendChoice, AutoTakesAUsableGpu) {
  const BackendResolution r = decide_backend("auto", 2, usable_gpu());
  EXPECT_EQ(r.choice.kind, BackendChoice::Kind::kCuda);
  EXPECT_EQ(r.choice.device, 2);
  EXPECT_EQ(r.reason, "Test GPU (sm_90, 79.0 GiB free)");
}

TEST(BackendChoice, AutoFallsBackToCpuAndSaysWhy) {
  GpuSurvey none;
  EXPECT_EQ(decide_backend("auto", 0, none).choice.kind, BackendChoice::Kind::kCpu);
  EXPECT_EQ(decide_backend("auto", 0, none).reason, "built without CUDA");
  GpuSurvey old = usable_gpu();
  old.unusable_reason = "GPU 0 (Old GPU) is sm_61; the CUDA backend needs sm_70 or newer";
  const BackendResolution r = decide_backend("auto", 0, old);
  EXPECT_EQ(r.choice.kind, BackendChoice::Kind::kCpu);
  EXPECT_EQ(r.reason, old.unusable_reason);
}

TEST(BackendChoice, CudaWithoutUsableGpuIsAUserErrorSayingWhy) {
  GpuSurvey none = usable_gpu();
  none.unusable_reason = "no GPU found";
  try {
    decide_backend("cuda", 0, none);
    FAIL() << "expected UserError";
  } catch (const UserError& e) {
    EXPECT_NE(std::string(e.what()).find("no GPU found"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("--backend cpu"), std::string::npos) << e.what();
  }
  EXPECT_THROW(decide_backend("cuda", 0, GpuSurvey{}), UserError);
  EXPECT_EQ(decide_backend("cuda", 1, usable_gpu()).choice.kind, BackendChoice::Kind::kCuda);
}

TEST(BackendChoice, UnknownNamesAndNegativeDevicesAreUserErrors) {
  EXPECT_THROW(decide_backend("gpu", 0, usable_gpu()), UserError);
  EXPECT_THROW(decide_backend("", 0, usable_gpu()), UserError);
  EXPECT_THROW(decide_backend("auto", -1, usable_gpu()), UserError);
  EXPECT_EQ(parse_precision("exact"), BackendChoice::Precision::kExact);
  EXPECT_EQ(parse_precision("fast"), BackendChoice::Precision::kFast);
  EXPECT_THROW(parse_precision("fp16"), UserError);
}

TEST(BackendChoice, ResolveOnThisMachineNeverThrowsForAutoAndCpu) {
  EXPECT_EQ(resolve_backend("cpu").choice.kind, BackendChoice::Kind::kCpu);
  const BackendResolution r = resolve_backend("auto");
  EXPECT_FALSE(r.reason.empty());
#if !defined(CIMSWEEP_HAVE_CUDA)
  EXPECT_EQ(r.choice.kind, BackendChoice::Kind::kCpu);
  EXPECT_EQ(r.reason, "built without CUDA");
  EXPECT_THROW(resolve_backend("cuda"), UserError);
#endif
}

TEST(BackendChoice, MakeBackendBuildsTheCpuBackendAndRefusesCudaWithoutOne) {
  std::vector<float> weight(2 * 3, 0.5f);
  CimLayerSpec spec;
  spec.name = "fc";
  spec.out_channels = 2;
  spec.in_channels = 3;
  spec.weight = weight.data();
  EXPECT_EQ(make_backend({}, {spec}, CimConfig{})->name(), "cpu");
  BackendChoice cuda;
  cuda.kind = BackendChoice::Kind::kCuda;
#if defined(CIMSWEEP_HAVE_CUDA)
  if (cuda_device_count() == 0) EXPECT_THROW(make_backend(cuda, {spec}, CimConfig{}), UserError);
#else
  EXPECT_THROW(make_backend(cuda, {spec}, CimConfig{}), UserError);
#endif
}

// ---------------------------------------------------------------------------------------------
// Order keys of the dynamic ADC's atomic min/max

TEST(OrderKeys, RoundTripAndPreserveOrder) {
  const double values[] = {-INFINITY, -1e300, -3.5, -1e-300, -0.0,
                           0.0,       1e-310, 2.0,  7e200,   INFINITY};
  for (size_t i = 0; i < std::size(values); ++i) {
    const double back = cimops::from_order_key(cimops::order_key(values[i]));
    EXPECT_EQ(std::memcmp(&back, &values[i], sizeof back), 0) << values[i];
    if (i > 0) EXPECT_LT(cimops::order_key(values[i - 1]), cimops::order_key(values[i]));
  }
}

// ---------------------------------------------------------------------------------------------
// Layer cases

struct Shape {
  const char* name;
  int in_channels, kernel, stride, rows, out_channels, images, h, w;
  Mapping mapping;
};

// Awkward sizes: first-layer RGB, channel counts that split unevenly over 128-row (or smaller)
// sub-arrays, 1×1 and 5×5 kernels, stride 2, an FC layer (1×1 map), single images.
const Shape kShapes[] = {
    {"rgb_k3_n7", 3, 3, 1, 128, 16, 7, 8, 8, Mapping::kKernel},
    {"c33_k3_s2_R20_n1", 33, 3, 2, 20, 17, 1, 7, 6, Mapping::kKernel},
    {"c130_k1_n7", 130, 1, 1, 128, 5, 7, 5, 5, Mapping::kKernel},
    {"c260_k3_dense_n1", 260, 3, 1, 128, 9, 1, 5, 4, Mapping::kDense},
    {"c16_k5_s2_R33_dense_n7", 16, 5, 2, 33, 8, 7, 9, 9, Mapping::kDense},
    {"fc64_n7", 64, 1, 1, 128, 10, 7, 1, 1, Mapping::kKernel},
    {"c33_k5_n2", 33, 5, 1, 128, 3, 2, 6, 7, Mapping::kKernel},
    {"c132_k1_o33_n2", 132, 1, 1, 128, 33, 2, 5, 3, Mapping::kKernel},  // a 4-row sub-array
    {"fc260_R132_dense_o33_n7", 260, 1, 1, 132, 33, 7, 1, 1, Mapping::kDense},
};

struct Mode {
  const char* name;
  AdcMode adc;
  double sigma;
  VariationMode variation = VariationMode::kDevice;
  bool reference_variation = false, clamp = false, all_digital = false;
  double onoff = 10;
  int adc_bits = 10;
};

const Mode kModes[] = {
    {"dynamic_clean", AdcMode::kDynamic, 0.0},
    {"dynamic_device", AdcMode::kDynamic, 0.1},
    {"fixed_clean", AdcMode::kFixed, 0.0},
    {"fixed_device", AdcMode::kFixed, 0.1},
    {"ideal_clean", AdcMode::kIdeal, 0.0},
    {"ideal_device", AdcMode::kIdeal, 0.1},
    {"calibrated_device", AdcMode::kCalibrated, 0.05},
    {"dynamic_cycle", AdcMode::kDynamic, 0.1, VariationMode::kCycle},
    {"ideal_cycle", AdcMode::kIdeal, 0.1, VariationMode::kCycle},
    {"dynamic_refvar_clamp", AdcMode::kDynamic, 0.15, VariationMode::kDevice, true, true},
    {"dynamic_onoff_inf_6bit", AdcMode::kDynamic, 0.2, VariationMode::kDevice, false, false, false,
     INFINITY, 6},
    {"digital", AdcMode::kDynamic, 0.1, VariationMode::kDevice, false, false, true},
    {"calibrated_clean", AdcMode::kCalibrated, 0.0},
    {"calibrated_device_sigma0p1", AdcMode::kCalibrated, 0.1},
    {"fixed_cycle", AdcMode::kFixed, 0.1, VariationMode::kCycle},
    {"calibrated_cycle_refvar", AdcMode::kCalibrated, 0.1, VariationMode::kCycle, true},
    {"ideal_refvar", AdcMode::kIdeal, 0.1, VariationMode::kDevice, true},
    // σ = 0.6: 1 + σz < 0 for z < −1/0.6, about 4.8 % of the cells, which clamp at 0 (or, without
    // clamping, turn negative).
    {"fixed_clamp_sigma0p6", AdcMode::kFixed, 0.6, VariationMode::kDevice, false, true},
    {"dynamic_refvar_clamp_sigma0p6", AdcMode::kDynamic, 0.6, VariationMode::kDevice, true, true},
    {"calibrated_negative_sigma0p6", AdcMode::kCalibrated, 0.6},
    {"dynamic_cycle_clamp_sigma0p6", AdcMode::kDynamic, 0.6, VariationMode::kCycle, false, true},
};

struct LayerData {
  CimLayerSpec spec;
  std::vector<float> weight, bias, input;
  int n = 1, h = 1, w = 1;
  size_t output_count() const {
    return size_t(n) * spec.out_channels * spec.output_size(h, spec.kernel_h) *
           spec.output_size(w, spec.kernel_w);
  }
};

LayerData make_layer(const Shape& s, uint32_t seed) {
  std::mt19937 rng(seed);
  LayerData d;
  d.spec.name = "layer";
  d.spec.out_channels = s.out_channels;
  d.spec.in_channels = s.in_channels;
  d.spec.kernel_h = d.spec.kernel_w = s.kernel;
  d.spec.stride = s.stride;
  d.spec.pad = s.kernel / 2;
  std::normal_distribution<float> normal(0.0f, 0.3f);
  d.weight.resize(size_t(s.out_channels) * d.spec.rows());
  for (float& v : d.weight) v = normal(rng);
  d.bias.resize(s.out_channels);
  for (float& v : d.bias) v = normal(rng);
  d.spec.weight = d.weight.data();
  d.spec.bias = d.bias.data();
  d.spec.input_range = 1.7f;
  d.n = s.images;
  d.h = s.h;
  d.w = s.w;
  std::uniform_real_distribution<float> uniform(-0.2f, 2.0f);  // some clip at 0 and at a_max
  d.input.resize(size_t(d.n) * s.in_channels * d.h * d.w);
  for (float& v : d.input) v = uniform(rng);
  return d;
}

CimConfig make_config(const Shape& s, const Mode& m) {
  CimConfig c;
  c.adc = m.adc;
  c.adc_bits = m.adc_bits;
  c.variation = m.variation;
  c.reference_variation = m.reference_variation;
  c.clamp_at_zero = m.clamp;
  c.onoff_ratio = m.onoff;
  c.subarray_rows = s.rows;
  c.mapping = s.mapping;
  c.seed = 11;
  return c;
}

constexpr uint32_t kTrial = 3, kBatch = 2;

// Runs one layer on a backend the way TrialRunner does: calibration on the clean chip first when
// the ADC is calibrated, then the chip of trial kTrial, batch kBatch.
std::vector<float> run_on(CimBackend& backend, const LayerData& d, const Mode& m) {
  if (m.adc == AdcMode::kCalibrated) {
    backend.program_chip(0, 0.0);
    backend.set_calibrating(true);
    std::vector<float> scratch(d.output_count());
    backend.begin_batch(0);
    backend.run_layer(0, d.input.data(), d.n, d.h, d.w, scratch.data());
    backend.set_calibrating(false);
  }
  backend.set_all_digital(m.all_digital);
  backend.program_chip(kTrial, m.sigma);
  backend.begin_batch(kBatch);
  // Guard words after the output: a backend must write exactly n·out·oh·ow floats.
  constexpr size_t kGuard = 16;
  const float sentinel = -12345.678f;
  std::vector<float> y(d.output_count() + kGuard, sentinel);
  backend.run_layer(0, d.input.data(), d.n, d.h, d.w, y.data());
  for (size_t i = d.output_count(); i < y.size(); ++i)
    EXPECT_EQ(y[i], sentinel) << "write past the output at " << i;
  y.resize(d.output_count());
  return y;
}

// The CPU reference of the CUDA kernels, driven like run_on.
std::vector<float> run_reference(const LayerData& d, const CimConfig& config, const Mode& m) {
  QuantisedLayer layer = quantise_layer(d.spec, 0, config, false);
  if (m.adc == AdcMode::kCalibrated) {
    cimref::LayerRun clean;
    clean.calibrating = true;
    double largest = 0;
    cimref::run_layer(layer, config, clean, d.input.data(), d.n, d.h, d.w, &largest);
    layer.adc_full_scale = largest;
  }
  cimref::LayerRun run;
  run.sigma = m.sigma;
  run.trial = kTrial;
  run.batch_index = kBatch;
  run.all_digital = m.all_digital;
  return cimref::run_layer(layer, config, run, d.input.data(), d.n, d.h, d.w);
}

struct Agreement {
  size_t count = 0, differ = 0, beyond = 0, nans = 0, nonzero = 0;
  double scale = 0, max_abs = 0, mean_abs = 0;
};

// `beyond`: outputs further apart than rel·(largest |want|).
Agreement compare(const std::vector<float>& got, const std::vector<float>& want, double rel) {
  Agreement a;
  a.count = want.size();
  EXPECT_EQ(got.size(), want.size());
  for (float v : want) a.scale = std::max(a.scale, double(std::fabs(v)));
  for (size_t i = 0; i < std::min(got.size(), want.size()); ++i) {
    if (std::isnan(got[i]) || std::isnan(want[i])) {
      ++a.nans;
      continue;
    }
    const double diff = std::fabs(double(got[i]) - double(want[i]));
    a.differ += got[i] != want[i];
    a.beyond += diff > rel * a.scale;
    a.nonzero += got[i] != 0.0f;
    a.max_abs = std::max(a.max_abs, diff);
    a.mean_abs += diff / double(a.count);
  }
  return a;
}

std::string describe(const Agreement& a) {
  return std::to_string(a.count) + " outputs: " + std::to_string(a.differ) + " differ, " +
         std::to_string(a.beyond) + " beyond tolerance, " + std::to_string(a.nans) +
         " NaN; max |diff| " + std::to_string(a.max_abs) + ", mean |diff| " +
         std::to_string(a.mean_abs) + ", scale " + std::to_string(a.scale);
}

// Whether CpuCimBackend reads the mode's chip by table look-up — every chip but a `cycle` one at
// σ > 0 — whose order of the partial sums the CUDA kernels keep (cim::lookup_order_sum); a digital
// layer has no reads and is exact.
bool cpu_reads_by_lookup(const Mode& m) {
  return m.all_digital || m.sigma == 0 || m.variation == VariationMode::kDevice;
}

// A `cycle` chip at σ > 0, which the CPU reads as OpenBLAS GEMMs: the partial sums differ from
// the look-up order in their last bits. With the ideal ADC that moves every output by float
// rounding only; with an ADC, where a partial sum lands on the other side of a code boundary the
// output moves by that read's step (a flipped reference code, under reference variation, moves
// every output of its position), and a `dynamic` range's ends move by rounding. Measured over the
// default seeds and CIMSWEEP_TEST_SEED=1…10 with the sgemm OpenBLAS picks on an Intel Xeon VM
// (495 cycle cases, 143 of them bit-identical): ideal ADC, none beyond 1e-5 of the scale, mean
// |diff| at most 1.06e-6 of it; with an ADC at most 3.9 % of the outputs beyond 1e-5 (7 of 180,
// dynamic), 6.1 % with reference variation (11 of 180, calibrated), mean |diff| at most 8.3e-5 of
// the scale. The bounds below are those maxima with room to about twice.
struct CycleBound {
  double beyond_share;  // outputs further apart than 1e-5·scale
  double mean_abs;      // mean |diff| over the scale
};
CycleBound cycle_bound(const Mode& m) {
  if (m.adc == AdcMode::kIdeal) return {0.0, 2e-6};
  return {m.reference_variation ? 1.0 / 10 : 1.0 / 16, 1.5e-4};
}

// Another executor against CpuCimBackend: bit for bit where the CPU reads by look-up, within
// the measured bounds of the cycle GEMMs elsewhere; never NaN, never mostly zero.
void expect_agreement_with_cpu(const Agreement& a, const Mode& m, const std::string& what) {
  EXPECT_EQ(a.nans, 0u) << what << ": " << describe(a);
  EXPECT_GT(a.nonzero, a.count / 2) << what << ": outputs mostly zero: " << describe(a);
  if (cpu_reads_by_lookup(m)) {
    EXPECT_EQ(a.differ, 0u) << what << ": must agree bit for bit: " << describe(a);
    return;
  }
  const CycleBound bound = cycle_bound(m);
  const double allowed =
      m.adc == AdcMode::kIdeal ? 0.0 : std::max(2.0, bound.beyond_share * a.count);
  EXPECT_LE(double(a.beyond), allowed)
      << what << ": more code flips than the GEMM's rounding explains: " << describe(a);
  EXPECT_LE(a.mean_abs, bound.mean_abs * a.scale) << what << ": " << describe(a);
}

struct Case {
  Shape shape;
  Mode mode;
};
void PrintTo(const Case& c, std::ostream* os) {  // readable test names in ctest and failures
  *os << c.shape.name << " / " << c.mode.name;
}

std::vector<Case> all_cases() {
  std::vector<Case> cases;
  for (const Shape& s : kShapes)
    for (const Mode& m : kModes) cases.push_back({s, m});
  return cases;
}

std::string case_name(const ::testing::TestParamInfo<Case>& info) {
  return std::string(info.param.shape.name) + "_" + info.param.mode.name;
}

uint32_t case_seed(const Case& c) {
  uint32_t h = 2166136261u;
  for (const char* p = c.shape.name; *p; ++p) h = (h ^ uint8_t(*p)) * 16777619u;
  return cimsweep::testing::test_seed(h % 100000);
}

// ---------------------------------------------------------------------------------------------
// The CPU reference of the CUDA kernels against CpuCimBackend (runs everywhere)

class ReferenceVsCpu : public ::testing::TestWithParam<Case> {};

TEST_P(ReferenceVsCpu, Agree) {
  const Case c = GetParam();
  const LayerData d = make_layer(c.shape, case_seed(c));  // prints the seed
  const CimConfig config = make_config(c.shape, c.mode);
  CpuCimBackend cpu({d.spec}, config);
  const std::vector<float> want = run_on(cpu, d, c.mode);
  const std::vector<float> got = run_reference(d, config, c.mode);
  const Agreement a = compare(got, want, 1e-5);
  std::cout << "[ agree    ] " << describe(a) << std::endl;
  expect_agreement_with_cpu(a, c.mode, "reference vs CPU");
}

INSTANTIATE_TEST_SUITE_P(Layers, ReferenceVsCpu, ::testing::ValuesIn(all_cases()), case_name);

// The partial sums of the CUDA kernels' reference (cimops::partial_sum) are the CPU backend's
// table look-ups (cim::lookup_partial_sum over CpuCimBackend::lookup_table), bit for bit, for
// every sub-array, input bit, column and position: sub-arrays of 20 and 13 rows (groups of 4 and
// a short last group), of 4 rows, and 132-row ones; σ = 0.1 with reference variation, and σ = 0.6
// without clamping (negative conductances).
TEST(Reference, PartialSumsAreTheCpuLookupReads) {
  Mode negative = kModes[1];
  negative.sigma = 0.6;
  size_t checked = 0, nonzero = 0;
  for (const Shape& s : {kShapes[1], kShapes[7], kShapes[8]}) {
    for (const Mode& m : {kModes[9], negative}) {
      const LayerData d = make_layer(s, 17);
      const CimConfig config = make_config(s, m);
      CpuCimBackend cpu({d.spec}, config);
      cpu.program_chip(kTrial, m.sigma);
      const QuantisedLayer& layer = cpu.layers()[0];
      const cimops::LayerGeometry g = cimops::make_geometry(d.spec, d.n, d.h, d.w);
      const std::vector<uint16_t> mapped =
          cimref::quantise_im2col(layer, config, d.input.data(), g);
      const int columns =
          config.cells_per_weight() * d.spec.out_channels + config.chip(m.sigma, 0, 0).reference_rows();
      const int stride = cim::lookup_stride(columns);
      for (int sub = 0; sub < layer.subarrays(); ++sub) {
        const int r0 = layer.subarray_begin[sub], width = layer.subarray_begin[sub + 1] - r0;
        const int groups = cim::lookup_groups(width);
        const std::vector<float> operand =
            cimref::program_subarray(layer, config, m.sigma, kTrial, sub, 0);
        for (int bit = 0; bit < config.input_bits; ++bit) {
          const std::vector<float> got =
              cimref::partial_sums(operand, columns, width, mapped, g.positions, r0, bit);
          std::vector<uint8_t> patterns(groups);
          for (int64_t q = 0; q < g.positions; ++q) {
            for (int gr = 0; gr < groups; ++gr)
              patterns[gr] = uint8_t(cim::lookup_pattern(
                  &mapped[size_t(r0 + gr * cim::kLookupRows) * g.positions + q], g.positions,
                  std::min(cim::kLookupRows, width - gr * cim::kLookupRows), bit));
            for (int c = 0; c < columns; ++c) {
              const float want = cim::lookup_partial_sum(cpu.lookup_table(0, sub).data(), stride,
                                                         groups, patterns.data(), 1, c);
              const float value = got[size_t(c) * g.positions + q];
              ASSERT_EQ(std::memcmp(&value, &want, sizeof value), 0)
                  << s.name << " " << m.name << " σ " << m.sigma << " sub-array " << sub << " bit "
                  << bit << " column " << c << " position " << q << ": " << value << " vs " << want;
              ++checked;
              nonzero += value != 0.0f;
            }
          }
        }
      }
    }
  }
  std::cout << "[ sums     ] " << checked << " partial sums bit for bit, " << nonzero << " non-zero"
            << std::endl;
  EXPECT_GT(nonzero, checked / 4);
}

// The CPU reference of the CUDA kernels as a CimBackend, so that a whole network runs through it
// as it would through CudaCimBackend's exact mode.
class ReferenceBackend : public CimBackend {
 public:
  ReferenceBackend(const std::vector<CimLayerSpec>& layers, const CimConfig& config)
      : config_(config), largest_(layers.size(), 0.0) {
    for (size_t i = 0; i < layers.size(); ++i)
      layers_.push_back(quantise_layer(layers[i], int(i), config, false));
  }
  std::string name() const override { return "cuda-reference"; }
  void program_chip(uint32_t trial, double sigma) override {
    run_.trial = trial;
    run_.sigma = sigma;
  }
  void set_calibrating(bool on) override {
    if (on) {
      std::fill(largest_.begin(), largest_.end(), 0.0);
    } else if (run_.calibrating) {
      for (QuantisedLayer& layer : layers_) layer.adc_full_scale = largest_[layer.index];
    }
    run_.calibrating = on;
  }
  void set_all_digital(bool on) override { run_.all_digital = on; }
  void begin_batch(uint32_t batch_index) override { run_.batch_index = batch_index; }
  void run_layer(int index, const float* x, int n, int h, int w, float* y) override {
    double largest = 0;
    const std::vector<float> out =
        cimref::run_layer(layers_.at(size_t(index)), config_, run_, x, n, h, w, &largest);
    std::copy(out.begin(), out.end(), y);
    largest_[size_t(index)] = std::max(largest_[size_t(index)], largest);
  }

 private:
  CimConfig config_;
  std::vector<QuantisedLayer> layers_;
  std::vector<double> largest_;
  cimref::LayerRun run_;
};

// Logits of a network run by `backend` the way TrialRunner runs a trial: calibration on the clean
// chip first when the ADC is calibrated, then chip `trial` at σ, batch 1.
std::vector<float> network_logits(const ResNet& network, CimBackend& backend,
                                  const CimConfig& config, const std::vector<float>& images, int n,
                                  uint32_t trial, double sigma) {
  if (config.adc == AdcMode::kCalibrated) {
    backend.program_chip(0, 0.0);
    backend.set_calibrating(true);
    backend.begin_batch(0);
    network.forward(images.data(), n, backend);
    backend.set_calibrating(false);
  }
  backend.program_chip(trial, sigma);
  backend.begin_batch(1);
  return network.forward(images.data(), n, backend).back();
}

// The shipped golden ResNet-8 end to end: the reference's logits are CpuCimBackend's bit for bit
// for every ADC at σ = 0, 0.1 and 0.6 (clamped), device variation, two trials; a `cycle` chip
// within the bounds of expect_agreement_with_cpu.
TEST(Reference, NetworkLogitsEqualTheCpuBackends) {
  const LoadedModel model =
      load_model(std::string(CIMSWEEP_SOURCE_DIR) +
                 "/tests/data/golden_resnet8_k3_w4_rgb_shortcutA.safetensors");
  const ResNetArch& arch = model.network->arch();
  const uint32_t seed = cimsweep::testing::test_seed(37);
  std::mt19937 rng(seed);
  const int n = 3;
  std::vector<float> images(size_t(n) * arch.in_channels * arch.input_height * arch.input_width);
  std::uniform_int_distribution<int> byte(0, 255);
  for (float& v : images) v = float(byte(rng)) / 255.0f;
  struct NetworkMode {
    AdcMode adc;
    double sigma;
    VariationMode variation;
    bool clamp;
  };
  const NetworkMode modes[] = {
      {AdcMode::kDynamic, 0.0, VariationMode::kDevice, false},
      {AdcMode::kDynamic, 0.1, VariationMode::kDevice, false},
      {AdcMode::kFixed, 0.0, VariationMode::kDevice, false},
      {AdcMode::kFixed, 0.1, VariationMode::kDevice, false},
      {AdcMode::kIdeal, 0.0, VariationMode::kDevice, false},
      {AdcMode::kIdeal, 0.1, VariationMode::kDevice, false},
      {AdcMode::kCalibrated, 0.1, VariationMode::kDevice, false},
      {AdcMode::kDynamic, 0.6, VariationMode::kDevice, true},
      {AdcMode::kCalibrated, 0.6, VariationMode::kDevice, true},
      {AdcMode::kDynamic, 0.1, VariationMode::kCycle, false},
  };
  for (const NetworkMode& nm : modes) {
    CimConfig config;
    config.adc = nm.adc;
    config.variation = nm.variation;
    config.clamp_at_zero = nm.clamp;
    config.seed = seed;
    CpuCimBackend cpu(model.network->cim_layers(), config);
    ReferenceBackend reference(model.network->cim_layers(), config);
    for (uint32_t trial : {0u, 5u}) {
      const std::string what = "seed " + std::to_string(seed) + ", ADC " + to_string(nm.adc) +
                               ", " + to_string(nm.variation) + ", σ " + std::to_string(nm.sigma) +
                               ", trial " + std::to_string(trial);
      const std::vector<float> want =
          network_logits(*model.network, cpu, config, images, n, trial, nm.sigma);
      const std::vector<float> got =
          network_logits(*model.network, reference, config, images, n, trial, nm.sigma);
      const Agreement a = compare(got, want, 1e-5);
      std::cout << "[ logits   ] " << what << ": " << describe(a) << std::endl;
      Mode mode{"network", nm.adc, nm.sigma, nm.variation};
      mode.clamp = nm.clamp;
      expect_agreement_with_cpu(a, mode, what);
    }
  }
}

// Sub-array `sub` of a noisy chip (σ > 0) as cim-model.md §1–§2 define it, written out here from
// the weights, not from quantise_layer or kernels/: s = max|W|, ŵ = W/s in float32,
// D = round((2^wb − 1)/2·(ŵ + 1)) ties to even, d_m = (D >> cb·m) & L, g = (1 − 1/r)·d + L/r,
// g̃ = g·(1 + σz) (0 if clamped and negative); the reference column g_ref = L(1 + 1/r)/2 with its
// own z under --reference-variation, else the all-ones row that counts Σb. z is the chip's
// noise (kernels/noise.h, checked against published vectors in test_noise) at weight cell
// (o·K + row)·nc + m and reference cell row·nc + m. Only the sub-array's row order comes from the
// backend (mapped_to_logical). Layout [column][row]: columns m·Cout + o, then the reference rows.
std::vector<float> chip_by_the_model(const LayerData& d, const CimConfig& config,
                                     const QuantisedLayer& layer, double sigma, int sub) {
  const int outs = d.spec.out_channels, rows = d.spec.rows(), nc = config.cells_per_weight();
  const int L = (1 << config.cell_bits) - 1, top = (1 << config.weight_bits) - 1;
  const double inv_r = std::isinf(config.onoff_ratio) ? 0.0 : 1.0 / config.onoff_ratio;
  float s = 0;
  for (float w : d.weight) s = std::max(s, std::fabs(w));
  const int r0 = layer.subarray_begin[sub], width = layer.subarray_begin[sub + 1] - r0;
  const int ref_rows = config.reference_variation ? nc : 1;
  const cim::NoiseKey key{config.seed, kTrial};
  auto varied = [&](double g, float z) {
    const double v = g * (1.0 + sigma * double(z));
    return float(config.clamp_at_zero && v < 0 ? 0.0 : v);
  };
  std::vector<float> operand(size_t(nc * outs + ref_rows) * width);
  for (int k = 0; k < width; ++k) {
    const int row = layer.mapped_to_logical[r0 + k];
    for (int o = 0; o < outs; ++o) {
      const float w_hat = d.weight[size_t(o) * rows + row] / s;
      const int D = int(std::nearbyint(top / 2.0 * (double(w_hat) + 1.0)));
      for (int m = 0; m < nc; ++m) {
        const int level = (D >> (config.cell_bits * m)) & L;
        const double g = (1.0 - inv_r) * level + L * inv_r;
        const float z =
            cim::cell_noise(key, 0, cim::kWeightCells, (uint64_t(o) * rows + row) * nc + m, 0);
        operand[size_t(m * outs + o) * width + k] = varied(g, z);
      }
    }
    for (int m = 0; m < ref_rows; ++m) {
      const float z = cim::cell_noise(key, 0, cim::kReferenceCells, uint64_t(row) * nc + m, 0);
      operand[size_t(nc * outs + m) * width + k] =
          config.reference_variation ? varied(L * (1.0 + inv_r) / 2.0, z) : 1.0f;
    }
  }
  return operand;
}

// The CPU backend's chip and the CUDA kernels' CPU reference's chip, each against the model
// written out above, bit for bit: device variation with reference variation and clamping at
// σ = 0.6 (a cell clamps where z < −1/0.6, 4.8 % of cells: counted, so the clamp is exercised),
// and on/off = ∞ (Gmin = 0: level-0 cells stay exactly 0 whatever z).
TEST(Reference, ProgramsTheChipTheCimModelDescribes) {
  Mode clamping = kModes[9];
  clamping.sigma = 0.6;
  for (const Shape& s : {kShapes[1], kShapes[4]}) {
    for (const Mode& m : {kModes[1], clamping, kModes[10]}) {
      const LayerData d = make_layer(s, 5);
      const CimConfig config = make_config(s, m);
      CpuCimBackend cpu({d.spec}, config);
      cpu.program_chip(kTrial, m.sigma);
      const QuantisedLayer& layer = cpu.layers()[0];
      size_t clamped = 0, cells = 0;
      for (int sub = 0; sub < layer.subarrays(); ++sub) {
        const std::vector<float> want = chip_by_the_model(d, config, layer, m.sigma, sub);
        const std::vector<float> got = cpu.programmed_subarray(0, sub);
        const std::vector<float> reference =
            cimref::program_subarray(layer, config, m.sigma, kTrial, sub, 0);
        ASSERT_EQ(got.size(), want.size());
        ASSERT_EQ(reference.size(), want.size());
        EXPECT_EQ(std::memcmp(got.data(), want.data(), got.size() * sizeof(float)), 0)
            << "CPU backend: " << s.name << " " << m.name << " sub-array " << sub;
        EXPECT_EQ(std::memcmp(reference.data(), want.data(), want.size() * sizeof(float)), 0)
            << "CUDA reference: " << s.name << " " << m.name << " sub-array " << sub;
        for (float v : want) clamped += v == 0.0f;
        cells += want.size();
      }
      if (m.clamp) {
        EXPECT_GT(clamped, cells / 50) << s.name << ": σ = 0.6 must clamp some cells";
        EXPECT_LT(clamped, cells / 10) << s.name;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// The CUDA backend (skipped without a GPU)

#if defined(CIMSWEEP_HAVE_CUDA)
std::string gpu_unusable_reason() {
  static const std::string reason = cuda_device_unusable_reason(0);
  return reason;
}
std::unique_ptr<CudaCimBackend> make_gpu(const LayerData& d, const CimConfig& config,
                                         CudaPrecision precision) {
  CudaBackendOptions options;
  options.precision = precision;
  options.check_each_layer = true;  // guard bytes after every device buffer, every layer
  return std::make_unique<CudaCimBackend>(0, std::vector<CimLayerSpec>{d.spec}, config, options);
}
#define SKIP_WITHOUT_GPU()                                                     \
  do {                                                                         \
    if (!gpu_unusable_reason().empty()) GTEST_SKIP() << gpu_unusable_reason(); \
  } while (0)
#else
#define SKIP_WITHOUT_GPU() GTEST_SKIP() << "built without CUDA"
#endif

class CudaVsCpu : public ::testing::TestWithParam<Case> {};

TEST_P(CudaVsCpu, ExactModeEqualsItsReferenceAndAgreesWithCpu) {
  SKIP_WITHOUT_GPU();
#if defined(CIMSWEEP_HAVE_CUDA)
  const Case c = GetParam();
  const LayerData d = make_layer(c.shape, case_seed(c));
  const CimConfig config = make_config(c.shape, c.mode);
  auto gpu = make_gpu(d, config, CudaPrecision::kExact);
  const std::vector<float> got = run_on(*gpu, d, c.mode);
  gpu->check_guards();

  const Agreement ref = compare(got, run_reference(d, config, c.mode), 0);
  EXPECT_EQ(ref.differ, 0u) << "GPU vs its CPU reference must agree bit for bit: " << describe(ref);
  CpuCimBackend cpu({d.spec}, config);
  const Agreement a = compare(got, run_on(cpu, d, c.mode), 1e-5);
  std::cout << "[ agree    ] " << describe(a) << std::endl;
  expect_agreement_with_cpu(a, c.mode, "CUDA exact vs CPU");
#endif
}

TEST_P(CudaVsCpu, FastModeIsExactAtZeroSigmaAndCloseOtherwise) {
  SKIP_WITHOUT_GPU();
#if defined(CIMSWEEP_HAVE_CUDA)
  const Case c = GetParam();
  const LayerData d = make_layer(c.shape, case_seed(c));
  const CimConfig config = make_config(c.shape, c.mode);
  auto gpu = make_gpu(d, config, CudaPrecision::kFast);
  EXPECT_EQ(gpu->name(), "cuda-fast");
  const std::vector<float> got = run_on(*gpu, d, c.mode);
  gpu->check_guards();
  CpuCimBackend cpu({d.spec}, config);
  const Agreement a = compare(got, run_on(cpu, d, c.mode), 1e-5);
  EXPECT_EQ(a.nans, 0u) << describe(a);
  EXPECT_GT(a.nonzero, a.count / 2) << describe(a);
  if (c.mode.all_digital || c.mode.sigma == 0) {
    EXPECT_EQ(a.differ, 0u) << "fp16 holds cell levels and bits exactly: " << describe(a);
  } else {
    // Conductances rounded to fp16 (11 significant bits): small, unbiased output noise.
    EXPECT_LE(a.mean_abs, 2e-2 * a.scale) << describe(a);
    EXPECT_LE(compare(got, run_on(cpu, d, c.mode), 5e-2).beyond, a.count / 20) << describe(a);
  }
#endif
}

INSTANTIATE_TEST_SUITE_P(Layers, CudaVsCpu, ::testing::ValuesIn(all_cases()), case_name);

TEST(Cuda, ProgramsTheCpuBackendsChipBitForBit) {
  SKIP_WITHOUT_GPU();
#if defined(CIMSWEEP_HAVE_CUDA)
  for (const Shape& s : kShapes) {
    for (const Mode& m : {kModes[0], kModes[1], kModes[9], kModes[10]}) {
      const LayerData d = make_layer(s, 9);
      const CimConfig config = make_config(s, m);
      CpuCimBackend cpu({d.spec}, config);
      auto gpu = make_gpu(d, config, CudaPrecision::kExact);
      cpu.program_chip(kTrial, m.sigma);
      gpu->program_chip(kTrial, m.sigma);
      for (int sub = 0; sub < cpu.layers()[0].subarrays(); ++sub) {
        const std::vector<float> want = cpu.programmed_subarray(0, sub);
        const std::vector<float> got = gpu->programmed_subarray(0, sub);
        ASSERT_EQ(got.size(), want.size());
        EXPECT_EQ(std::memcmp(got.data(), want.data(), got.size() * sizeof(float)), 0)
            << s.name << " " << m.name << " sub-array " << sub;
      }
      gpu->check_guards();
    }
  }
#endif
}

// A small ResNet end to end on both backends: the shipped golden model, several trials; bit for
// bit, as the reference agrees with the CPU backend (Reference.NetworkLogitsEqualTheCpuBackends).
TEST(Cuda, NetworkLogitsAgreeWithCpu) {
  SKIP_WITHOUT_GPU();
#if defined(CIMSWEEP_HAVE_CUDA)
  const LoadedModel model =
      load_model(std::string(CIMSWEEP_SOURCE_DIR) +
                 "/tests/data/golden_resnet8_k3_w4_rgb_shortcutA.safetensors");
  const ResNetArch& arch = model.network->arch();
  std::mt19937 rng(cimsweep::testing::test_seed(31));
  const int n = 7;
  std::vector<float> images(size_t(n) * arch.in_channels * arch.input_height * arch.input_width);
  std::uniform_int_distribution<int> byte(0, 255);
  for (float& v : images) v = float(byte(rng)) / 255.0f;
  for (double sigma : {0.0, 0.1}) {
    CimConfig config;
    CpuCimBackend cpu(model.network->cim_layers(), config);
    CudaCimBackend gpu(0, model.network->cim_layers(), config);
    for (uint32_t trial : {0u, 5u}) {
      cpu.program_chip(trial, sigma);
      gpu.program_chip(trial, sigma);
      cpu.begin_batch(0);
      gpu.begin_batch(0);
      const auto want = model.network->forward(images.data(), n, cpu);
      const auto got = model.network->forward(images.data(), n, gpu);
      const Agreement a = compare(got.back(), want.back(), 1e-5);
      EXPECT_EQ(a.nans, 0u) << describe(a);
      EXPECT_EQ(a.differ, 0u) << "σ = " << sigma
                              << ", device chips read in the CPU's order: " << describe(a);
    }
  }
#endif
}

TEST(Cuda, RefusesMissingDevicesWithAUserError) {
  SKIP_WITHOUT_GPU();
#if defined(CIMSWEEP_HAVE_CUDA)
  const LayerData d = make_layer(kShapes[0], 1);
  EXPECT_THROW(CudaCimBackend(cuda_device_count(), {d.spec}, CimConfig{}), UserError);
  EXPECT_THROW(CudaCimBackend(-1, {d.spec}, CimConfig{}), UserError);
#endif
}

}  // namespace
