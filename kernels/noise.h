// Per-cell conductance noise z ~ N(0, 1) as a pure function of
// (sweep seed, trial, layer, cell coordinate, read), cim-model.md §2: one Philox4x32-10 call
// (Random123) keyed by (seed, trial) and counted by (cell / 4, layer, stream, read) gives four
// uniforms, each turned into a normal by Wichura's AS241 inverse CDF. The transform uses only
// correctly rounded operations (+, −, ×, /, sqrt) and a logarithm built from them, so the CPU and
// CUDA backends produce bit-identical z whatever the launch shape, thread count or batch size.
#pragma once
#include <Random123/philox.h>
#include <math.h>
#include <stdint.h>

#include "kernels/host_device.h"

namespace cim {

// Which family of cells a draw belongs to.
enum NoiseStream : uint32_t { kWeightCells = 0, kReferenceCells = 1 };

struct NoiseKey {
  uint32_t seed = 0;   // the sweep seed
  uint32_t trial = 0;  // Monte-Carlo trial = one simulated chip
};

// ln(x) for x > 0 from frexp and the atanh series, with strict rounding on both backends.
HOST_DEVICE inline double strict_log(double x) {
  int exponent = 0;
  double mantissa = frexp(x, &exponent);  // x = mantissa · 2^exponent, mantissa ∈ [0.5, 1)
  if (mantissa < 0.70710678118654752440) {
    mantissa = mantissa * 2.0;  // exact
    exponent -= 1;
  }
  const double s = (mantissa - 1.0) / (mantissa + 1.0);  // |s| ≤ 0.1716
  const double s2 = mul_rn(s, s);
  // atanh(s)/s = Σ s^(2k) / (2k + 1); twelve terms reach double precision for |s| ≤ 0.1716.
  double series = 1.0 / 23.0;
  series = add_rn(mul_rn(series, s2), 1.0 / 21.0);
  series = add_rn(mul_rn(series, s2), 1.0 / 19.0);
  series = add_rn(mul_rn(series, s2), 1.0 / 17.0);
  series = add_rn(mul_rn(series, s2), 1.0 / 15.0);
  series = add_rn(mul_rn(series, s2), 1.0 / 13.0);
  series = add_rn(mul_rn(series, s2), 1.0 / 11.0);
  series = add_rn(mul_rn(series, s2), 1.0 / 9.0);
  series = add_rn(mul_rn(series, s2), 1.0 / 7.0);
  series = add_rn(mul_rn(series, s2), 1.0 / 5.0);
  series = add_rn(mul_rn(series, s2), 1.0 / 3.0);
  series = add_rn(mul_rn(series, s2), 1.0);
  const double ln2_hi = 6.93147180369123816490e-01, ln2_lo = 1.90821492927058770002e-10;
  const double e = double(exponent);
  return add_rn(add_rn(mul_rn(e, ln2_hi), mul_rn(2.0, mul_rn(s, series))), mul_rn(e, ln2_lo));
}

// Horner evaluation with strict rounding: c[0] + c[1]·r + … + c[n−1]·r^(n−1).
template <int N>
HOST_DEVICE inline double strict_poly(const double (&c)[N], double r) {
  double acc = c[N - 1];
  for (int i = N - 2; i >= 0; --i) acc = add_rn(mul_rn(acc, r), c[i]);
  return acc;
}

// Φ⁻¹(p) for p ∈ (0, 1), Wichura (1988) algorithm AS241 (PPND16), relative error ~1e-16.
HOST_DEVICE inline double normal_quantile(double p) {
  const double q = p - 0.5;
  if (fabs(q) <= 0.425) {
    const double a[8] = {3.387132872796366608,  133.14166789178437745, 1971.5909503065514427,
                         13731.693765509461125, 45921.953931549871457, 67265.770927008700853,
                         33430.575583588128105, 2509.0809287301226727};
    const double b[8] = {1.0,
                         42.313330701600911252,
                         687.1870074920579083,
                         5394.1960214247511077,
                         21213.794301586595867,
                         39307.89580009271061,
                         28729.085735721942674,
                         5226.495278852545925};
    const double r = sub_rn(0.180625, mul_rn(q, q));
    return mul_rn(q, strict_poly(a, r)) / strict_poly(b, r);
  }
  double r = q < 0.0 ? p : 1.0 - p;
  r = sqrt(-strict_log(r));
  double value;
  if (r <= 5.0) {
    const double c[8] = {1.42343711074968357734,   4.6303378461565452959,   5.7694972214606914055,
                         3.64784832476320460504,   1.27045825245236838258,  0.24178072517745061177,
                         0.0227238449892691845833, 7.7454501427834140764e-4};
    const double d[8] = {1.0,
                         2.05319162663775882187,
                         1.6763848301838038494,
                         0.68976733498510000455,
                         0.14810397642748007459,
                         0.0151986665636164571966,
                         5.475938084995344946e-4,
                         1.05075007164441684324e-9};
    r = r - 1.6;
    value = strict_poly(c, r) / strict_poly(d, r);
  } else {
    const double e[8] = {6.6579046435011037772,     5.4637849111641143699,
                         1.7848265399172913358,     0.29656057182850489123,
                         0.026532189526576123093,   0.0012426609473880784386,
                         2.71155556874348757815e-5, 2.01033439929228813265e-7};
    const double f[8] = {1.0,
                         0.59983220655588793769,
                         0.13692988092273580531,
                         0.0148753612908506148525,
                         7.868691311456132591e-4,
                         1.8463183175100546818e-5,
                         1.4215117583164458887e-7,
                         2.04426310338993978564e-15};
    r = r - 5.0;
    value = strict_poly(e, r) / strict_poly(f, r);
  }
  return q < 0.0 ? -value : value;
}

// Four standard normals from one Philox call: cells 4g … 4g+3 of (layer, stream, read).
HOST_DEVICE inline void normal4(NoiseKey key, uint32_t layer, uint32_t stream, uint64_t group,
                                uint32_t read, float out[4]) {
  typedef r123::Philox4x32 Rng;
  Rng rng;
  Rng::ctr_type counter = {{uint32_t(group), uint32_t(group >> 32), layer | (stream << 24), read}};
  Rng::key_type philox_key = {{key.seed, key.trial}};
  const Rng::ctr_type bits = rng(counter, philox_key);
  for (int i = 0; i < 4; ++i) {
    // (u + 1/2) / 2^32 is exact in double and never 0 or 1.
    const double p = (double(bits.v[i]) + 0.5) * (1.0 / 4294967296.0);
    out[i] = float(normal_quantile(p));
  }
}

// z of one cell. `read` is 0 in variation mode `device` (one draw per chip) and 1 + the read's
// number in mode `cycle`.
HOST_DEVICE inline float cell_noise(NoiseKey key, uint32_t layer, uint32_t stream, uint64_t cell,
                                    uint32_t read) {
  float z[4];
  normal4(key, layer, stream, cell >> 2, read, z);
  return z[cell & 3];
}

}  // namespace cim
