// The per-element work of every CUDA kernel of the CIM backend, as HOST_DEVICE functions on plain
// structs: each kernel calls one of these per thread, and the CPU reference of that kernel
// (cuda/cim_reference.cpp) calls the same function in a loop. The chip's cells and the read set-up
// come from kernels/chip_model.h, as the CPU backend's (host/cpu/cim_cpu.cpp); the rest is its
// arithmetic operation for operation: the partial sums in the order of its table look-up reads
// (kernels/lookup_read.h), the ADC codes and the split shift-and-add with the helpers of
// kernels/cim_math.h in its order, so that a GPU result equals its reference bit for bit and the
// reference equals the CPU backend bit for bit wherever the CPU reads by table look-up (every
// chip but a `cycle` one at σ > 0). No CUDA header is needed to include this file.
#pragma once
#include <stdint.h>
#include <string.h>

#include "kernels/chip_model.h"
#include "kernels/cim_math.h"
#include "kernels/host_device.h"
#include "kernels/lookup_read.h"
#include "kernels/noise.h"

namespace cimsweep::cimops {

// One CIM layer applied to one batch. Positions q = (image, oy, ox) in that order, as the CPU
// backend numbers them; the im2col'ed input is [rows][positions] in the mapped row order.
struct LayerGeometry {
  int in_channels = 0, in_h = 0, in_w = 0;
  int kernel_h = 1, kernel_w = 1, stride = 1, pad = 0;
  int out_channels = 0, out_h = 0, out_w = 0, images = 0;
  int rows = 0;           // in_channels·kernel_h·kernel_w
  int64_t positions = 0;  // images·out_h·out_w
};

// §3 and the im2col gather: the input level A that mapped row `r` (logical row `logical`) sees at
// output position q; 0 in the zero padding.
HOST_DEVICE inline uint16_t mapped_input_level(const float* x, const LayerGeometry& g, int logical,
                                               int64_t q, float a_max, int input_bits) {
  const int taps = g.kernel_h * g.kernel_w;
  const int c = logical / taps, i = (logical % taps) / g.kernel_w, j = logical % g.kernel_w;
  const int64_t plane = int64_t(g.out_h) * g.out_w;
  const int64_t image = q / plane;
  const int within = int(q % plane);
  const int oy = within / g.out_w, ox = within % g.out_w;
  const int iy = oy * g.stride - g.pad + i, ix = ox * g.stride - g.pad + j;
  if (iy < 0 || iy >= g.in_h || ix < 0 || ix >= g.in_w) return 0;
  const float a = x[((image * g.in_channels + c) * g.in_h + iy) * g.in_w + ix];
  return uint16_t(cim::input_level(a, a_max, input_bits));
}

// What programming a sub-array needs (cim-model.md §1, §2): the chip and the layer's levels.
struct ChipParams {
  cim::ChipModel chip;
  const uint16_t* levels = nullptr;        // D[o][logical row], the layer's weight levels
  const int* mapped_to_logical = nullptr;  // mapped row → logical row (c, i, j)
  int rows = 0, outs = 0;
  HOST_DEVICE int operand_rows() const { return chip.slices * outs + chip.reference_rows(); }
};

// Column k (mapped row r0 + k) of one sub-array's GEMM operand [slices·outs + ref_rows][width],
// the layout of CpuCimBackend::programmed_subarray: for o < outs the `slices` cells of output o;
// for o == outs the reference rows (cim::ChipModel programs both).
HOST_DEVICE inline void program_operand_column(const ChipParams& p, int r0, int width, int k, int o,
                                               uint32_t read, float* operand) {
  const int logical = p.mapped_to_logical[r0 + k];
  const int slices = p.chip.slices;
  if (o < p.outs) {
    p.chip.program_weight(p.levels[int64_t(o) * p.rows + logical],
                          (uint64_t(o) * p.rows + logical) * slices, read,
                          operand + int64_t(o) * width + k, int64_t(p.outs) * width);
    return;
  }
  for (int m = 0; m < p.chip.reference_rows(); ++m)
    operand[int64_t(slices * p.outs + m) * width + k] = p.chip.reference_cell(logical, m, read);
}

// acc + a·bit for bit ∈ {0, 1}, as the tiled partial-sum kernel adds a group's rows: a·bit is
// exact (a or ±0), and a sum that starts at +0 never becomes −0, so adding a·0 leaves it unchanged
// and the result is lookup_table_entry's, which adds only the rows whose bit is set.
HOST_DEVICE inline float add_bit_product(float acc, float a, float bit) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(a, bit, acc);
#else
  return acc + a * bit;
#endif
}

// One partial sum of one read: Σ_k operand[row][k]·b_t[r0 + k][q] in the order of the CPU
// backend's table look-up reads (cim::lookup_order_sum: groups of 4 rows, each in ascending row
// order, then the groups in ascending order), which the tiled kernel keeps.
HOST_DEVICE inline float partial_sum(const float* operand_row, int width, const uint16_t* mapped,
                                     int64_t positions, int r0, int64_t q, int bit) {
  return cim::lookup_order_sum(operand_row, width, mapped + int64_t(r0) * positions + q,
                               size_t(positions), bit);
}

