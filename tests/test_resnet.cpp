// The ResNet family end to end against golden logits computed independently in PyTorch
// (tools/make_golden.py: the quantised digital network, i.e. σ = 0 with an ideal ADC), plus
// block masks and architecture validation.
#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "host/cim_cpu.h"
#include "host/errors.h"
#include "host/model_file.h"
#include "host/safetensors.h"
#include "tests/test_util.h"

namespace {

using namespace cimsweep;

const std::string kGoldenDir = std::string(CIMSWEEP_SOURCE_DIR) + "/tests/data/";
const char* kGoldenModels[] = {"golden_resnet8_k3_w4_rgb_shortcutA",
                               "golden_resnet8_k5_w3_11x13_shortcutB_exits"};

struct Golden {
  LoadedModel model;
  nlohmann::json expected;
  std::vector<float> images;
  int count = 0;
};

Golden load_golden(const std::string& name) {
  Golden g;
  g.model = load_model(kGoldenDir + name + ".safetensors");
  std::ifstream in(kGoldenDir + name + ".json");
  g.expected = nlohmann::json::parse(in);
  for (const auto& image : g.expected.at("images")) {
    for (int pixel : image) g.images.push_back(float(pixel) / 255.0f);
    ++g.count;
  }
  return g;
}

class GoldenLogits : public ::testing::TestWithParam<const char*> {};

TEST_P(GoldenLogits, CimAtZeroSigmaWithIdealAdcMatchesPyTorchReference) {
  Golden g = load_golden(GetParam());
  CimConfig config;
  config.adc = AdcMode::kIdeal;
  for (Mapping mapping : {Mapping::kKernel, Mapping::kDense}) {
    for (bool digital : {false, true}) {
      config.mapping = mapping;
      config.subarray_rows = 7;  // many sub-arrays, none full
      CpuCimBackend backend(g.model.network->cim_layers(), config);
      backend.set_all_digital(digital);
      const auto logits = g.model.network->forward(g.images.data(), g.count, backend);
      const auto& expected = g.expected.at("logits");
      ASSERT_EQ(logits.size(), expected.size());
      for (size_t e = 0; e < logits.size(); ++e) {
        double scale = 0;
        for (const auto& image : expected[e])
          for (double v : image) scale = std::max(scale, std::fabs(v));
        ASSERT_GT(scale, 0.0);
        for (int i = 0; i < g.count; ++i) {
          const auto& row = expected[e][i];
          for (size_t c = 0; c < row.size(); ++c)
            EXPECT_NEAR(logits[e][i * row.size() + c], row[c].get<double>(), 2e-5 * scale)
                << "exit " << e << " image " << i << " class " << c << " digital " << digital;
        }
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Models, GoldenLogits, ::testing::ValuesIn(kGoldenModels));

TEST(ResNet, KeepAllMaskEqualsNoMaskAndSkippingChangesOnlySkippedImages) {
  Golden g = load_golden(kGoldenModels[0]);
  CimConfig config;
  config.adc = AdcMode::kIdeal;
  CpuCimBackend backend(g.model.network->cim_layers(), config);
  const ResNet& net = *g.model.network;
  const int blocks = net.arch().num_blocks();
  std::vector<uint8_t> keep(size_t(g.count) * blocks, 1);
  const auto plain = net.forward(g.images.data(), g.count, backend);
  EXPECT_EQ(net.forward(g.images.data(), g.count, backend, keep.data()), plain);
  // Skip the downsampling block 1 (stage 2, block 0) for image 3 only.
  keep[size_t(3) * blocks + 1] = 0;
  const auto masked = net.forward(g.images.data(), g.count, backend, keep.data());
  const int classes = net.arch().num_classes;
  for (int i = 0; i < g.count; ++i) {
    const std::vector<float> a(plain.back().begin() + i * classes,
                               plain.back().begin() + (i + 1) * classes);
    const std::vector<float> b(masked.back().begin() + i * classes,
                               masked.back().begin() + (i + 1) * classes);
    if (i == 3)
      EXPECT_NE(a, b);
    else
      EXPECT_EQ(a, b);  // the ideal ADC does not couple images
  }
}

// Option A's zero channels "after" the identity ones is a different network from "split".
TEST(ResNet, ShortcutPaddingLayoutMatters) {
  Golden g = load_golden(kGoldenModels[0]);
  const SafetensorsFile file = read_safetensors(kGoldenDir + kGoldenModels[0] + ".safetensors");
  ResNetArch arch = g.model.network->arch();
  ASSERT_EQ(arch.shortcut, 'A');
  arch.shortcut_padding = "after";
  std::map<std::string, float> ranges;
  for (const CimLayerSpec& l : g.model.network->cim_layers()) ranges[l.name] = l.input_range;
  const ResNet after(arch, file.tensors, ranges);
  CimConfig config;
  config.adc = AdcMode::kIdeal;
  CpuCimBackend backend(after.cim_layers(), config);
  const auto split_logits = g.model.network->forward(g.images.data(), g.count, backend);
  const auto after_logits = after.forward(g.images.data(), g.count, backend);
  EXPECT_NE(split_logits, after_logits);
  arch.shortcut_padding = "middle";
  EXPECT_THROW(arch.validate(), UserError);
}

TEST(ResNet, MissingOrMisshapenTensorsAreClearErrors) {
  const std::string path = kGoldenDir + kGoldenModels[0] + ".safetensors";
  const SafetensorsFile file = read_safetensors(path);
  const ResNetArch arch =
      ResNetArch::from_json(nlohmann::json::parse(file.metadata.at("cimsweep.arch")));
  std::map<std::string, float> ranges;
  const auto ranges_json = nlohmann::json::parse(file.metadata.at("cimsweep.input_ranges"));
  for (const auto& [k, v] : ranges_json.items()) ranges[k] = v.get<float>();

  auto missing = file.tensors;
  missing.erase("layer2.0.conv1.weight");
  try {
    ResNet net(arch, missing, ranges);
    FAIL() << "no error for a missing tensor";
  } catch (const UserError& e) {
    EXPECT_NE(std::string(e.what()).find("layer2.0.conv1.weight"), std::string::npos) << e.what();
  }
  auto wrong = file.tensors;
  wrong["fc.weight"].shape = {5, 32};
  try {
    ResNet net(arch, wrong, ranges);
    FAIL() << "no error for a wrong shape";
  } catch (const UserError& e) {
    EXPECT_NE(std::string(e.what()).find("fc.weight"), std::string::npos) << e.what();
  }
  auto no_range = ranges;
  no_range.erase("layer1.0.conv2");
  EXPECT_THROW(ResNet(arch, file.tensors, no_range), UserError);
  ResNetArch deep = arch;
  deep.depth = 21;
  EXPECT_THROW(deep.validate(), UserError);
}

// Regression (fuzz/fuzz_model_file, crafted inputs): a few bytes of architecture metadata made the
// loader allocate the needed tensor just to print its shape (4 GB for width 1e9, a length_error
// for kernel 2^31 − 1), and a huge input size overflowed the layer-size arithmetic.
TEST(ResNet, HugeArchitectureNumbersAreUserErrorsWithoutHugeAllocations) {
  const std::string path = kGoldenDir + kGoldenModels[0] + ".safetensors";
  const SafetensorsFile file = read_safetensors(path);
  const ResNetArch arch =
      ResNetArch::from_json(nlohmann::json::parse(file.metadata.at("cimsweep.arch")));
  std::map<std::string, float> ranges;
  const auto ranges_json = nlohmann::json::parse(file.metadata.at("cimsweep.input_ranges"));
  for (const auto& [k, v] : ranges_json.items()) ranges[k] = v.get<float>();

  ResNetArch wide = arch;
  wide.width = 1000000000;
  try {
    ResNet net(wide, file.tensors, ranges);
    FAIL() << "no error for width 1e9";
  } catch (const UserError& e) {
    EXPECT_NE(std::string(e.what()).find("needs [1000000000, 3, 3, 3]"), std::string::npos)
        << e.what();
  }
  ResNetArch wide_kernel = arch;
  wide_kernel.kernel = 2147483647;
  EXPECT_THROW(ResNet(wide_kernel, file.tensors, ranges), UserError);
  ResNetArch huge_input = arch;
  huge_input.input_height = huge_input.input_width = 2147483647;
  EXPECT_THROW(huge_input.validate(), UserError);
  EXPECT_THROW(ResNet(huge_input, file.tensors, ranges), UserError);
}

TEST(ResNet, LayerMacsOfResNet20MatchTheKnownCount) {
  // ResNet-20 on 32×32×3, width 16: 40.55 M multiply-accumulates in its convs and FC, and
  // 0.27 M parameters (He et al. 2016), counted by hand in the comments below.
  ResNetArch arch;
  std::map<std::string, Tensor> tensors;
  std::map<std::string, float> ranges;
  auto conv = [&](const std::string& n, int o, int i, int k) {
    tensors[n + ".weight"] = Tensor({o, i, k, k});
    ranges[n] = 1.0f;
  };
  auto bn = [&](const std::string& n, int c) {
    for (const char* p : {".weight", ".bias", ".running_mean", ".running_var"})
      tensors[n + p] = Tensor({c});
  };
  conv("conv1", 16, 3, 3);
  bn("bn1", 16);
  int in = 16;
  for (int s = 1; s <= 3; ++s)
    for (int b = 0; b < 3; ++b) {
      const int out = 16 << (s - 1);
      const std::string p = "layer" + std::to_string(s) + "." + std::to_string(b);
      conv(p + ".conv1", out, in, 3);
      bn(p + ".bn1", out);
      conv(p + ".conv2", out, out, 3);
      bn(p + ".bn2", out);
      in = out;
    }
  tensors["fc.weight"] = Tensor({10, 64});
  tensors["fc.bias"] = Tensor({10});
  ranges["fc"] = 1.0f;
  ResNet net(arch, tensors, ranges);
  int64_t total = 0;
  for (int64_t m : net.layer_macs()) total += m;
  // 32·32·16·27 + 6·32·32·16·144 + 16·16·32·144 + 5·16·16·32·288 + 8·8·64·288 + 5·8·8·64·576 + 640
  EXPECT_EQ(total, 40551040);
  // convs 267,696 + BN scale and shift 2·688 + fc 650
  EXPECT_EQ(net.parameter_count(), 269722);
}

}  // namespace
