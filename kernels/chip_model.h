// One simulated chip (one Monte-Carlo trial) of one CIM layer: every non-ideality that makes its
// cells differ from the programmed levels (cim-model.md §2), how its cells are programmed, and how
// its reads are set up (§4, §5). Every executor (the CPU backend, the CUDA kernels and their CPU
// reference) builds its sub-arrays and reads from these functions, so that the rules below — above
// all exact(), which alone decides when the integer path is taken — are written once.
#pragma once
#include <stdint.h>

#include "kernels/cim_math.h"
#include "kernels/host_device.h"
#include "kernels/noise.h"

namespace cim {

// `device`: a cell's conductance is drawn once per chip; `cycle`: afresh for every read.
enum class VariationMode { kDevice, kCycle };
// How partial sums become codes (§4): NeuroSim's per-read range, a fixed full scale of rows·L,
// a measured (calibrated) full scale, or no ADC.
enum class AdcMode { kDynamic, kFixed, kCalibrated, kIdeal };

struct ChipModel {
  NoiseKey key;        // (sweep seed, trial): the chip
  uint32_t layer = 0;  // the layer's forward-order number: keys its noise
  int cell_bits = 4, slices = 2;
  double inv_onoff = 0;  // 1/r, 0 for r = inf
  double sigma = 0;      // programming variation g̃ = g·(1 + σz)
  VariationMode variation = VariationMode::kDevice;
  bool clamp_at_zero = false;
  bool reference_variation = false;

  // No non-ideality is on: every read is an exact integer sum (§7), so the cells hold their
  // integer levels and the partial sums are exact.
  HOST_DEVICE bool exact() const { return sigma == 0; }
  // The cells are drawn again for every read (mode `cycle`), so the chip cannot be tabulated.
  HOST_DEVICE bool redrawn_per_read() const {
    return !exact() && variation == VariationMode::kCycle;
  }
  // Rows of the reference a sub-array's operand carries: one all-ones row that counts Σ b
  // (Pref = g_ref·Σ b), or, when the reference cells vary themselves, one varied row per slice.
  HOST_DEVICE int reference_rows() const {
    return (reference_variation && !exact()) ? slices : 1;
  }
  // The read number of mode `cycle`'s draw for batch `batch` and input bit `bit` (0 is the chip of
  // mode `device`).
  HOST_DEVICE static uint32_t cycle_read(uint32_t batch, int input_bits, int bit) {
    return 1 + batch * uint32_t(input_bits) + uint32_t(bit);
  }

  // The `slices` programmed cells of one weight of level D, cell ids first_cell + m (least
  // significant slice first), for read number `read`: cell[m·step]. Exact: the integer cell
  // levels; else the varied conductance g̃ in level units. The normals come four cells to one
  // Philox call, so a weight's cells share the call of their group of four.
  HOST_DEVICE void program_weight(int level, uint64_t first_cell, uint32_t read, float* cell,
                                  int64_t step) const {
    float z[4] = {0, 0, 0, 0};
    uint64_t cached_group = ~uint64_t{0};
    for (int m = 0; m < slices; ++m) {
      const int cell_level = cim::cell_level(level, m, cell_bits);
      double value = cell_level;
      if (!exact()) {
        const uint64_t cell_id = first_cell + m;
        if ((cell_id >> 2) != cached_group) {
          cached_group = cell_id >> 2;
          normal4(key, layer, kWeightCells, cached_group, read, z);
        }
        value = vary_conductance(cell_conductance(cell_level, cell_bits, inv_onoff), sigma,
                                 z[cell_id & 3], clamp_at_zero);
      }
      cell[m * step] = float(value);
    }
  }

  // Reference row m < reference_rows() at logical row `logical`, read number `read`: 1 in the
  // counting row, else the varied reference conductance g_ref·(1 + σz).
  HOST_DEVICE float reference_cell(int logical, int m, uint32_t read) const {
    if (reference_rows() == 1) return 1.0f;
    const float z = cell_noise(key, layer, kReferenceCells, uint64_t(logical) * slices + m, read);
    return float(vary_conductance(reference_conductance(cell_bits, inv_onoff), sigma, z,
                                  clamp_at_zero));
  }
};

// How the partial sums of a layer's reads on one chip become ADC codes and are recombined (§4,
// §5): the constants every executor's read loop uses.
struct ReadSetup {
  int outs = 0, slices = 0, ref_rows = 1, cell_bits = 0, adc_bits = 0, input_bits = 0;
  AdcMode adc = AdcMode::kIdeal;
  bool clean = true;        // exact chip: P holds the exact integer Σ d·b
  bool ideal_clean = true;  // exact chip and no ADC: the exact integer path (and calibration)
  double inv_onoff = 0, g_ref = 0, gain = 0;
  double calibrated_full_scale = 0;  // ADC `calibrated`: the measured range
  HOST_DEVICE int operand_rows() const { return slices * outs + ref_rows; }
};

// The read set-up of a layer of `outs` outputs on `chip`. While calibrating, the ADC is ideal (the
// calibration run measures the largest exact partial sum).
HOST_DEVICE inline ReadSetup make_read_setup(const ChipModel& chip, int outs, AdcMode adc,
                                             int adc_bits, int input_bits, bool calibrating,
                                             double calibrated_full_scale) {
  ReadSetup r;
  r.outs = outs;
  r.slices = chip.slices;
  r.ref_rows = chip.reference_rows();
  r.cell_bits = chip.cell_bits;
  r.adc_bits = adc_bits;
  r.input_bits = input_bits;
  r.adc = calibrating ? AdcMode::kIdeal : adc;
  r.clean = chip.exact();
  r.ideal_clean = r.clean && r.adc == AdcMode::kIdeal;
  r.inv_onoff = chip.inv_onoff;
  r.g_ref = reference_conductance(chip.cell_bits, chip.inv_onoff);
  r.gain = recombination_gain(chip.inv_onoff);
  r.calibrated_full_scale = calibrated_full_scale;
  return r;
}

}  // namespace cim