using cim::AdcMode;

// How the partial sums of a layer's reads become ADC codes and are recombined (§4, §5): the read
// set-up every executor shares, and the number of positions of the batch's P [rows][positions].
struct ReadParams : cim::ReadSetup {
  int64_t positions = 0;
};

// The partial sum in level units (σ = 0: from the exact integer Σ d·b and the count Σ b, §7).
HOST_DEVICE inline double weight_value(const ReadParams& p, float raw, float count) {
  return p.clean ? cim::CleanPartialSum(p.cell_bits, p.inv_onoff)(double(raw), double(count))
                 : double(raw);
}

// Pref of slice m at position q, from one read's partial sums P [operand_rows][positions].
HOST_DEVICE inline double reference_value(const ReadParams& p, const float* P, int64_t q, int m) {
  const float* ref = P + int64_t(p.slices * p.outs) * p.positions;
  if (p.ref_rows == 1) return cim::mul_rn(p.g_ref, double(ref[q]));
  return double(ref[int64_t(m) * p.positions + q]);
}

// The ADC ranges of one read and slice (ADC `dynamic`): weights' and reference's [lo, hi].
struct SliceRange {
  double lo, hi, ref_lo, ref_hi;
};

// Order-preserving 64-bit keys of doubles, so that min/max reductions can use integer atomics
// (the result does not depend on the order in which blocks arrive).
HOST_DEVICE inline uint64_t order_key(double v) {
  uint64_t bits;
#if defined(__CUDA_ARCH__)
  bits = uint64_t(__double_as_longlong(v));
#else
  memcpy(&bits, &v, sizeof bits);
#endif
  return (bits >> 63) ? ~bits : (bits | (uint64_t(1) << 63));
}
HOST_DEVICE inline double from_order_key(uint64_t key) {
  const uint64_t bits = (key >> 63) ? (key & ~(uint64_t(1) << 63)) : ~key;
#if defined(__CUDA_ARCH__)
  return __longlong_as_double((long long)bits);
#else
  double v;
  memcpy(&v, &bits, sizeof v);
  return v;
#endif
}

// Which range a partial-sum row of the operand feeds: slice m's weight range (returns m), or the
// reference range (returns slices + m; with the single counting row every slice's reference).
HOST_DEVICE inline int range_slot(const ReadParams& p, int row) {
  if (row < p.slices * p.outs) return row / p.outs;
  return p.slices + (row - p.slices * p.outs);
}
// The value the dynamic ADC's range is taken over for row `row`, position q.
HOST_DEVICE inline double range_value(const ReadParams& p, const float* P, int row, int64_t q) {
  if (row < p.slices * p.outs) {
    const float count = P[int64_t(p.slices * p.outs) * p.positions + q];
    return weight_value(p, P[int64_t(row) * p.positions + q], count);
  }
  return reference_value(p, P, q, row - p.slices * p.outs);
}

// The code k of x for one read's ADC, Q(x) = code_offset() + code_step()·k, as the CPU backend's
// with_code finds it: values that vary from chip to chip (`noisy`) multiplied by 1/step, noise-free
// ones divided exactly (cim_math.h, FixedAdc); no ADC, or a dynamic range of width 0: k = x; a
// fixed ADC of full scale 0: k = 0 (its step is 0).
HOST_DEVICE inline double adc_code(const cim::IdealAdc&, double x, bool) {
  return x;
}
HOST_DEVICE inline double adc_code(const cim::FixedAdc& adc, double x, bool noisy) {
  return adc.step > 0.0 ? (noisy ? adc.code_noisy(x) : adc.code(x)) : 0.0;
}
HOST_DEVICE inline double adc_code(const cim::DynamicAdc& adc, double x, bool noisy) {
  return adc.identity ? x : (noisy ? adc.code_noisy(x) : adc.code(x));
}

// Calls op(adc, ref_adc) with the ADCs of one read and slice — of its weight columns and of its
// reference — as CpuCimBackend's with_adc makes them: `dynamic` over the read's ranges, `fixed`
// with full scale rows·L, `calibrated` with the measured full scale, or none.
template <class Op>
HOST_DEVICE inline double with_slice_adcs(const ReadParams& p, const SliceRange* ranges, int m,
                                          int subarray_rows, const Op& op) {
  switch (p.adc) {
    case AdcMode::kDynamic:
      return op(cim::DynamicAdc(ranges[m].lo, ranges[m].hi, p.adc_bits),
                cim::DynamicAdc(ranges[m].ref_lo, ranges[m].ref_hi, p.adc_bits));
    case AdcMode::kFixed: {
      const cim::FixedAdc adc(double(subarray_rows) * cim::max_code(p.cell_bits), p.adc_bits);
      return op(adc, adc);
    }
    case AdcMode::kCalibrated: {
      const cim::FixedAdc adc(p.calibrated_full_scale, p.adc_bits);
      return op(adc, adc);
    }
    case AdcMode::kIdeal:
      break;
  }
  return op(cim::IdealAdc(), cim::IdealAdc());
}

