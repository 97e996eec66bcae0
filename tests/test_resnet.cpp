// The ResNet family end to end against golden logits computed independently in PyTorch
// (tools/make_golden.py: the quantised digital network, i.e. σ = 0 with an ideal ADC), plus
// block masks and architecture validation.
#include <gtest/gtest.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "host/cpu/cim_cpu.h"
#include "common/errors.h"
#include "host/io/model_file.h"
#include "host/io/safetensors.h"
#include "tests/test_util.h"

namespace {

using namespace cimsweep;
using cimsweep::testing::test_seed;

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

// Logits of the first `n` of `images` (`per_image` floats each) run in consecutive batches of
// `batch` on chip `trial` at σ, batch k announced as begin_batch(k), as the evaluator does:
// [exit][image · classes + class].
std::vector<std::vector<float>> batched_logits(const ResNet& net, CimBackend& backend,
                                               const std::vector<float>& images, int n,
                                               size_t per_image, int batch, uint32_t trial,
                                               double sigma) {
  backend.program_chip(trial, sigma);
  std::vector<std::vector<float>> per_exit;
  uint32_t batch_index = 0;
  for (int first = 0; first < n; first += batch, ++batch_index) {
    const int count = std::min(batch, n - first);
    backend.begin_batch(batch_index);
    const auto logits = net.forward(images.data() + size_t(first) * per_image, count, backend);
    per_exit.resize(logits.size());
    for (size_t e = 0; e < logits.size(); ++e)
      per_exit[e].insert(per_exit[e].end(), logits[e].begin(), logits[e].end());
  }
  return per_exit;
}

// The first `n` images' rows of every exit.
std::vector<std::vector<float>> first_images(const std::vector<std::vector<float>>& logits, int n,
                                             int classes) {
  std::vector<std::vector<float>> head;
  for (const auto& exit : logits) head.emplace_back(exit.begin(), exit.begin() + size_t(n) * classes);
  return head;
}

bool any_nonzero(const std::vector<std::vector<float>>& logits) {
  for (const auto& exit : logits)
    for (float v : exit)
      if (v != 0.0f) return true;
  return false;
}

// Random 11×13 grey images for the awkward golden ResNet-8 (5×5 kernels, width 3, option-B
// shortcuts, two early exits).
std::vector<float> random_images(int n, size_t per_image, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> pixel(0, 255);
  std::vector<float> images(size_t(n) * per_image);
  for (float& v : images) v = float(pixel(rng)) / 255.0f;
  return images;
}

// Batches of 1 and 7 run over the first kFewImages (a few hundred forward calls would be slow
// under AddressSanitizer); the batch of 500 over all 500.
constexpr int kManyImages = 500, kMediumBatch = 84, kFewImages = 21;

// The README's claim "same command, same table": a whole network with the dynamic ADC on a noisy
// chip (σ = 0.1, device and reference variation, 6-bit ADC so that codes are coarse) gives the
// same logits bit for bit on 1 and 2 threads, for batches of 1, 7 and 500. The dynamic ADC's range
// spans the batch, so each batch size is compared with itself (the next tests cover the
// batch-independent ADCs across sizes, and permutations within a dynamic batch).
TEST(ResNetDeterminism, DynamicAdcNoisyChipSameLogitsOnOneAndTwoThreadsAtBatch1And7And500) {
  Golden g = load_golden(kGoldenModels[1]);
  const ResNet& net = *g.model.network;
  const ResNetArch& arch = net.arch();
  const size_t per_image = size_t(arch.in_channels) * arch.input_height * arch.input_width;
  const auto images = random_images(kManyImages, per_image, test_seed(1401));
  CimConfig config;
  config.adc = AdcMode::kDynamic;
  config.adc_bits = 6;
  // Dense mapping, sub-arrays of 19 rows and a ragged last one (a 5×5 conv of 3 channels: 75 rows
  // in 19 + 19 + 19 + 18; kernel mapping would read 25 sub-arrays of 3 rows, 6× the time).
  config.mapping = Mapping::kDense;
  config.subarray_rows = 19;
  config.reference_variation = true;
  config.seed = test_seed(1402);
  CpuCimBackend backend(net.cim_layers(), config);
  for (int batch : {1, 7, kManyImages}) {
    const int n = batch == kManyImages ? kManyImages : kFewImages;
    std::vector<std::vector<float>> logits[2];
    const int threads[2] = {1, 2};
    for (int t = 0; t < 2; ++t) {
      omp_set_num_threads(threads[t]);
      logits[t] = batched_logits(net, backend, images, n, per_image, batch, 4, 0.1);
    }
    omp_set_num_threads(omp_get_num_procs());
    ASSERT_EQ(logits[0].size(), size_t(arch.num_exits()));
    ASSERT_EQ(logits[0].back().size(), size_t(n) * arch.num_classes);
    EXPECT_EQ(logits[0], logits[1]) << "batch " << batch;
    EXPECT_TRUE(any_nonzero(logits[0])) << "batch " << batch;
    if (batch == 7)
      EXPECT_NE(logits[0], batched_logits(net, backend, images, n, per_image, batch, 4, 0.0))
          << "σ = 0.1 must change the logits";
  }
}

// The dynamic ADC's range is the min and max over the batch: permuting the images of a batch
// permutes their logits bit for bit (no order enters the range or an image's sums).
TEST(ResNetDeterminism, DynamicAdcNoisyChipPermutedBatchPermutesLogitsExactly) {
  Golden g = load_golden(kGoldenModels[1]);
  const ResNet& net = *g.model.network;
  const ResNetArch& arch = net.arch();
  const size_t per_image = size_t(arch.in_channels) * arch.input_height * arch.input_width;
  const int n = 7, classes = arch.num_classes;
  const auto images = random_images(n, per_image, test_seed(1403));
  std::vector<float> reversed(images.size());
  for (int i = 0; i < n; ++i)
    std::copy_n(images.begin() + size_t(i) * per_image, per_image,
                reversed.begin() + size_t(n - 1 - i) * per_image);
  CimConfig config;
  config.adc_bits = 6;
  config.subarray_rows = 19;
  config.seed = test_seed(1404);
  CpuCimBackend backend(net.cim_layers(), config);
  const auto a = batched_logits(net, backend, images, n, per_image, n, 2, 0.1);
  const auto b = batched_logits(net, backend, reversed, n, per_image, n, 2, 0.1);
  ASSERT_EQ(a.size(), b.size());
  EXPECT_TRUE(any_nonzero(a));
  for (size_t e = 0; e < a.size(); ++e)
    for (int i = 0; i < n; ++i)
      for (int c = 0; c < classes; ++c)
        EXPECT_EQ(a[e][size_t(i) * classes + c], b[e][size_t(n - 1 - i) * classes + c])
            << "exit " << e << " image " << i << " class " << c;
}

// With a batch-independent ADC (fixed, ideal) a noisy device chip gives every image the same
// logits whatever the batch size and thread count, through the whole awkward network: a batch of
// kMediumBatch on 2 threads against batches of 7 and 1 on 1 thread (test_cim_layer's LookupReads
// does the same with batches of 500 on a plain 8×8 ResNet-8).
TEST(ResNetDeterminism, BatchIndependentAdcsNoisyChipSameLogitsForBatch1And7And84AndThreads) {
  Golden g = load_golden(kGoldenModels[1]);
  const ResNet& net = *g.model.network;
  const ResNetArch& arch = net.arch();
  const size_t per_image = size_t(arch.in_channels) * arch.input_height * arch.input_width;
  const auto images = random_images(kMediumBatch, per_image, test_seed(1405));
  for (AdcMode adc : {AdcMode::kFixed, AdcMode::kIdeal}) {
    CimConfig config;
    config.adc = adc;
    config.adc_bits = 7;
    config.subarray_rows = 19;
    config.reference_variation = true;
    config.seed = test_seed(1406);
    CpuCimBackend backend(net.cim_layers(), config);
    omp_set_num_threads(2);
    const auto whole =
        batched_logits(net, backend, images, kMediumBatch, per_image, kMediumBatch, 3, 0.1);
    EXPECT_TRUE(any_nonzero(whole));
    const auto head = first_images(whole, kFewImages, arch.num_classes);
    EXPECT_NE(head, batched_logits(net, backend, images, kFewImages, per_image, 7, 3, 0.0))
        << to_string(adc) << ": σ = 0.1 must change the logits";
    omp_set_num_threads(1);
    for (int batch : {1, 7})
      EXPECT_EQ(batched_logits(net, backend, images, kFewImages, per_image, batch, 3, 0.1), head)
          << to_string(adc) << " batch " << batch;
    omp_set_num_threads(omp_get_num_procs());
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
