// The CPU copy of the CUDA training kernels (train/cuda/train_reference.h, the kernels' own
// per-element bodies and reduction trees) against the CPU training engine, on fresh random inputs
// of awkward sizes, in every build: what the GPU computes is checked here without a GPU, and the
// GPU against the CPU engine in tests/test_train_cuda.cpp. Exact wherever both sides do the same
// operations; where a sum runs in another order (the block trees), a stated tolerance.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "tests/test_util.h"
#include "train/cuda/train_reference.h"
#include "train/layers.h"
#include "train/network.h"
#include "train/optimizer.h"
#include "train/quantise.h"

namespace {

using namespace cimsweep;
using namespace cimsweep::train;
namespace ref = cimsweep::train::gpu::reference;

std::vector<float> random_values(size_t n, std::mt19937& rng, float lo = -1.0f, float hi = 1.0f) {
  std::uniform_real_distribution<float> u(lo, hi);
  std::vector<float> v(n);
  for (float& x : v) x = u(rng);
  return v;
}

FeatureMap random_map(int c, int n, int h, int w, std::mt19937& rng) {
  FeatureMap m(c, n, h, w);
  m.data = random_values(m.size(), rng);
  return m;
}

// The engine's channel-major map as the GPU holds it (NCHW), through the reference's converter.
std::vector<float> to_nchw(const FeatureMap& m) {
  std::vector<float> out(m.size());
  ref::cnhw_to_nchw(m.data.data(), out.data(), m.channels, m.images, int64_t(m.plane()));
  return out;
}

bool any_nonzero(const std::vector<float>& v) {
  return std::any_of(v.begin(), v.end(), [](float x) { return x != 0.0f; });
}

// Sizes that fill no block evenly (ggml's awkward shapes) and one that spans several blocks.
const int kCounts[] = {1, 33, 132, 260, 4097};

TEST(TrainReference, LayoutRoundTripAndIndex) {
  std::mt19937 rng(cimsweep::testing::test_seed(1));
  const FeatureMap m = random_map(5, 3, 7, 11, rng);
  const std::vector<float> nchw = to_nchw(m);
  for (int img = 0; img < 3; ++img)
    for (int ch = 0; ch < 5; ++ch)
      for (size_t p = 0; p < m.plane(); ++p)
        ASSERT_EQ(nchw[(size_t(img) * 5 + ch) * m.plane() + p],
                  m.data[(size_t(ch) * 3 + img) * m.plane() + p]);
  std::vector<float> back(m.size());
  ref::nchw_to_cnhw(nchw.data(), back.data(), 5, 3, int64_t(m.plane()));
  EXPECT_EQ(back, m.data);
}

TEST(TrainReference, ReluForwardAndBackwardAreExact) {
  std::mt19937 rng(cimsweep::testing::test_seed(2));
  FeatureMap x = random_map(3, 4, 5, 11, rng), dy = random_map(3, 4, 5, 11, rng);
  std::vector<float> gx = to_nchw(x);
  relu_forward(x);
  ref::relu_forward(gx.data(), int64_t(gx.size()));
  EXPECT_EQ(gx, to_nchw(x));
  std::vector<float> gdy = to_nchw(dy);
  relu_backward(x, dy);
  ref::relu_backward(gx.data(), gdy.data(), int64_t(gdy.size()));
  EXPECT_EQ(gdy, to_nchw(dy));
  EXPECT_TRUE(any_nonzero(gdy));
}

TEST(TrainReference, ShortcutAIsExact) {
  std::mt19937 rng(cimsweep::testing::test_seed(3));
  for (const int stride : {1, 2}) {
    const int in_c = 5, n = 3, h = 9, w = 7, out_c = 11, before = 3;
    const FeatureMap x = random_map(in_c, n, h, w, rng);
    const FeatureMap y = shortcut_a_forward(x, out_c, stride, before);
    const gpu::kernel::ShortcutShape shape{n, in_c, h, w, out_c, y.height, y.width, stride, before};
    const std::vector<float> gx = to_nchw(x);
    std::vector<float> gy(y.size(), -7.0f);  // poisoned: every element must be written
    ref::shortcut_a_forward(gx.data(), gy.data(), shape);
    EXPECT_EQ(gy, to_nchw(y)) << "stride " << stride;

    const FeatureMap dy = random_map(out_c, n, y.height, y.width, rng);
    FeatureMap dx = random_map(in_c, n, h, w, rng);  // accumulates into what is there
    std::vector<float> gdx = to_nchw(dx);
    shortcut_a_backward(dy, stride, before, dx);
    const std::vector<float> gdy = to_nchw(dy);
    ref::shortcut_a_backward(gdy.data(), gdx.data(), shape);
    EXPECT_EQ(gdx, to_nchw(dx)) << "stride " << stride;
  }
}

TEST(TrainReference, GlobalAveragePoolIsExact) {
  std::mt19937 rng(cimsweep::testing::test_seed(4));
  const FeatureMap x = random_map(6, 5, 7, 9, rng);
  const FeatureMap y = global_average_pool(x);
  const std::vector<float> gx = to_nchw(x);
  std::vector<float> gy(y.size());
  ref::global_average_pool(gx.data(), gy.data(), int64_t(gy.size()), int64_t(x.plane()));
  EXPECT_EQ(gy, to_nchw(y));
  const FeatureMap dy = random_map(6, 5, 1, 1, rng);
  const FeatureMap dx = global_average_pool_backward(dy, 7, 9);
  const std::vector<float> gdy = to_nchw(dy);
  std::vector<float> gdx(dx.size());
  ref::global_average_pool_backward(gdy.data(), gdx.data(), int64_t(gdy.size()), 63);
  EXPECT_EQ(gdx, to_nchw(dx));
}

TEST(TrainReference, ChannelSumAndBias) {
  std::mt19937 rng(cimsweep::testing::test_seed(5));
  for (const int plane_side : {1, 3, 17}) {  // 1×1 planes: the FC layers' bias
    const int n = 7, c = 5;
    const FeatureMap x = random_map(c, n, plane_side, plane_side, rng);
    const std::vector<float> gx = to_nchw(x);
    std::vector<float> sums(c);
    ref::channel_sum(gx.data(), sums.data(), n, c, int64_t(x.plane()));
    for (int ch = 0; ch < c; ++ch) {
      // The engine's order (one channel's values in a row), in long double: the tree's
      // double sum of at most 2023 values of magnitude < 1 differs by far less than a float ulp.
      long double exact = 0;
      for (size_t k = 0; k < x.channel_size(); ++k) exact += x.data[size_t(ch) * x.channel_size() + k];
      EXPECT_NEAR(sums[size_t(ch)], double(exact), 1e-6 * std::max(1.0L, std::fabs(exact)))
          << "channel " << ch << ", plane " << plane_side;
    }
    EXPECT_TRUE(any_nonzero(sums));
    const std::vector<float> bias = random_values(size_t(c), rng);
    std::vector<float> y = gx;
    ref::add_bias(y.data(), bias.data(), n, c, int64_t(x.plane()));
    for (size_t i = 0; i < y.size(); ++i)
      ASSERT_EQ(y[i], gx[i] + bias[(i / x.plane()) % size_t(c)]) << i;
  }
}

TEST(TrainReference, SoftmaxCrossEntropyIsExact) {
  std::mt19937 rng(cimsweep::testing::test_seed(6));
  for (const int n : {1, 33, 130}) {
    FeatureMap logits = random_map(10, n, 1, 1, rng);
    for (float& v : logits.data) v *= 8.0f;
    std::vector<int32_t> labels(static_cast<size_t>(n));
    for (int32_t& l : labels) l = int32_t(rng() % 10u);
    FeatureMap dlogits;
    int right = -1, right_ref = -2;
    const double loss = softmax_cross_entropy(logits, labels.data(), 0.7f, dlogits, &right);
    const std::vector<float> z = to_nchw(logits);  // [n, classes] row-major
    std::vector<float> dz(z.size());
    const double loss_ref =
        ref::softmax_cross_entropy(z.data(), labels.data(), n, 10, 0.7f, dz.data(), &right_ref);
    EXPECT_EQ(loss_ref, loss) << "n " << n;
    EXPECT_EQ(right_ref, right);
    EXPECT_EQ(dz, to_nchw(dlogits));
    EXPECT_GT(loss, 0.0);
  }
}

TEST(TrainReference, WeightQuantisersAreExact) {
  std::mt19937 rng(cimsweep::testing::test_seed(7));
  for (const WeightScaling scaling : {WeightScaling::kMaxAbs, WeightScaling::kWage})
    for (const int bits : {2, 5, 8})
      for (const int count : kCounts) {
        // WAGE's clipping range is about ±1/α: spread the weights past it so some clip.
        const std::vector<float> w = random_values(size_t(count), rng, -0.6f, 0.6f);
        const int fan_in = 27;
        std::vector<float> out(w.size()), out_ref(w.size(), -9.0f);
        std::vector<uint8_t> pass(w.size()), pass_ref(w.size(), 7);
        quantise_weights(w.data(), w.size(), fan_in, bits, scaling, out.data(), pass.data());
        ref::quantise_weights(w.data(), count, fan_in, bits, scaling, out_ref.data(),
                              pass_ref.data());
        const std::string what = std::string(scaling == WeightScaling::kWage ? "wage" : "maxabs") +
                                 " bits " + std::to_string(bits) + " count " + std::to_string(count);
        EXPECT_EQ(out_ref, out) << what;
        EXPECT_EQ(pass_ref, pass) << what;
        EXPECT_TRUE(any_nonzero(out_ref)) << what;
      }
  std::vector<float> zeros(33, 0.0f);  // max |w| = 0: every weight quantises to zero
  EXPECT_EQ(ref::max_abs(zeros.data(), 33), 0.0f);
}

TEST(TrainReference, InputQuantiserAndPactGradient) {
  std::mt19937 rng(cimsweep::testing::test_seed(8));
  for (const int count : kCounts) {
    const float a_max = 1.5f;
    const std::vector<float> x = random_values(size_t(count), rng, -0.5f, 2.0f);
    const std::vector<float> dy = random_values(size_t(count), rng);
    std::vector<float> out(x.size()), out_ref(x.size());
    std::vector<uint8_t> region(x.size()), region_ref(x.size(), 9);
    quantise_inputs(x.data(), x.size(), a_max, 8, out.data(), region.data());
    ref::quantise_inputs(x.data(), count, a_max, 8, out_ref.data(), region_ref.data());
    EXPECT_EQ(out_ref, out) << count;
    EXPECT_EQ(region_ref, region) << count;
    std::vector<float> dx(x.size()), dx_ref(x.size());
    double range = 0, range_ref = 0;
    quantise_inputs_backward(dy.data(), region.data(), dy.size(), dx.data(), &range);
    ref::quantise_inputs_backward(dy.data(), region_ref.data(), count, dx_ref.data(), &range_ref);
    EXPECT_EQ(dx_ref, dx) << count;
    // Σ in 1024 strided partials and a tree against the engine's one running sum, both double:
    // they differ only by double rounding.
    EXPECT_NEAR(range_ref, range, 1e-12 * std::max(1.0, std::fabs(range))) << count;
  }
}

TEST(TrainReference, SgdIsExact) {
  std::mt19937 rng(cimsweep::testing::test_seed(9));
  for (const bool nesterov : {false, true})
    for (const bool decays : {false, true}) {
      Parameter p;
      p.name = "w";
      p.value = random_values(260, rng);
      p.grad = random_values(260, rng);
      p.momentum = random_values(260, rng);
      p.weight_decay = decays;
      std::vector<float> value = p.value, momentum = p.momentum;
      const std::vector<float> grad = p.grad;
      SgdSettings settings;
      settings.nesterov = nesterov;
      std::vector<Parameter> parameters{p};
      sgd_step(parameters, settings, 0.05);
      ref::sgd_update(value.data(), grad.data(), momentum.data(), 260, decays,
                      float(settings.weight_decay), float(settings.momentum), float(0.05),
                      nesterov);
      EXPECT_EQ(value, parameters[0].value) << "nesterov " << nesterov << " decay " << decays;
      EXPECT_EQ(momentum, parameters[0].momentum);
    }
}

TEST(TrainReference, AddAndMask) {
  std::mt19937 rng(cimsweep::testing::test_seed(10));
  const std::vector<float> x = random_values(132, rng);
  std::vector<float> y = random_values(132, rng), sum = y;
  ref::add_inplace(sum.data(), x.data(), 132);
  std::vector<uint8_t> pass(132);
  for (uint8_t& p : pass) p = uint8_t(rng() % 2u);
  std::vector<float> masked = sum;
  ref::mask_gradient(masked.data(), pass.data(), 132);
  for (size_t i = 0; i < 132; ++i) {
    ASSERT_EQ(sum[i], y[i] + x[i]);
    ASSERT_EQ(masked[i], pass[i] ? sum[i] : 0.0f);
  }
}

}  // namespace
