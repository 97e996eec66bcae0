// The training engine's layers against central finite differences: conv (kernels 1, 3, 5, strides
// 1 and 2, odd sizes, bias), batch norm, ReLU, option-A shortcuts (split and after), pooling,
// softmax cross-entropy; and the fake quantisers' forward values and straight-through gradients.
#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <ostream>
#include <random>
#include <string>
#include <vector>

#include "kernels/cim_math.h"
#include "tests/test_util.h"
#include "train/layers.h"
#include "train/quantise.h"

namespace {

using namespace cimsweep;
using namespace cimsweep::train;

void fill_normal(std::vector<float>& v, std::mt19937& rng, float scale = 1.0f) {
  std::normal_distribution<float> normal(0.0f, scale);
  for (float& x : v) x = normal(rng);
}

FeatureMap random_map(int c, int n, int h, int w, std::mt19937& rng) {
  FeatureMap x(c, n, h, w);
  fill_normal(x.data, rng);
  return x;
}

// Σ r·y in double: a scalar whose gradient with respect to y is r.
double project(const FeatureMap& y, const std::vector<float>& r) {
  double sum = 0;
  for (size_t i = 0; i < y.size(); ++i) sum += double(r[i]) * y.data[i];
  return sum;
}

// Checks analytic[i] against the central difference of loss() when values[i] moves by ±eps.
void expect_gradient(const char* what, std::vector<float>& values,
                     const std::vector<float>& analytic, const std::function<double()>& loss,
                     float eps, double relative_tolerance) {
  ASSERT_EQ(values.size(), analytic.size()) << what;
  double scale = 1e-6;
  for (float g : analytic) scale = std::max(scale, double(std::fabs(g)));
  for (size_t i = 0; i < values.size(); ++i) {
    const float saved = values[i];
    values[i] = saved + eps;
    const double up = loss();
    values[i] = saved - eps;
    const double down = loss();
    values[i] = saved;
    const double numeric = (up - down) / (2.0 * double(eps));
    EXPECT_NEAR(analytic[i], numeric, relative_tolerance * scale) << what << " element " << i;
  }
}

struct ConvCase {
  int kernel, stride, in_channels, out_channels, height, width;
  bool bias;
};

void PrintTo(const ConvCase& c, std::ostream* os) {
  *os << "kernel " << c.kernel << ", stride " << c.stride << ", " << c.in_channels << "→"
      << c.out_channels << " channels, " << c.height << "×" << c.width << (c.bias ? ", bias" : "");
}

class ConvGradient : public ::testing::TestWithParam<ConvCase> {};

TEST_P(ConvGradient, MatchesFiniteDifferences) {
  const ConvCase c = GetParam();
  std::mt19937 rng(cimsweep::testing::test_seed(11));
  const ConvGeometry g{c.in_channels, c.out_channels, c.kernel, c.stride, c.kernel / 2};
  FeatureMap x = random_map(c.in_channels, 3, c.height, c.width, rng);
  std::vector<float> weight(size_t(g.out_channels) * g.rows()), bias(size_t(g.out_channels));
  fill_normal(weight, rng, 0.5f);
  fill_normal(bias, rng);
  const float* bias_ptr = c.bias ? bias.data() : nullptr;
  FeatureMap y = conv_forward(g, weight.data(), bias_ptr, x);
  ASSERT_EQ(y.height, g.output_size(c.height));
  ASSERT_EQ(y.width, g.output_size(c.width));
  std::vector<float> r(y.size());
  fill_normal(r, rng);
  FeatureMap dy(y.channels, y.images, y.height, y.width);
  dy.data = r;
  FeatureMap dx;
  std::vector<float> dweight(weight.size()), dbias(bias.size());
  conv_backward(g, weight.data(), x, dy, &dx, dweight.data(), c.bias ? dbias.data() : nullptr);
  auto loss = [&] { return project(conv_forward(g, weight.data(), bias_ptr, x), r); };
  // The layer is linear in each operand: the central difference is exact up to rounding.
  // Measured over the default seed and CIMSWEEP_TEST_SEED=1…30, every shape: at most 1.5e-6 of
  // the tensor's largest gradient (dx, kernel 5, stride 2); 5e-6 is about three times that.
  expect_gradient("dx", x.data, dx.data, loss, 0.25f, 5e-6);
  expect_gradient("dweight", weight, dweight, loss, 0.25f, 5e-6);
  if (c.bias) expect_gradient("dbias", bias, dbias, loss, 0.25f, 5e-6);
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, ConvGradient,
    ::testing::Values(ConvCase{1, 1, 3, 4, 5, 7, false}, ConvCase{3, 1, 2, 3, 7, 5, false},
                      ConvCase{3, 2, 3, 4, 7, 9, false}, ConvCase{5, 2, 2, 3, 9, 6, false},
                      ConvCase{5, 1, 2, 2, 3, 4, false}, ConvCase{1, 2, 4, 6, 7, 7, false},
                      ConvCase{1, 1, 5, 3, 1, 1, true}));

TEST(ConvForward, MatchesDirectConvolution) {
  std::mt19937 rng(cimsweep::testing::test_seed(12));
  const ConvGeometry g{2, 3, 3, 2, 1};
  const FeatureMap x = random_map(2, 2, 5, 6, rng);
  std::vector<float> weight(size_t(g.out_channels) * g.rows());
  fill_normal(weight, rng);
  const FeatureMap y = conv_forward(g, weight.data(), nullptr, x);
  for (int o = 0; o < 3; ++o)
    for (int n = 0; n < 2; ++n)
      for (int oy = 0; oy < y.height; ++oy)
        for (int ox = 0; ox < y.width; ++ox) {
          double sum = 0;
          for (int c = 0; c < 2; ++c)
            for (int i = 0; i < 3; ++i)
              for (int j = 0; j < 3; ++j) {
                const int iy = oy * 2 - 1 + i, ix = ox * 2 - 1 + j;
                if (iy < 0 || iy >= 5 || ix < 0 || ix >= 6) continue;
                sum += double(weight[((o * 2 + c) * 3 + i) * 3 + j]) *
                       x.data[((size_t(c) * 2 + n) * 5 + iy) * 6 + ix];
              }
          // Float sums of 18 products against a double sum: at most 1.3e-6 over the default seed
          // and CIMSWEEP_TEST_SEED=1…30.
          EXPECT_NEAR(y.data[((size_t(o) * 2 + n) * y.height + oy) * y.width + ox], sum, 1e-5);
        }
}

TEST(BatchNormGradient, TrainingModeMatchesFiniteDifferences) {
  std::mt19937 rng(cimsweep::testing::test_seed(13));
  FeatureMap x = random_map(3, 4, 3, 2, rng);
  for (size_t i = 0; i < x.size(); ++i) x.data[i] = 2.0f * x.data[i] + 0.5f;
  std::vector<float> gamma{1.5f, -0.7f, 0.9f}, beta{0.1f, 0.2f, -0.3f};
  std::vector<float> r(x.size());
  fill_normal(r, rng);
  auto run = [&](BatchNormCache& cache) {
    FeatureMap y = x;
    batchnorm_train_forward(gamma.data(), beta.data(), y, cache, nullptr, nullptr);
    return y;
  };
  BatchNormCache cache;
  run(cache);
  FeatureMap d(x.channels, x.images, x.height, x.width);
  d.data = r;
  std::vector<float> dgamma(3), dbeta(3);
  batchnorm_backward(gamma.data(), cache, d, dgamma.data(), dbeta.data());
  auto loss = [&] {
    BatchNormCache scratch;
    return project(run(scratch), r);
  };
  // Largest error over the default seed and CIMSWEEP_TEST_SEED=1…30, as a fraction of the
  // tensor's largest gradient: dx 6.0e-5, dgamma 3.6e-5, dbeta 4.6e-6 (the step's curvature error
  // and float rounding); the bounds are about three times those.
  expect_gradient("dx", x.data, d.data, loss, 1e-2f, 2e-4);
  expect_gradient("dgamma", gamma, dgamma, loss, 1e-2f, 1e-4);
  expect_gradient("dbeta", beta, dbeta, loss, 1e-2f, 1.5e-5);
}

TEST(BatchNorm, RunningStatisticsAndEvalModeFollowPyTorch) {
  FeatureMap x(1, 2, 1, 2);
  x.data = {1.0f, 2.0f, 3.0f, 6.0f};  // mean 3, biased var 3.5, unbiased 14/3
  std::vector<float> gamma{2.0f}, beta{1.0f}, mean{0.0f}, var{1.0f};
  BatchNormCache cache;
  FeatureMap y = x;
  batchnorm_train_forward(gamma.data(), beta.data(), y, cache, mean.data(), var.data());
  EXPECT_FLOAT_EQ(mean[0], 0.3f);
  EXPECT_FLOAT_EQ(var[0], 0.9f + 0.1f * 14.0f / 3.0f);
  // Measured: exactly equal; 1e-5 is about 20 float ulps of the value (4.2), room for another
  // order of the float operations.
  EXPECT_NEAR(y.data[3], 2.0f * 3.0f / std::sqrt(3.5f + kBatchNormEps) + 1.0f, 1e-5);
  FeatureMap z = x;
  batchnorm_eval_forward(gamma.data(), beta.data(), mean.data(), var.data(), z);
  const float scale = 2.0f / std::sqrt(var[0] + kBatchNormEps);
  EXPECT_EQ(z.data[1], 2.0f * scale + (1.0f - mean[0] * scale));
}

TEST(ReluGradient, PassesWherePositive) {
  std::mt19937 rng(cimsweep::testing::test_seed(14));
  FeatureMap x = random_map(2, 3, 4, 3, rng);
  FeatureMap y = x;
  relu_forward(y);
  FeatureMap d = x;
  fill_normal(d.data, rng);
  const std::vector<float> r = d.data;
  relu_backward(y, d);
  for (size_t i = 0; i < x.size(); ++i) {
    EXPECT_EQ(y.data[i], x.data[i] > 0 ? x.data[i] : 0.0f);
    EXPECT_EQ(d.data[i], x.data[i] > 0 ? r[i] : 0.0f);
  }
}

class ShortcutAGradient : public ::testing::TestWithParam<bool> {};

TEST_P(ShortcutAGradient, SubsamplesPadsAndScattersBack) {
  const bool split = GetParam();
  std::mt19937 rng(cimsweep::testing::test_seed(15));
  FeatureMap x = random_map(3, 2, 5, 7, rng);  // odd sizes: ceil(5/2) × ceil(7/2)
  const int out_channels = 8, before = split ? (out_channels - 3) / 2 : 0;
  const FeatureMap y = shortcut_a_forward(x, out_channels, 2, before);
  ASSERT_EQ(y.height, 3);
  ASSERT_EQ(y.width, 4);
  for (int c = 0; c < out_channels; ++c)
    for (int n = 0; n < 2; ++n)
      for (int i = 0; i < 3; ++i)
        for (int j = 0; j < 4; ++j) {
          const float expected =
              (c >= before && c < before + 3)
                  ? x.data[((size_t(c - before) * 2 + n) * 5 + 2 * i) * 7 + 2 * j]
                  : 0.0f;
          EXPECT_EQ(y.data[((size_t(c) * 2 + n) * 3 + i) * 4 + j], expected);
        }
  std::vector<float> r(y.size());
  fill_normal(r, rng);
  FeatureMap dy(y.channels, y.images, y.height, y.width);
  dy.data = r;
  FeatureMap dx(x.channels, x.images, x.height, x.width);
  shortcut_a_backward(dy, 2, before, dx);
  auto loss = [&] { return project(shortcut_a_forward(x, out_channels, 2, before), r); };
  // A copy: only the loss's rounding. At most 2.4e-7 of the largest gradient over the default
  // seed and CIMSWEEP_TEST_SEED=1…30; the bound is four times that.
  expect_gradient("dx", x.data, dx.data, loss, 0.25f, 1e-6);
}

INSTANTIATE_TEST_SUITE_P(Layouts, ShortcutAGradient, ::testing::Values(true, false),
                         [](const auto& info) { return info.param ? "split" : "after"; });

TEST(PoolGradient, MatchesFiniteDifferences) {
  std::mt19937 rng(cimsweep::testing::test_seed(16));
  FeatureMap x = random_map(3, 2, 3, 5, rng);
  std::vector<float> r(size_t(3) * 2);
  fill_normal(r, rng);
  FeatureMap dy(3, 2, 1, 1);
  dy.data = r;
  const FeatureMap dx = global_average_pool_backward(dy, 3, 5);
  auto loss = [&] { return project(global_average_pool(x), r); };
  // At most 1.0e-6 of the largest gradient over the default seed and CIMSWEEP_TEST_SEED=1…30;
  // the bound is three times that.
  expect_gradient("dx", x.data, dx.data, loss, 0.25f, 3e-6);
}

TEST(CrossEntropyGradient, MatchesFiniteDifferencesAndCountsCorrect) {
  std::mt19937 rng(cimsweep::testing::test_seed(17));
  FeatureMap logits = random_map(5, 4, 1, 1, rng);
  const std::vector<int32_t> labels{0, 3, 4, 1};
  FeatureMap d;
  int correct = -1;
  const double loss0 = softmax_cross_entropy(logits, labels.data(), 0.5f, d, &correct);
  int expected_correct = 0;
  double expected_loss = 0;
  for (int n = 0; n < 4; ++n) {
    int best = 0;
    double sum = 0;
    for (int c = 0; c < 5; ++c) {
      if (logits.data[size_t(c) * 4 + n] > logits.data[size_t(best) * 4 + n]) best = c;
      sum += std::exp(double(logits.data[size_t(c) * 4 + n]));
    }
    expected_correct += best == labels[n];
    expected_loss += std::log(sum) - logits.data[size_t(labels[n]) * 4 + n];
  }
  EXPECT_EQ(correct, expected_correct);
  // Both in double: at most 4.4e-16 (2 ulps) over the default seed and CIMSWEEP_TEST_SEED=1…30;
  // 1e-14 is about 20 ulps of a loss near 2.
  EXPECT_NEAR(loss0, expected_loss / 4, 1e-14);
  FeatureMap scratch;
  auto loss = [&] {
    return 0.5 * softmax_cross_entropy(logits, labels.data(), 0.5f, scratch, nullptr);
  };
  // At most 2.2e-5 of the largest gradient over the default seed and CIMSWEEP_TEST_SEED=1…30
  // (the step's curvature error); the bound is about three times that.
  expect_gradient("dlogits", logits.data, d.data, loss, 1e-2f, 6e-5);
}

// ---------------------------------------------------------------------------------------------
// Fake quantisers.

TEST(QuantiseWeights, MaxAbsGivesTheDigitalLayersWeights) {
  std::mt19937 rng(cimsweep::testing::test_seed(18));
  std::vector<float> w(200), q(200);
  fill_normal(w, rng, 0.3f);
  std::vector<uint8_t> pass(200);
  for (int bits : {2, 4, 8}) {
    quantise_weights(w.data(), w.size(), 20, bits, WeightScaling::kMaxAbs, q.data(), pass.data());
    float max_abs = 0;
    for (float v : w) max_abs = std::max(max_abs, std::fabs(v));
    const double top = (1 << bits) - 1;
    for (size_t i = 0; i < w.size(); ++i) {
      // cim-model §1 written out here (not cimsweep's cim::weight_level): D = round((2^b − 1)/2 ·
      // (ŵ + 1)), ties to even, ŵ = w/s in float32.
      const double level = std::nearbyint(top / 2.0 * (double(w[i] / max_abs) + 1.0));
      EXPECT_EQ(q[i], float(max_abs * (2.0 * level - top) / top));
      EXPECT_LE(std::fabs(q[i] - w[i]), max_abs / top * 1.0001);  // within half a level (2/top)
      EXPECT_EQ(pass[i], 1);
    }
  }
}

// Hand-computed: s = 0.8, ŵ = −1, −0.375, 0, 0.125, 0.5625, 1 → (2^b − 1)/2·(ŵ + 1) = 0, 79.6875,
// 127.5, 143.4375, 199.21875, 255 (8 bits; 127.5 rounds to the even 128) and 0, 4.6875, 7.5,
// 8.4375, 11.71875, 15 (4 bits), so 2D − (2^b − 1) as listed.
TEST(QuantiseWeights, MaxAbsHandComputedLevels) {
  const std::vector<float> w{-0.8f, -0.3f, 0.0f, 0.1f, 0.45f, 0.8f};
  std::vector<float> q(w.size());
  std::vector<uint8_t> pass(w.size());
  const std::vector<std::pair<int, std::vector<int>>> cases = {
      {8, {-255, -95, 1, 31, 143, 255}}, {4, {-15, -5, 1, 1, 9, 15}}};
  for (const auto& [bits, signed_levels] : cases) {
    quantise_weights(w.data(), w.size(), 6, bits, WeightScaling::kMaxAbs, q.data(), pass.data());
    const double top = (1 << bits) - 1;
    for (size_t i = 0; i < w.size(); ++i)
      EXPECT_EQ(q[i], float(double(0.8f) * signed_levels[i] / top)) << bits << " bits, w = " << w[i];
  }
}

TEST(QuantiseWeights, WageClipsAndStopsTheGradientOutsideItsRange) {
  std::vector<float> w{-1.0f, -0.02f, 0.0f, 0.003f, 0.05f, 2.0f}, q(6);
  std::vector<uint8_t> pass(6);
  const int fan_in = 144, bits = 8;
  const double alpha = wage_alpha(fan_in, bits);
  EXPECT_EQ(alpha, 1.0);  // sqrt(6/144) = 0.204 > 1.5/128, so α = max(Shift(0.057), 1) = 1
  quantise_weights(w.data(), w.size(), fan_in, bits, WeightScaling::kWage, q.data(), pass.data());
  // By hand (α = 1): ŵ = round(128·clip(w, ±127/128))/128 = −127, −3, 0, 0, 6, 127 (/128); then
  // D = round(127.5·(ŵ + 1)) = 1, 125, 128, 128, 133, 254, i.e. 2D − 255 as listed.
  const int signed_levels[] = {-253, -5, 1, 1, 11, 253};
  for (size_t i = 0; i < w.size(); ++i)
    EXPECT_EQ(q[i], float(signed_levels[i] / 255.0 / alpha)) << "w = " << w[i];
  EXPECT_EQ(pass, (std::vector<uint8_t>{0, 1, 1, 1, 1, 0}));
}

TEST(QuantiseInputs, ForwardValuesAndStraightThroughGradient) {
  const float a_max = 2.5f;
  const std::vector<float> x{-0.3f, 0.0f, 0.004f, 1.0f, 2.49f, 2.5f, 3.7f};
  std::vector<float> q(x.size());
  std::vector<uint8_t> region(x.size());
  quantise_inputs(x.data(), x.size(), a_max, 8, q.data(), region.data());
  for (size_t i = 0; i < x.size(); ++i)
    EXPECT_EQ(q[i], float(a_max / 255.0 * cim::input_level(x[i], a_max, 8))) << i;
  EXPECT_EQ(q[0], 0.0f);
  EXPECT_EQ(q[6], a_max);
  EXPECT_EQ(q[3], float(2.5 / 255.0 * 102));  // round(255 · 1/2.5) = 102
  const std::vector<float> dy{1, 2, 3, 4, 5, 6, 7};
  std::vector<float> dx(x.size());
  double d_range = 0;
  quantise_inputs_backward(dy.data(), region.data(), x.size(), dx.data(), &d_range);
  EXPECT_EQ(dx, (std::vector<float>{0, 2, 3, 4, 5, 6, 0}));  // pass inside [0, a_max], 0 outside
  EXPECT_EQ(d_range, 7.0);  // PACT: Σ dy over inputs clipped at the top
}

}  // namespace
