// The CPU backend at σ > 0 against tools/cim_reference.py's cim_layer_forward, a numpy reading of
// docs/cim-model.md written without the C++: one CIM layer of awkward shape (33 input channels,
// 3×3 kernel, 13 outputs, 16-row sub-arrays, so 3 per kernel position with the last holding one
// row) on one batch, every ADC mode, with and without clamping, reference-column variation and
// an infinite on/off ratio. numpy has no Philox4x32-10, so this test draws each cell's z with
// kernels/noise.h at the cell numbers of cim-model.md §2 and hands them to the reference: a
// backend that numbers or keys its cells otherwise sees another chip and fails.
// `device` chips must agree bit for bit (the contract fixes every rounding); `cycle` chips read
// through OpenBLAS GEMMs whose summation order is the library's, so each output may move by the
// codes such a reordering could flip, which the reference counts (its "slack").
// Skipped where /usr/bin/python3 lacks torch/numpy (tools/install-deps.sh --with-python).
// Also the effect of --digital-layers and --neurosim-scale (one layer's arithmetic, nothing else).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <fstream>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "host/cpu/cim_cpu.h"
#include "host/io/model_file.h"
#include "kernels/noise.h"
#include "test_util.h"

namespace cimsweep {
namespace {

using testing::TempDir;

constexpr int kOut = 13, kIn = 33, kKernel = 3, kBatch = 3, kHeight = 5, kWidth = 7;
constexpr float kInputRange = 0.8f;
constexpr uint32_t kTrial = 3;  // an evaluation chip other than trial 0
constexpr AdcMode kAdcModes[] = {AdcMode::kIdeal, AdcMode::kFixed, AdcMode::kDynamic,
                                 AdcMode::kCalibrated};

struct Case {
  std::string name;
  AdcMode adc;
  VariationMode variation;
  double sigma;
  int adc_bits = 6;
  bool clamp_at_zero = false, reference_variation = false, neurosim_scale = false;
  double onoff = 10;
  int weight_bits = 8, cell_bits = 4, rows = 16;
  Mapping mapping = Mapping::kKernel;
};

template <class T>
void write_raw(const std::string& path, const std::vector<T>& values) {
  std::ofstream file(path, std::ios::binary);
  file.write(reinterpret_cast<const char*>(values.data()),
             std::streamsize(values.size() * sizeof(T)));
}
template <class T>
std::vector<T> read_raw(const std::string& path, size_t count) {
  std::vector<T> values(count);
  std::ifstream file(path, std::ios::binary);
  file.read(reinterpret_cast<char*>(values.data()), std::streamsize(count * sizeof(T)));
  EXPECT_EQ(size_t(file.gcount()), count * sizeof(T)) << path;
  return values;
}

// Looked up, not imported: importing torch takes seconds, and the reference imports it anyway.
bool python_has_torch() {
  static const bool found = [] {
    const std::string command = std::string(CIMSWEEP_PYTHON) +
                                " -c 'import importlib.util as u, sys; sys.exit(not (u.find_spec("
                                "\"numpy\") and u.find_spec(\"torch\")))' > /dev/null 2>&1";
    return std::system(command.c_str()) == 0;
  }();
  return found;
}

// The layer, its batch and every case's chip, run through the backend and the reference.
class CimReference : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!python_has_torch()) GTEST_SKIP() << CIMSWEEP_PYTHON << " has no torch/numpy";
    std::mt19937 rng(testing::test_seed(20261214));
    std::normal_distribution<float> normal(0.0f, 0.1f);
    std::uniform_real_distribution<float> uniform(0.0f, 1.0f);
    weight_.resize(size_t(kOut) * kIn * kKernel * kKernel);
    for (float& w : weight_) w = normal(rng);
    bias_.resize(kOut);
    for (float& b : bias_) b = normal(rng);
    // Post-ReLU-like inputs: a third exactly 0, some above a_max (clipped).
    input_.resize(size_t(kBatch) * kIn * kHeight * kWidth);
    for (float& a : input_) a = uniform(rng) < 0.3f ? 0.0f : 1.1f * kInputRange * uniform(rng);
    spec_.name = "layer";
    spec_.out_channels = kOut;
    spec_.in_channels = kIn;
    spec_.kernel_h = spec_.kernel_w = kKernel;
    spec_.stride = 1;
    spec_.pad = 1;
    spec_.weight = weight_.data();
    spec_.bias = bias_.data();
    spec_.input_range = kInputRange;
    write_raw(dir_.file("weight.f32"), weight_);
    write_raw(dir_.file("bias.f32"), bias_);
    write_raw(dir_.file("input.f32"), input_);
  }

  static CimConfig config_of(const Case& c) {
    CimConfig config;
    config.weight_bits = c.weight_bits;
    config.cell_bits = c.cell_bits;
    config.subarray_rows = c.rows;
    config.onoff_ratio = c.onoff;
    config.variation = c.variation;
    config.clamp_at_zero = c.clamp_at_zero;
    config.reference_variation = c.reference_variation;
    config.mapping = c.mapping;
    config.adc_bits = c.adc_bits;
    config.adc = c.adc;
    config.neurosim_scale = c.neurosim_scale;
    config.seed = 77;
    return config;
  }

  // The backend's y for one case, as an evaluation runs it: ADC calibration on a clean chip
  // first (ADC `calibrated`), then chip kTrial at the case's σ, batch 0.
  std::vector<float> backend_output(const Case& c, double sigma) {
    CpuCimBackend backend({spec_}, config_of(c));
    std::vector<float> y(size_t(kBatch) * kOut * kHeight * kWidth);
    if (c.adc == AdcMode::kCalibrated) {
      backend.program_chip(0, 0.0);
      backend.set_calibrating(true);
      backend.begin_batch(0);
      backend.run_layer(0, input_.data(), kBatch, kHeight, kWidth, y.data());
      backend.set_calibrating(false);
    }
    backend.program_chip(kTrial, sigma);
    backend.begin_batch(0);
    backend.run_layer(0, input_.data(), kBatch, kHeight, kWidth, y.data());
    return y;
  }

  // cim-model.md §2's z of every weight cell (o, k, m) — cell number (o·K + k)·nc + m, k the
  // logical row (c, i, j) — and reference cell (k, m) — number k·nc + m —, for each draw:
  // `device` draws once (read 0), `cycle` once per input bit t of batch 0 (read 1 + t).
  void write_noise(const Case& c, nlohmann::json& entry) {
    const CimConfig config = config_of(c);
    const int rows = spec_.rows(), cells = config.cells_per_weight();
    const int draws = c.variation == VariationMode::kCycle ? config.input_bits : 1;
    const cim::NoiseKey key{config.seed, kTrial};
    std::vector<float> weight_z, reference_z;
    for (int draw = 0; draw < draws; ++draw) {
      const uint32_t read = c.variation == VariationMode::kCycle ? 1 + draw : 0;
      for (uint64_t cell = 0; cell < uint64_t(kOut) * rows * cells; ++cell)
        weight_z.push_back(cim::cell_noise(key, 0, cim::kWeightCells, cell, read));
      for (uint64_t cell = 0; cell < uint64_t(rows) * cells; ++cell)
        reference_z.push_back(cim::cell_noise(key, 0, cim::kReferenceCells, cell, read));
    }
    write_raw(dir_.file(c.name + ".weight_z.f32"), weight_z);
    write_raw(dir_.file(c.name + ".reference_z.f32"), reference_z);
    entry["weight_z"] = c.name + ".weight_z.f32";
    entry["reference_z"] = c.name + ".reference_z.f32";
  }

  nlohmann::json case_entry(const Case& c) {
    const CimConfig config = config_of(c);
    nlohmann::json entry = {
        {"name", c.name},
        {"layer",
         {{"out", kOut},
          {"in", kIn},
          {"kernel", kKernel},
          {"stride", 1},
          {"pad", 1},
          {"a_max", kInputRange},
          {"weight", "weight.f32"},
          {"bias", "bias.f32"}}},
        {"input", "input.f32"},
        {"input_shape", {kBatch, kIn, kHeight, kWidth}},
        {"sigma", c.sigma},
        {"weight_bits", config.weight_bits},
        {"cell_bits", config.cell_bits},
        {"input_bits", config.input_bits},
        {"rows", config.subarray_rows},
        {"onoff", std::isinf(c.onoff) ? nlohmann::json("inf") : nlohmann::json(c.onoff)},
        {"mapping", to_string(config.mapping)},
        {"adc", to_string(config.adc)},
        {"adc_bits", config.adc_bits},
        {"variation", to_string(config.variation)},
        {"clamp_at_zero", config.clamp_at_zero},
        {"reference_variation", config.reference_variation},
        {"neurosim_scale", config.neurosim_scale}};
    write_noise(c, entry);
    return entry;
  }

  // Runs the reference on every case; its summary.json.
  nlohmann::json run_reference(const std::vector<Case>& cases) {
    nlohmann::json entries = nlohmann::json::array();
    for (const Case& c : cases) entries.push_back(case_entry(c));
    testing::write_text(dir_.file("cases.json"), entries.dump());
    const std::string command = std::string(CIMSWEEP_PYTHON) +
                                " " CIMSWEEP_SOURCE_DIR "/tests/python/cim_layer_golden.py " +
                                dir_.path();
    const int status = std::system(command.c_str());
    EXPECT_EQ(status, 0) << command;
    return nlohmann::json::parse(testing::read_text(dir_.file("summary.json")));
  }

  size_t outputs() const { return size_t(kBatch) * kOut * kHeight * kWidth; }
  // The reference's y of case `name`, written by run_reference.
  std::vector<float> reference_output(const std::string& name) const {
    return read_raw<float>(dir_.file(name + ".reference.f32"), outputs());
  }

  TempDir dir_;
  std::vector<float> weight_, bias_, input_;
  CimLayerSpec spec_;
};

