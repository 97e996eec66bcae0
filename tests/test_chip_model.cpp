// kernels/chip_model.h by hand: the one exact() rule and what follows from it (cell programming,
// reference rows, tabulation, the read set-up), and the programmed cells against cim-model.md §2
// computed here from the noise and the conductance formula.
#include <gtest/gtest.h>

#include <cmath>

#include "kernels/chip_model.h"

namespace {

cim::ChipModel chip_at(double sigma, cim::VariationMode variation, bool reference_variation) {
  cim::ChipModel chip;
  chip.key = cim::NoiseKey{7, 3};
  chip.layer = 2;
  chip.cell_bits = 4;
  chip.slices = 2;
  chip.inv_onoff = 0.1;
  chip.sigma = sigma;
  chip.variation = variation;
  chip.reference_variation = reference_variation;
  return chip;
}

TEST(ChipModel, ExactOnlyWithoutVariationAndEverythingFollowsFromIt) {
  for (auto variation : {cim::VariationMode::kDevice, cim::VariationMode::kCycle})
    for (bool reference : {false, true}) {
      const cim::ChipModel clean = chip_at(0.0, variation, reference);
      EXPECT_TRUE(clean.exact());
      EXPECT_FALSE(clean.redrawn_per_read()) << "an exact chip is the same on every read";
      EXPECT_EQ(clean.reference_rows(), 1) << "an exact reference is the counting row";
      const cim::ChipModel noisy = chip_at(0.05, variation, reference);
      EXPECT_FALSE(noisy.exact());
      EXPECT_EQ(noisy.redrawn_per_read(), variation == cim::VariationMode::kCycle);
      EXPECT_EQ(noisy.reference_rows(), reference ? 2 : 1);
    }
}

TEST(ChipModel, CycleReadNumbersStartAfterTheDeviceChipAndNeverRepeat) {
  EXPECT_EQ(cim::ChipModel::cycle_read(0, 8, 0), 1u);  // read 0 is mode device's chip
  EXPECT_EQ(cim::ChipModel::cycle_read(0, 8, 7), 8u);
  EXPECT_EQ(cim::ChipModel::cycle_read(1, 8, 0), 9u);
  EXPECT_EQ(cim::ChipModel::cycle_read(2, 3, 2), 9u);
}

TEST(ChipModel, ExactChipHoldsTheIntegerCellLevels) {
  const cim::ChipModel chip = chip_at(0.0, cim::VariationMode::kDevice, true);
  float cells[2] = {-1, -1};
  chip.program_weight(0xA7, 40, 0, cells, 1);  // D = 167: cells 7 (low) and 10 (high)
  EXPECT_EQ(cells[0], 7.0f);
  EXPECT_EQ(cells[1], 10.0f);
  EXPECT_EQ(chip.reference_cell(5, 0, 0), 1.0f);
}

// §2 by hand: g̃ = ((1 − 1/r)·d + L/r)·(1 + σz), z the cell's own normal of (seed, trial, layer,
// cell, read); the cells of one weight at ids 4k+1 and 4k+2 share a Philox call of group k.
TEST(ChipModel, VariedCellsAreTheFormulaOfTheirOwnNormal) {
  for (uint32_t read : {0u, 5u}) {
    const cim::ChipModel chip = chip_at(0.1, cim::VariationMode::kCycle, true);
    float cells[4] = {0, 0, 0, 0};
    const uint64_t first = 4 * 11 + 1;
    chip.program_weight(0x3C, first, read, cells, 2);  // step 2: cells[0] and cells[2]
    const int d[2] = {0xC, 0x3};
    for (int m = 0; m < 2; ++m) {
      const double z = cim::cell_noise(chip.key, chip.layer, cim::kWeightCells, first + m, read);
      const double g = (1 - 0.1) * d[m] + 15 * 0.1;
      EXPECT_NEAR(cells[2 * m], g * (1 + 0.1 * z), 1e-5 * g) << "slice " << m << " read " << read;
      EXPECT_NE(cells[2 * m], float(g)) << "the noise is applied";
    }
    EXPECT_EQ(cells[1], 0.0f) << "the step leaves the cells between untouched";
    const double g_ref = 15 * (1 + 0.1) / 2;
    const double z_ref = cim::cell_noise(chip.key, chip.layer, cim::kReferenceCells, 9 * 2 + 1, read);
    EXPECT_NEAR(chip.reference_cell(9, 1, read), g_ref * (1 + 0.1 * z_ref), 1e-5 * g_ref);
  }
}

TEST(ChipModel, ClampAtZeroOnlyWhereAskedFor) {
  cim::ChipModel chip = chip_at(100.0, cim::VariationMode::kDevice, false);  // σ large enough to clamp
  float free_cells[64], clamped[64];
  for (int w = 0; w < 32; ++w) chip.program_weight(0xFF, 2 * w, 0, free_cells + 2 * w, 1);
  chip.clamp_at_zero = true;
  for (int w = 0; w < 32; ++w) chip.program_weight(0xFF, 2 * w, 0, clamped + 2 * w, 1);
  int negative = 0;
  for (int i = 0; i < 64; ++i) {
    if (free_cells[i] < 0) {
      ++negative;
      EXPECT_EQ(clamped[i], 0.0f);
    } else {
      EXPECT_EQ(clamped[i], free_cells[i]);
    }
  }
  EXPECT_GT(negative, 10) << "at σ = 100 about half the cells go below zero";
}

TEST(ChipModel, ReadSetupTakesTheExactPathOnlyOnAnExactChipWithoutAnAdc) {
  const cim::ChipModel clean = chip_at(0.0, cim::VariationMode::kDevice, true);
  const cim::ChipModel noisy = chip_at(0.1, cim::VariationMode::kDevice, true);
  auto setup = [](const cim::ChipModel& chip, cim::AdcMode adc, bool calibrating) {
    return cim::make_read_setup(chip, 16, adc, 10, 8, calibrating, 123.0);
  };
  EXPECT_TRUE(setup(clean, cim::AdcMode::kIdeal, false).ideal_clean);
  EXPECT_FALSE(setup(clean, cim::AdcMode::kDynamic, false).ideal_clean);
  EXPECT_TRUE(setup(clean, cim::AdcMode::kDynamic, false).clean);
  EXPECT_TRUE(setup(clean, cim::AdcMode::kCalibrated, true).ideal_clean) << "calibration is exact";
  EXPECT_FALSE(setup(noisy, cim::AdcMode::kIdeal, false).clean);
  const cim::ReadSetup r = setup(noisy, cim::AdcMode::kFixed, false);
  EXPECT_EQ(r.ref_rows, 2);
  EXPECT_EQ(r.operand_rows(), 2 * 16 + 2);
  EXPECT_EQ(r.adc, cim::AdcMode::kFixed);
  EXPECT_EQ(r.calibrated_full_scale, 123.0);
  EXPECT_DOUBLE_EQ(r.gain, 2 / (1 - 0.1));
  EXPECT_DOUBLE_EQ(r.g_ref, 15 * 1.1 / 2);
}

}  // namespace
