// The noise contract of cim-model.md §2: z is a pure function of (seed, trial, layer, cell, read).
#include <gtest/gtest.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <utility>
#include <random>
#include <vector>

#include "host/cpu/cim_cpu.h"
#include "kernels/noise.h"
#include "tests/test_util.h"

namespace {

using cimsweep::testing::test_seed;

TEST(Noise, StandardNormalMomentsWithinStatisticalBounds) {
  const uint32_t seed = test_seed(11);
  const int n = 1 << 20;
  double sum = 0, sum_sq = 0, sum_4 = 0;
  int beyond_3 = 0;
  for (int i = 0; i < n; ++i) {
    const double z = cim::cell_noise({seed, 3}, 5, cim::kWeightCells, uint64_t(i), 0);
    sum += z;
    sum_sq += z * z;
    sum_4 += z * z * z * z;
    beyond_3 += std::fabs(z) > 3;
  }
  const double mean = sum / n, var = sum_sq / n - mean * mean;
  // Five standard errors: mean ~ 1/√n, variance ~ √(2/n), fourth moment ~ √(96/n).
  EXPECT_NEAR(mean, 0.0, 5.0 / std::sqrt(n));
  EXPECT_NEAR(var, 1.0, 5.0 * std::sqrt(2.0 / n));
  EXPECT_NEAR(sum_4 / n, 3.0, 5.0 * std::sqrt(96.0 / n));
  const double expected_beyond_3 = n * 0.0026998;
  EXPECT_NEAR(beyond_3, expected_beyond_3, 5.0 * std::sqrt(expected_beyond_3));
}

TEST(Noise, PureFunctionOfItsCoordinates) {
  const uint32_t seed = test_seed(5);
  const float a = cim::cell_noise({seed, 1}, 2, cim::kWeightCells, 12345, 0);
  EXPECT_EQ(a, cim::cell_noise({seed, 1}, 2, cim::kWeightCells, 12345, 0));
  EXPECT_NE(a, cim::cell_noise({seed, 2}, 2, cim::kWeightCells, 12345, 0));      // trial
  EXPECT_NE(a, cim::cell_noise({seed + 1, 1}, 2, cim::kWeightCells, 12345, 0));  // seed
  EXPECT_NE(a, cim::cell_noise({seed, 1}, 3, cim::kWeightCells, 12345, 0));      // layer
  EXPECT_NE(a, cim::cell_noise({seed, 1}, 2, cim::kReferenceCells, 12345, 0));   // stream
  EXPECT_NE(a, cim::cell_noise({seed, 1}, 2, cim::kWeightCells, 12346, 0));      // cell
  EXPECT_NE(a, cim::cell_noise({seed, 1}, 2, cim::kWeightCells, 12345, 1));      // read
}

cimsweep::CimLayerSpec random_layer(std::mt19937& rng, std::vector<float>& weights) {
  cimsweep::CimLayerSpec spec;
  spec.name = "conv";
  spec.out_channels = 9;
  spec.in_channels = 33;
  spec.kernel_h = spec.kernel_w = 3;
  spec.pad = 1;
  std::normal_distribution<float> normal(0.0f, 0.2f);
  weights.resize(size_t(spec.out_channels) * spec.rows());
  for (float& w : weights) w = normal(rng);
  spec.weight = weights.data();
  spec.input_range = 1.5f;
  return spec;
}

// The chip of (seed, trial) does not depend on the thread count.
TEST(Noise, SameChipForOneAndTwoThreads) {
  std::mt19937 rng(test_seed(21));
  std::vector<float> weights;
  const auto spec = random_layer(rng, weights);
  cimsweep::CimConfig config;
  config.subarray_rows = 20;
  config.reference_variation = true;
  std::vector<std::vector<float>> chips[2];
  const int threads[2] = {1, 2};
  for (int i = 0; i < 2; ++i) {
    omp_set_num_threads(threads[i]);
    cimsweep::CpuCimBackend backend({spec}, config);
    backend.program_chip(7, 0.1);
    for (int s = 0; s < backend.layers()[0].subarrays(); ++s)
      chips[i].push_back(backend.programmed_subarray(0, s));
  }
  omp_set_num_threads(omp_get_num_procs());
  EXPECT_EQ(chips[0], chips[1]);
  // And the chip is noisy: not the clean conductances.
  cimsweep::CpuCimBackend other({spec}, config);
  other.program_chip(8, 0.1);
  EXPECT_NE(other.programmed_subarray(0, 0), chips[0][0]) << "different trials must differ";
}

// Batch size changes neither the chip nor (with a batch-independent ADC) any output.
TEST(Noise, SameOutputsForBatchSizes1And7And500) {
  std::mt19937 rng(test_seed(31));
  std::vector<float> weights;
  auto spec = random_layer(rng, weights);
  spec.in_channels = 3;
  weights.resize(size_t(spec.out_channels) * spec.rows());
  cimsweep::CimConfig config;
  config.adc = cimsweep::AdcMode::kFixed;
  const int images = 500, h = 5, w = 4;
  std::vector<float> x(size_t(images) * 3 * h * w);
  std::uniform_real_distribution<float> uniform(0.0f, 2.0f);
  for (float& v : x) v = uniform(rng);
  std::vector<std::vector<float>> outputs;
  for (int batch : {1, 7, 500}) {
    cimsweep::CpuCimBackend backend({spec}, config);
    backend.program_chip(3, 0.15);
    std::vector<float> y(size_t(images) * spec.out_channels * h * w);
    for (int first = 0; first < images; first += batch) {
      const int n = std::min(batch, images - first);
      backend.run_layer(0, x.data() + size_t(first) * 3 * h * w, n, h, w,
                        y.data() + size_t(first) * spec.out_channels * h * w);
    }
    outputs.push_back(y);
  }
  EXPECT_EQ(outputs[0], outputs[1]);
  EXPECT_EQ(outputs[0], outputs[2]);
  bool any_nonzero = false;
  for (float v : outputs[0]) any_nonzero |= v != 0.0f;
  EXPECT_TRUE(any_nonzero);
}

}  // namespace