// Every ADC mode × {plain, clamped at zero (σ = 0.5: z < −2 happens), reference variation,
// on/off = ∞}, plus 6-bit weights on 2-bit cells (3 slices) and the dense mapping.
std::vector<Case> device_cases() {
  std::vector<Case> cases;
  for (AdcMode adc : kAdcModes) {
    const std::string adc_name = to_string(adc);
    Case plain{adc_name, adc, VariationMode::kDevice, 0.1};
    cases.push_back(plain);
    Case clamped = plain;
    clamped.name += "_clamp";
    clamped.sigma = 0.5;
    clamped.clamp_at_zero = true;
    cases.push_back(clamped);
    Case reference = plain;
    reference.name += "_refvar";
    reference.reference_variation = true;
    cases.push_back(reference);
    Case no_gmin = plain;
    no_gmin.name += "_onoff_inf";
    no_gmin.onoff = std::numeric_limits<double>::infinity();
    cases.push_back(no_gmin);
  }
  Case three_slices{"dynamic_w6_c2", AdcMode::kDynamic, VariationMode::kDevice, 0.2};
  three_slices.weight_bits = 6;
  three_slices.cell_bits = 2;
  three_slices.adc_bits = 5;
  cases.push_back(three_slices);
  Case dense{"fixed_dense_r128_refvar", AdcMode::kFixed, VariationMode::kDevice, 0.15};
  dense.mapping = Mapping::kDense;
  dense.rows = 128;
  dense.adc_bits = 8;
  dense.reference_variation = true;
  cases.push_back(dense);
  Case neurosim{"dynamic_neurosim_scale", AdcMode::kDynamic, VariationMode::kDevice, 0.1};
  neurosim.neurosim_scale = true;
  cases.push_back(neurosim);
  return cases;
}

