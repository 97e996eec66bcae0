// The noise contract of cim-model.md §2: z is a pure function of (seed, trial, layer, cell, read).
#include <gtest/gtest.h>
#include <omp.h>

#include <cmath>
#include <random>
#include <vector>

#include "host/cim_cpu.h"
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