// Known answers: Random123's published Philox4x32-10 vectors (its kat_vectors file), through the
// library directly and through cimsweep's (seed, trial) key and (cell group, layer, stream, read)
// counter layout.
TEST(NoiseKnownAnswers, Philox4x32x10PublishedVectors) {
  typedef r123::Philox4x32 Rng;
  struct Vector {
    Rng::ctr_type counter;
    Rng::key_type key;
    uint32_t expected[4];
  };
  const Vector vectors[] = {
      {{{0u, 0u, 0u, 0u}}, {{0u, 0u}}, {0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u}},
      {{{0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu}},
       {{0xffffffffu, 0xffffffffu}},
       {0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu}},
      {{{0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u}},
       {{0xa4093822u, 0x299f31d0u}},
       {0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u}},
  };
  Rng rng;
  for (const Vector& v : vectors) {
    const Rng::ctr_type out = rng(v.counter, v.key);
    for (int i = 0; i < 4; ++i) EXPECT_EQ(out.v[i], v.expected[i]) << "word " << i;
  }
}

// z = Φ⁻¹((u + 1/2)/2^32) of the published words, with cimsweep's key and counter layout: the
// π vector is key (seed 0xa4093822, trial 0x299f31d0), cell group 0x85a308d3'243f6a88, layer
// 0x198a2e of stream 0x13, read 0x03707344. Expected values: Φ⁻¹ of the exact p in 50-digit
// arithmetic (mpmath), rounded to float; the float of AS241's double may differ by one ulp only
// where the double lies within 1e-16 of a float rounding boundary.
TEST(NoiseKnownAnswers, NormalsOfPublishedPhiloxWordsThroughCimsweepsCounterLayout) {
  struct Case {
    cim::NoiseKey key;
    uint64_t group;
    uint32_t layer, stream, read;
    double expected[4];
  };
  const Case cases[] = {
      {{0u, 0u}, 0, 0, 0, 0,
       {-0.2558159704329814986859, 1.177591239172135125955, 0.6301836563560434756722,
        0.2675622493905200040588}},
      {{0xa4093822u, 0x299f31d0u}, 0x85a308d3243f6a88ull, 0x198a2eu, 0x13u, 0x03707344u,
       {0.9080319946588681841209, 0.20700670206569231312, -0.4886949036015515202291,
        -1.076256618021674887957}},
  };
  for (const Case& c : cases) {
    float z[4];
    cim::normal4(c.key, c.layer, c.stream, c.group, c.read, z);
    for (int i = 0; i < 4; ++i) {
      const float expected = float(c.expected[i]);
      EXPECT_LE(std::fabs(z[i] - expected),
                std::nextafter(std::fabs(expected), INFINITY) - std::fabs(expected))
          << "draw " << i << ": " << z[i] << " vs " << expected;
    }
  }
}

// AS241 against Φ⁻¹ in 50-digit arithmetic (mpmath: Newton on ncdf from the exact double p), in
// all three of its branches (central |p − 1/2| ≤ 0.425, tail r ≤ 5, far tail r > 5). Measured
// here: at most 3.7e-16 relative (p = 0.999999, 2 ulps); the bound leaves 2× margin. The far tail (p < 1.4e-11) is
// never reached by a Philox draw, whose smallest p is 2^−33, but is part of the function.
TEST(NoiseKnownAnswers, As241MatchesHighPrecisionQuantiles) {
  const std::pair<double, double> quantiles[] = {
      {0.5, 0.0},
      {0.6, 0.253347103135799741325},
      {0.9, 1.28155156554460059349},
      {0.925, 1.43953147093845622906},
      {0.075, -1.43953147093845593495},
      {0.975, 1.9599639845400538556},
      {0.01, -2.32634787404084109308},
      {0.0001, -3.71901648545568055229},
      {1e-06, -4.75342430882289895734},
      {0.999999, 4.75342430881708776569},
      {1e-15, -7.94134532617099677133},
      {1e-300, -37.0470962993611992365},
  };
  double worst = 0;
  for (const auto& [p, expected] : quantiles) {
    const double z = cim::normal_quantile(p);
    const double error = std::fabs(z - expected) / std::max(1.0, std::fabs(expected));
    worst = std::max(worst, error);
    EXPECT_LE(error, 7.5e-16) << "p = " << p << ": " << z << " vs " << expected;
  }
  std::printf("AS241 worst relative error over %zu quantiles: %.3g\n",
              sizeof quantiles / sizeof quantiles[0], worst);
}