TEST_F(CimReference, DeviceChipsMatchThePythonReferenceBitForBit) {
  const std::vector<Case> cases = device_cases();
  const nlohmann::json summary = run_reference(cases);
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    const std::vector<float> y = backend_output(c, c.sigma);
    const std::vector<float> reference = reference_output(c.name);
    size_t differing = 0, nonzero = 0;
    for (size_t i = 0; i < y.size(); ++i) {
      if (y[i] != reference[i] && ++differing <= 3)
        ADD_FAILURE() << "output " << i << ": backend " << y[i] << ", reference " << reference[i];
      nonzero += y[i] != 0.0f;
    }
    EXPECT_EQ(differing, 0u) << "of " << y.size();
    EXPECT_GT(nonzero, y.size() / 2);
    // σ reaches the chip: the same case at σ = 0 gives other outputs.
    const std::vector<float> clean = backend_output(c, 0.0);
    size_t moved = 0;
    for (size_t i = 0; i < y.size(); ++i) moved += y[i] != clean[i];
    EXPECT_GT(moved, y.size() / 2);
    if (c.neurosim_scale) {
      // --neurosim-scale changes the output scale alone: y − bias shrinks by
      // (2^wb − 1)(2^ab − 1)/(2^wb·2^ab) = 255²/256², up to the float32 roundings.
      Case plain = c;
      plain.neurosim_scale = false;
      const std::vector<float> unscaled = backend_output(plain, c.sigma);
      const double ratio = 255.0 * 255.0 / (256.0 * 256.0);
      // At most 1.07e-7 of |expected| + |bias| (about one float ulp) over the default seed and
      // CIMSWEEP_TEST_SEED=1…4; the bound is about four times that.
      for (size_t i = 0; i < y.size(); ++i) {
        const double bias = bias_[(i / (kHeight * kWidth)) % kOut];
        const double expected = (double(unscaled[i]) - bias) * ratio + bias;
        EXPECT_NEAR(y[i], expected, 4e-7 * (std::fabs(expected) + std::fabs(bias)) + 1e-7) << i;
      }
    }
    if (c.clamp_at_zero) {
      EXPECT_GT(summary[c.name]["clamped"].get<int>(), 0) << "σ too small to clamp anything";
    }
    std::cout << c.name << ": " << y.size() - differing << " of " << y.size() << " outputs equal, "
              << moved << " differ from σ = 0, clamped cells " << summary[c.name]["clamped"]
              << "\n";
  }
}

