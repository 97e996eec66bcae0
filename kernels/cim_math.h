// The per-element CIM arithmetic of cim-model.md §1, §3, §4 and §5, shared by both backends.
// Everything that decides a rounding or an ADC code is computed in double with the strict helpers
// of host_device.h, so that the CPU and CUDA backends take the same decision on every tie.
#pragma once
#include <math.h>
#include <stdint.h>

#include "kernels/host_device.h"

namespace cim {

HOST_DEVICE inline int max_code(int bits) {
  return (1 << bits) - 1;
}

// §1: D = round((2^wb − 1)/2 · (ŵ + 1)) in [0, 2^wb − 1], ŵ = W/s ∈ [−1, 1]. Ties go to even,
// as torch.round does in NeuroSim.
HOST_DEVICE inline int weight_level(float w_hat, int weight_bits) {
  const double half_range = 0.5 * max_code(weight_bits);
  const double level = rint(mul_rn(half_range, add_rn(double(w_hat), 1.0)));
  if (level < 0.0) return 0;
  if (level > max_code(weight_bits)) return max_code(weight_bits);
  return int(level);
}

// WAGE's per-layer scale (Wu et al. 2018, eqs. 7-8): α = max(Shift(L_min / L_std), 1) with
// L_std = sqrt(6 / fan_in), L_min = β·2^(1−wb), β = 1.5, Shift(x) = 2^round(log2 x). Host only
// (log2 is not correctly rounded everywhere): executors pass α to their kernels.
inline double wage_alpha(int fan_in, int weight_bits) {
  const double limit_std = sqrt(6.0 / fan_in);
  const double limit_min = 1.5 * ldexp(1.0, 1 - weight_bits);
  const double shifted = ldexp(1.0, int(lround(log2(limit_min / limit_std))));
  return shifted > 1.0 ? shifted : 1.0;
}

// §1, WAGE grid: ŵ = round(2^(wb−1) · clip(αW, −1 + 2^−(wb−1), 1 − 2^−(wb−1))) / 2^(wb−1).
HOST_DEVICE inline float wage_weight(float w, double alpha, int weight_bits) {
  const double grid = double(1 << (weight_bits - 1));
  const double limit = 1.0 - 1.0 / grid;
  double x = mul_rn(alpha, double(w));
  x = x < -limit ? -limit : (x > limit ? limit : x);
  return float(rint(mul_rn(grid, x)) / grid);
}

// §1: cell m (least significant first) of level D.
HOST_DEVICE inline int cell_level(int level, int slice, int cell_bits) {
  return (level >> (cell_bits * slice)) & max_code(cell_bits);
}

// §1: g = (1 − 1/r)·d + L/r in level units; inv_onoff = 1/r (0 for r = inf).
HOST_DEVICE inline double cell_conductance(int cell, int cell_bits, double inv_onoff) {
  return add_rn(mul_rn(1.0 - inv_onoff, double(cell)),
                mul_rn(double(max_code(cell_bits)), inv_onoff));
}

// §1: the reference column's g_ref = L·(1 + 1/r)/2.
HOST_DEVICE inline double reference_conductance(int cell_bits, double inv_onoff) {
  return mul_rn(mul_rn(double(max_code(cell_bits)), 1.0 + inv_onoff), 0.5);
}

// §2: g̃ = g·(1 + σz), optionally clamped at 0.
HOST_DEVICE inline double vary_conductance(double g, double sigma, float z, bool clamp_at_zero) {
  const double varied = mul_rn(g, add_rn(1.0, mul_rn(sigma, double(z))));
  return (clamp_at_zero && varied < 0.0) ? 0.0 : varied;
}

// §3: A = round((2^ab − 1)·a/a_max) after clipping a to [0, a_max].
HOST_DEVICE inline int input_level(float a, float a_max, int input_bits) {
  const double clipped = a <= 0.0f ? 0.0 : (a >= a_max ? double(a_max) : double(a));
  return int(rint(mul_rn(double(max_code(input_bits)), clipped) / double(a_max)));
}

// §4 and §7: a partial sum at σ = 0 from exact integer counts: Σ d·b and Σ b over the read's rows.
struct CleanPartialSum {
  double level_gain, count_gain;  // 1 − 1/r and L/r
  HOST_DEVICE CleanPartialSum(int cell_bits, double inv_onoff)
      : level_gain(1.0 - inv_onoff), count_gain(mul_rn(double(max_code(cell_bits)), inv_onoff)) {}
  HOST_DEVICE double operator()(double level_dot_bits, double bit_count) const {
    return add_rn(mul_rn(level_gain, level_dot_bits), mul_rn(count_gain, bit_count));
  }
};

// An ADC code clamped to [0, top], written as the two comparisons that vector max/min
// instructions implement, so that conversion loops vectorise to them.
HOST_DEVICE inline double clamp_code(double code, double top) {
  code = code > 0.0 ? code : 0.0;
  return code < top ? code : top;
}

// §4, ADC `fixed` and `calibrated`: codes 0 … 2^N − 1 over [0, full_scale], round to nearest.
// Set up once per read, applied to every partial sum of it.
// Codes of values that vary from chip to chip (`noisy`: σ > 0, sums of random conductances, so
// no ties) are found by multiplying with 1/step, computed once per read, instead of dividing: a
// division per conversion would cost more than a whole table-lookup read. Noise-free values (σ = 0,
// and the reference column without its own variation) land on code boundaries often, so they are
// divided exactly (cim-model.md §4, "ADC codes").
struct FixedAdc {
  double step, inv_step, top;
  HOST_DEVICE FixedAdc(double full_scale, int adc_bits)
      : step(full_scale / double(max_code(adc_bits))),
        inv_step(step > 0.0 ? 1.0 / step : 0.0),
        top(double(max_code(adc_bits))) {}
  HOST_DEVICE double operator()(double x, bool noisy = false) const {
    return step > 0.0 ? (noisy ? quantise_noisy(x) : quantise(x)) : 0.0;
  }
  // The conversion itself, branch-free so that loops over a read vectorise (needs step > 0).
  HOST_DEVICE double quantise(double x) const { return level(code(x)); }
  // The σ > 0 conversion (needs step > 0).
  HOST_DEVICE double quantise_noisy(double x) const { return level(code_noisy(x)); }
  // The code alone, clamped: quantise(x) = level(code(x)) = code_offset() + code_step()·code.
  HOST_DEVICE double code(double x) const { return clamp_code(rint(x / step), top); }
  HOST_DEVICE double code_noisy(double x) const { return clamp_code(rint(mul_rn(x, inv_step)), top); }
  HOST_DEVICE double level(double code) const { return mul_rn(code, step); }
  HOST_DEVICE double code_offset() const { return 0.0; }
  HOST_DEVICE double code_step() const { return step > 0.0 ? step : 0.0; }
};

// §4, ADC `dynamic` (NeuroSim's LinearQuantizeOut) over a read whose values span [lo, hi].
struct DynamicAdc {
  double lo, step, inv_step, top;
  bool identity;  // Δ = 0: Q(x) = x
  HOST_DEVICE DynamicAdc(double lo_, double hi, int adc_bits)
      : lo(lo_),
        step(sub_rn(hi, lo_) / double(1 << adc_bits)),
        inv_step(sub_rn(hi, lo_) == 0.0 ? 0.0 : 1.0 / step),
        top(double(max_code(adc_bits))),
        identity(sub_rn(hi, lo_) == 0.0) {}
  HOST_DEVICE double operator()(double x, bool noisy = false) const {
    return identity ? x : (noisy ? quantise_noisy(x) : quantise(x));
  }
  // The conversion itself, branch-free so that loops over a read vectorise (needs !identity).
  HOST_DEVICE double quantise(double x) const { return level(code(x)); }
  // The σ > 0 conversion (needs !identity).
  HOST_DEVICE double quantise_noisy(double x) const { return level(code_noisy(x)); }
  // The code alone, clamped: quantise(x) = level(code(x)) = code_offset() + code_step()·code.
  HOST_DEVICE double code(double x) const { return clamp_code(floor(sub_rn(x, lo) / step), top); }
  HOST_DEVICE double code_noisy(double x) const {
    return clamp_code(floor(mul_rn(sub_rn(x, lo), inv_step)), top);
  }
  HOST_DEVICE double level(double code) const { return add_rn(lo, mul_rn(code, step)); }
  // With Δ = 0 the "code" is x itself.
  HOST_DEVICE double code_offset() const { return identity ? 0.0 : lo; }
  HOST_DEVICE double code_step() const { return identity ? 1.0 : step; }
};

// ADC `ideal`: no quantisation (the "code" is x itself).
struct IdealAdc {
  HOST_DEVICE double operator()(double x, bool = false) const { return x; }
  HOST_DEVICE double code_offset() const { return 0.0; }
  HOST_DEVICE double code_step() const { return 1.0; }
};

HOST_DEVICE inline double adc_fixed(double x, double full_scale, int adc_bits) {
  return FixedAdc(full_scale, adc_bits)(x);
}
HOST_DEVICE inline double adc_dynamic(double x, double lo, double hi, int adc_bits) {
  return DynamicAdc(lo, hi, adc_bits)(x);
}

// §5, the shift-and-add in one fixed order (cim-model.md §5, "Summation order"). A read r of slice m
// and input bit t adds w_r·(Q(P) − Q(Pref)), w_r = 2^t·2^(cb·m)·gain, and its ADC is affine in its
// code k: Q(P) = a_r + b_r·k. Per output the sum is split into the codes' part Σ_r (w_r·b_r)·k_r,
// one multiply-add per output and read, and the part common to the position's outputs,
// Σ_r w_r·(a_r − Q(Pref_r)), once per position and read; each adds its reads in the order
// sub-array, input bit, slice from 0, and the output is codes + common. (Without an ADC k = x,
// a = 0, b = 1.)
HOST_DEVICE inline double read_weight(double gain, int bit, int slice, int cell_bits) {
  return ldexp(gain, bit + cell_bits * slice);  // exact: a power of 2 times gain
}
HOST_DEVICE inline double add_code(double codes, double code_weight, double code) {
  return add_rn(codes, mul_rn(code_weight, code));
}
HOST_DEVICE inline double add_common(double common, double weight, double code_offset,
                                     double reference_level) {
  return add_rn(common, mul_rn(weight, sub_rn(code_offset, reference_level)));
}

// §5: the factor 2/(1 − 1/r) that turns Q(P) − Q(Pref) back into signed weight units.
HOST_DEVICE inline double recombination_gain(double inv_onoff) {
  return 2.0 / (1.0 - inv_onoff);
}

}  // namespace cim