// codes + (w·b)·k of one slice (cim::add_code): w = read_weight, b = the ADC's code step, k the
// code of the partial sum x (level units; it varies with the chip when σ > 0).
struct AddSliceCode {
  double codes, weight, x;
  bool noisy;
  template <class Adc>
  HOST_DEVICE double operator()(const Adc& adc, const Adc&) const {
    return cim::add_code(codes, cim::mul_rn(weight, adc.code_step()), adc_code(adc, x, noisy));
  }
};

// common + w·(a − Q(Pref)) of one slice (cim::add_common): a = the weight ADC's code offset;
// Q(Pref) = the reference ADC's offset + step·code of Pref, noisy only when the reference cells
// vary themselves.
struct AddSliceCommon {
  double common, weight, ref;
  bool ref_noisy;
  template <class Adc>
  HOST_DEVICE double operator()(const Adc& adc, const Adc& ref_adc) const {
    const double level = cim::add_rn(
        ref_adc.code_offset(), cim::mul_rn(ref_adc.code_step(), adc_code(ref_adc, ref, ref_noisy)));
    return cim::add_common(common, weight, adc.code_offset(), level);
  }
};

// §5, the codes' part of output (o, q) after one more read (input bit `bit` of a sub-array of
// `subarray_rows` rows): codes + Σ_m (w_m·b_m)·k_m, slices from 0, as the CPU backend adds them.
// `ranges` are the read's [slices] ranges (ADC dynamic only). With ideal_clean, the exact integer
// form Σ_m 2^(t + cb·m)·(2·Σd·b − L·Σb) instead, and the largest partial sum seen (calibration).
HOST_DEVICE inline double accumulate_codes(const ReadParams& p, const float* P,
                                           const SliceRange* ranges, int subarray_rows, int bit,
                                           int o, int64_t q, double codes, double* largest) {
  const float count = P[int64_t(p.slices * p.outs) * p.positions + q];
  if (p.ideal_clean) {
    const cim::CleanPartialSum partial(p.cell_bits, p.inv_onoff);
    const double levels = cim::max_code(p.cell_bits);
    double most = *largest;
    const double ref = cim::mul_rn(p.g_ref, double(count));
    most = ref > most ? ref : most;
    for (int m = 0; m < p.slices; ++m) {
      const double place = ldexp(1.0, bit + p.cell_bits * m);
      const float raw = P[int64_t(m * p.outs + o) * p.positions + q];
      const double value = partial(double(raw), double(count));
      most = value > most ? value : most;
      codes =
          cim::add_rn(codes, cim::mul_rn(place, cim::sub_rn(cim::mul_rn(2.0, double(raw)),
                                                            cim::mul_rn(levels, double(count)))));
    }
    *largest = most;
    return codes;
  }
  for (int m = 0; m < p.slices; ++m) {
    const AddSliceCode add{codes, cim::read_weight(p.gain, bit, m, p.cell_bits),
                           weight_value(p, P[int64_t(m * p.outs + o) * p.positions + q], count),
                           !p.clean};
    codes = with_slice_adcs(p, ranges, m, subarray_rows, add);
  }
  return codes;
}

// §5, the part common to every output of position q after one more read: common +
// Σ_m w_m·(a_m − Q(Pref_m)), slices from 0. Zero throughout with ideal_clean (the exact form).
HOST_DEVICE inline double accumulate_common(const ReadParams& p, const float* P,
                                            const SliceRange* ranges, int subarray_rows, int bit,
                                            int64_t q, double common) {
  if (p.ideal_clean) return common;
  for (int m = 0; m < p.slices; ++m) {
    const AddSliceCommon add{common, cim::read_weight(p.gain, bit, m, p.cell_bits),
                             reference_value(p, P, q, m), p.ref_rows > 1};
    common = with_slice_adcs(p, ranges, m, subarray_rows, add);
  }
  return common;
}

// §5: the layer's sum of output (o, q), acc[o][q] at acc_index, q = acc_index mod positions: the
// codes' part plus the common part of its position, or the digital layer's exact sum alone
// (common null).
HOST_DEVICE inline double layer_sum(const double* codes, const double* common, int64_t acc_index,
                                    int64_t positions) {
  return common ? cim::add_rn(codes[acc_index], common[acc_index % positions]) : codes[acc_index];
}

// §5 and the bias: y = float(scale·acc + bias), as the CPU backend rounds it.
HOST_DEVICE inline float output_value(double output_scale, double acc, const float* bias, int o) {
  const double b = bias ? double(bias[o]) : 0.0;
  return float(cim::add_rn(cim::mul_rn(output_scale, acc), b));
}

// Index of output (image, o, p) of y [images][outs][plane] in the accumulator [outs][positions].
HOST_DEVICE inline int64_t accumulator_index(int64_t y_index, int outs, int64_t plane,
                                             int64_t positions) {
  const int64_t p = y_index % plane;
  const int64_t rest = y_index / plane;
  const int o = int(rest % outs);
  const int64_t image = rest / outs;
  return int64_t(o) * positions + image * plane + p;
}

}  // namespace cimsweep::cimops