// --digital-layers: a named layer computes the quantised digital layer exactly (the reference at
// σ = 0 with an ideal ADC, cim-model.md §7) on a noisy chip with a 6-bit dynamic ADC, and the
// layers it does not name see the same chip as without the option.
TEST_F(CimReference, DigitalLayersRunTheQuantisedLayerExactlyAndOnlyThose) {
  const Case digital{"digital_reference", AdcMode::kIdeal, VariationMode::kDevice, 0.0};
  run_reference({digital});
  const std::vector<float> reference = reference_output(digital.name);
  CimLayerSpec other = spec_;
  other.name = "other";
  Case noisy{"noisy", AdcMode::kDynamic, VariationMode::kDevice, 0.3};
  CimConfig config = config_of(noisy);
  auto run_both = [&](const CimConfig& chip_config) {
    CpuCimBackend backend({spec_, other}, chip_config);
    backend.program_chip(kTrial, noisy.sigma);
    backend.begin_batch(0);
    std::vector<std::vector<float>> y(2, std::vector<float>(outputs()));
    for (int layer = 0; layer < 2; ++layer)
      backend.run_layer(layer, input_.data(), kBatch, kHeight, kWidth, y[size_t(layer)].data());
    return y;
  };
  const auto analog = run_both(config);
  config.digital_layers = {"layer"};
  const auto mixed = run_both(config);
  size_t differing = 0, moved = 0;
  for (size_t i = 0; i < outputs(); ++i) {
    differing += mixed[0][i] != reference[i];
    moved += analog[0][i] != reference[i];
  }
  EXPECT_EQ(differing, 0u) << "the digital layer is the quantised layer";
  EXPECT_GT(moved, outputs() / 2) << "without the option the layer is on the noisy chip";
  EXPECT_EQ(mixed[1], analog[1]) << "the layer not named is unchanged";
}

