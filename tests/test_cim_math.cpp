// The per-element CIM arithmetic of kernels/cim_math.h against cim-model.md, by hand.
#include <gtest/gtest.h>

#include <cmath>

#include "kernels/cim_math.h"

namespace {

// §1: Σ_m 2^(cb·m)·(g_m − g_ref)·2/(1 − 1/r) = 2D − (2^wb − 1) for every level and ratio.
TEST(CimMath, ReferenceColumnIdentityHoldsForEveryLevelAndRatio) {
  const double ratios[] = {1.5, 2, 10, 100, INFINITY};
  const int cell_bits_list[] = {1, 2, 4, 8};
  for (int weight_bits : {4, 8}) {
    for (int cell_bits : cell_bits_list) {
      if (weight_bits % cell_bits) continue;
      const int slices = weight_bits / cell_bits;
      for (double r : ratios) {
        const double inv = std::isinf(r) ? 0.0 : 1.0 / r;
        const double g_ref = cim::reference_conductance(cell_bits, inv);
        for (int level = 0; level <= cim::max_code(weight_bits); ++level) {
          double sum = 0;
          for (int m = 0; m < slices; ++m) {
            const double g =
                cim::cell_conductance(cim::cell_level(level, m, cell_bits), cell_bits, inv);
            sum += std::ldexp(1.0, cell_bits * m) * (g - g_ref) * cim::recombination_gain(inv);
          }
          EXPECT_NEAR(sum, 2.0 * level - cim::max_code(weight_bits), 1e-9)
              << "wb=" << weight_bits << " cb=" << cell_bits << " r=" << r << " D=" << level;
        }
      }
    }
  }
}

TEST(CimMath, ConductanceEndsAreGminAndGmax) {
  EXPECT_DOUBLE_EQ(cim::cell_conductance(0, 4, 0.1), 1.5);    // L/r
  EXPECT_DOUBLE_EQ(cim::cell_conductance(15, 4, 0.1), 15.0);  // L
  EXPECT_DOUBLE_EQ(cim::cell_conductance(0, 4, 0.0), 0.0);    // r = inf: Gmin = 0
  EXPECT_DOUBLE_EQ(cim::reference_conductance(4, 0.1), 8.25);
}

TEST(CimMath, WeightLevelsAreOffsetBinaryWithTiesToEven) {
  EXPECT_EQ(cim::weight_level(-1.0f, 8), 0);
  EXPECT_EQ(cim::weight_level(1.0f, 8), 255);
  EXPECT_EQ(cim::weight_level(0.0f, 8), 128);  // 127.5 rounds to even
  EXPECT_EQ(cim::weight_level(0.5f, 8), 191);  // 191.25
  EXPECT_EQ(cim::cell_level(0xB7, 0, 4), 0x7);
  EXPECT_EQ(cim::cell_level(0xB7, 1, 4), 0xB);
}

TEST(CimMath, InputLevelsClipAndRound) {
  EXPECT_EQ(cim::input_level(-0.3f, 2.0f, 8), 0);
  EXPECT_EQ(cim::input_level(5.0f, 2.0f, 8), 255);
  EXPECT_EQ(cim::input_level(1.0f, 2.0f, 8), 128);  // 127.5 → even
  for (int pixel = 0; pixel < 256; ++pixel)
    EXPECT_EQ(cim::input_level(pixel / 255.0f, 1.0f, 8), pixel);
}

// §4 dynamic: lo = 0, Δ = 10, N = 2 → step 2.5, codes clamp at 3.
TEST(CimMath, DynamicAdcMatchesHandComputedValues) {
  const double lo = 0, hi = 10;
  EXPECT_DOUBLE_EQ(cim::adc_dynamic(0.0, lo, hi, 2), 0.0);
  EXPECT_DOUBLE_EQ(cim::adc_dynamic(1.0, lo, hi, 2), 0.0);
  EXPECT_DOUBLE_EQ(cim::adc_dynamic(2.5, lo, hi, 2), 2.5);
  EXPECT_DOUBLE_EQ(cim::adc_dynamic(7.4, lo, hi, 2), 5.0);
  EXPECT_DOUBLE_EQ(cim::adc_dynamic(10.0, lo, hi, 2), 7.5);  // floor(4) clamps to 3
  EXPECT_DOUBLE_EQ(cim::adc_dynamic(-3.0, -3.0, 5.0, 3), -3.0);
  EXPECT_DOUBLE_EQ(cim::adc_dynamic(4.0, -3.0, 5.0, 3), 4.0);  // step 1: −3 + 7
  EXPECT_DOUBLE_EQ(cim::adc_dynamic(4.2, 4.2, 4.2, 3), 4.2);   // Δ = 0: identity
}

// §4 fixed: full scale 12, N = 2 → step 4, round to nearest (ties to even), clamp to [0, 12].
TEST(CimMath, FixedAdcRoundsAndClamps) {
  EXPECT_DOUBLE_EQ(cim::adc_fixed(5.0, 12.0, 2), 4.0);
  EXPECT_DOUBLE_EQ(cim::adc_fixed(6.0, 12.0, 2), 8.0);     // 1.5 → 2
  EXPECT_DOUBLE_EQ(cim::adc_fixed(2.0, 12.0, 2), 0.0);     // 0.5 → 0
  EXPECT_DOUBLE_EQ(cim::adc_fixed(-3.0, 12.0, 2), 0.0);    // clamps low
  EXPECT_DOUBLE_EQ(cim::adc_fixed(100.0, 12.0, 2), 12.0);  // clamps high
  EXPECT_DOUBLE_EQ(cim::adc_fixed(11.0, 12.0, 2), 12.0);
}

TEST(CimMath, WageGridIsClippedPowerOfTwoGrid) {
  EXPECT_FLOAT_EQ(cim::wage_weight(0.3f, 1.0, 8), 38.0f / 128);  // round(38.4)
  EXPECT_FLOAT_EQ(cim::wage_weight(2.0f, 1.0, 8), 127.0f / 128);
  EXPECT_FLOAT_EQ(cim::wage_weight(-2.0f, 1.0, 8), -127.0f / 128);
  EXPECT_FLOAT_EQ(cim::wage_weight(0.1f, 4.0, 8), 51.0f / 128);  // round(51.2)
}

}  // namespace