TEST_F(CimReference, CycleChipsMatchThePythonReferenceUpToCountedFlips) {
  std::vector<Case> cases;
  for (AdcMode adc : kAdcModes) {
    const std::string adc_name = to_string(adc);
    cases.push_back(Case{"cycle_" + adc_name, adc, VariationMode::kCycle, 0.1});
    Case reference = cases.back();
    reference.name += "_refvar_clamp";
    reference.reference_variation = true;
    reference.clamp_at_zero = true;
    reference.sigma = 0.5;
    cases.push_back(reference);
  }
  const nlohmann::json summary = run_reference(cases);
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    const std::vector<float> y = backend_output(c, c.sigma);
    const std::vector<float> reference = reference_output(c.name);
    const std::vector<double> slack = read_raw<double>(dir_.file(c.name + ".slack.f64"), outputs());
    size_t differing = 0, outside = 0, nonzero = 0;
    double worst = 0;  // the largest |difference| / slack
    for (size_t i = 0; i < y.size(); ++i) {
      const double difference = std::fabs(double(y[i]) - double(reference[i]));
      nonzero += y[i] != 0.0f;
      if (difference == 0) continue;
      ++differing;
      worst = std::max(worst, difference / slack[i]);
      if (!(difference <= slack[i]) && ++outside <= 3)
        ADD_FAILURE() << "output " << i << ": backend " << y[i] << ", reference " << reference[i]
                      << ", allowed ±" << slack[i];
    }
    EXPECT_EQ(outside, 0u);
    EXPECT_GT(nonzero, y.size() / 2);
    const std::vector<float> device = [&] {
      Case fixed_chip = c;
      fixed_chip.variation = VariationMode::kDevice;
      return backend_output(fixed_chip, c.sigma);
    }();
    size_t moved = 0;  // a fresh draw per read is another chip than the device draw
    for (size_t i = 0; i < y.size(); ++i) moved += y[i] != device[i];
    EXPECT_GT(moved, y.size() / 2);
    std::cout << c.name << ": " << differing << " of " << y.size()
              << " outputs differ from the reference, all within their slack (largest " << worst
              << " of it); ADC conversions a reordered sum could flip: "
              << summary[c.name]["possible_flips"] << "; clamped cells "
              << summary[c.name]["clamped"] << "\n";
  }
}

// --digital-layers through the command line, on the golden multi-exit ResNet-8 (tests/data):
// naming every layer makes a chip at σ = 0.3 the clean network, so that every trial scores the
// clean accuracy; without it the same chips score otherwise.
TEST(CimOptions, DigitalLayersNamingEveryLayerMakeANoisyChipTheCleanNetwork) {
  TempDir dir;
  testing::write_tiny_idx_test_split(dir.path(), testing::test_seed(1414));
  const std::string model =
      CIMSWEEP_SOURCE_DIR "/tests/data/golden_resnet8_k5_w3_11x13_shortcutB_exits.safetensors";
  std::string names;
  const LoadedModel loaded = load_model(model);
  for (const CimLayerSpec& layer : loaded.network->cim_layers())
    names += (names.empty() ? "" : ",") + layer.name;
  const std::string eval = "eval " + model + " --data " + dir.path() +
                           " --quiet --sigma 0.3 --trials 3 --backend cpu --format json";
  const auto digital = testing::run_cimsweep(eval + " --digital-layers " + names);
  ASSERT_EQ(digital.exit_code, 0) << digital.err;
  const auto analog = testing::run_cimsweep(eval);
  ASSERT_EQ(analog.exit_code, 0) << analog.err;
  const auto digital_row = nlohmann::json::parse(digital.out).at(0);
  const auto analog_row = nlohmann::json::parse(analog.out).at(0);
  std::cout << "σ = 0.3: " << digital_row.at("mean") << " % with every layer digital, "
            << analog_row.at("mean") << " % without; clean " << analog_row.at("clean_accuracy")
            << " %\n";
  EXPECT_EQ(digital_row.at("clean_accuracy"), analog_row.at("clean_accuracy"));
  EXPECT_EQ(digital_row.at("mean"), digital_row.at("clean_accuracy"));
  EXPECT_EQ(digital_row.at("std").get<double>(), 0.0);
  EXPECT_NE(analog_row.at("mean"), analog_row.at("clean_accuracy"));
}

}  // namespace
}  // namespace cimsweep
