#include "host/results/stats.h"

#include <algorithm>
#include <cfloat>
#include <stdexcept>
#include <string>

namespace cimsweep {
namespace {

// Continued fraction of the regularized incomplete beta function (modified Lentz method, as in
// Numerical Recipes' betacf). Converges quickly for x < (a + 1) / (a + b + 2); the iteration cap
// is generous because the number of terms grows like sqrt(max(a, b)).
double beta_continued_fraction(double a, double b, double x) {
  constexpr int kMaxIterations = 200000;
  constexpr double kEpsilon = 1e-16;
  constexpr double kTiny = 1e-300;  // keeps the Lentz denominators away from zero
  const double qab = a + b, qap = a + 1, qam = a - 1;
  double c = 1, d = 1 - qab * x / qap;
  if (std::fabs(d) < kTiny) d = kTiny;
  d = 1 / d;
  double h = d;
  for (int m = 1; m <= kMaxIterations; ++m) {
    const double m2 = 2.0 * m;
    // Even step.
    double aa = m * (b - m) * x / ((qam + m2) * (a + m2));
    d = 1 + aa * d;
    if (std::fabs(d) < kTiny) d = kTiny;
    c = 1 + aa / c;
    if (std::fabs(c) < kTiny) c = kTiny;
    d = 1 / d;
    h *= d * c;
    // Odd step.
    aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2));
    d = 1 + aa * d;
    if (std::fabs(d) < kTiny) d = kTiny;
    c = 1 + aa / c;
    if (std::fabs(c) < kTiny) c = kTiny;
    d = 1 / d;
    const double delta = d * c;
    h *= delta;
    if (std::fabs(delta - 1) < kEpsilon) break;
  }
  return h;
}

// Regularized incomplete beta I_x(a, b). Takes y = 1 - x separately so that callers can pass a
// value computed without cancellation when x is close to 1.
double regularized_beta(double x, double y, double a, double b) {
  if (x <= 0) return 0;
  if (y <= 0) return 1;
  const double log_front =
      std::lgamma(a + b) - std::lgamma(a) - std::lgamma(b) + a * std::log(x) + b * std::log(y);
  const double front = std::exp(log_front);
  if (x < (a + 1) / (a + b + 2)) return front * beta_continued_fraction(a, b, x) / a;
  return 1 - front * beta_continued_fraction(b, a, y) / b;
}

// P(T > t) for t >= 0: 0.5 * I_{dof / (dof + t^2)}(dof / 2, 1 / 2), computed directly as an upper
// tail so that small tail probabilities keep their relative precision.
double student_t_upper_tail(double t, double dof) {
  const double t2 = t * t;
  const double x = dof / (dof + t2), y = t2 / (dof + t2);
  return 0.5 * regularized_beta(x, y, dof / 2, 0.5);
}

// Standard normal quantile: Acklam's rational approximation (relative error ~1e-9) refined by one
// Halley step on erfc, which brings it to near machine precision.
double normal_quantile(double p) {
  static const double a[] = {-3.969683028665376e+01, 2.209460984245205e+02,  -2.759285104469687e+02,
                             1.383577518672690e+02,  -3.066479806614716e+01, 2.506628277459239e+00};
  static const double b[] = {-5.447609879822406e+01, 1.615858368580409e+02, -1.556989798598866e+02,
                             6.680131188771972e+01, -1.328068155288572e+01};
  static const double c[] = {-7.784894002430293e-03, -3.223964580411365e-01, -2.400758277161838e+00,
                             -2.549732539343734e+00, 4.374664141464968e+00,  2.938163982698783e+00};
  static const double d[] = {7.784695709041462e-03, 3.224671290700398e-01, 2.445134137142996e+00,
                             3.754408661907416e+00};
  constexpr double kLow = 0.02425;
  double x;
  if (p < kLow) {
    const double q = std::sqrt(-2 * std::log(p));
    x = (((((c[0] * q + c[1]) * q + c[2]) * q + c[3]) * q + c[4]) * q + c[5]) /
        ((((d[0] * q + d[1]) * q + d[2]) * q + d[3]) * q + 1);
  } else if (p <= 1 - kLow) {
    const double q = p - 0.5, r = q * q;
    x = (((((a[0] * r + a[1]) * r + a[2]) * r + a[3]) * r + a[4]) * r + a[5]) * q /
        (((((b[0] * r + b[1]) * r + b[2]) * r + b[3]) * r + b[4]) * r + 1);
  } else {
    const double q = std::sqrt(-2 * std::log1p(-p));
    x = -(((((c[0] * q + c[1]) * q + c[2]) * q + c[3]) * q + c[4]) * q + c[5]) /
        ((((d[0] * q + d[1]) * q + d[2]) * q + d[3]) * q + 1);
  }
  const double error = 0.5 * std::erfc(-x / std::sqrt(2.0)) - p;
  const double u = error * std::sqrt(2 * M_PI) * std::exp(x * x / 2);
  return x - u / (1 + x * u / 2);
}

// Percentile q in [0, 1] of sorted values, interpolating linearly between order statistics at
// position q * (n - 1), like numpy.percentile's default.
double percentile_of_sorted(const std::vector<double>& sorted, double q) {
  const double position = q * double(sorted.size() - 1);
  const size_t below = size_t(std::floor(position));
  if (below + 1 >= sorted.size()) return sorted.back();
  const double fraction = position - double(below);
  return sorted[below] + fraction * (sorted[below + 1] - sorted[below]);
}

}  // namespace

double student_t_quantile(double p, int dof) {
  if (!(p > 0 && p < 1)) {
    throw std::invalid_argument("student_t_quantile: p must lie in (0, 1), got " +
                                std::to_string(p));
  }
  if (dof < 1) {
    throw std::invalid_argument("student_t_quantile: dof must be >= 1, got " + std::to_string(dof));
  }
  if (p == 0.5) return 0;
  const double nu = dof;
  // For large dof the lgamma terms of the beta function lose digits to cancellation (and the
  // continued fraction needs ever more terms), while the Cornish-Fisher expansion around the
  // normal quantile (Abramowitz & Stegun 26.7.5) errs by order nu^-5: below 1e-16 relative from
  // here on, even for p = 1 - 1e-7 (checked against mpmath).
  constexpr double kExpansionDof = 1e4;
  if (nu > kExpansionDof) {
    const double z = normal_quantile(p), z2 = z * z;
    const double g1 = (z2 + 1) * z / 4;
    const double g2 = ((5 * z2 + 16) * z2 + 3) * z / 96;
    const double g3 = (((3 * z2 + 19) * z2 + 17) * z2 - 15) * z / 384;
    const double g4 = ((((79 * z2 + 776) * z2 + 1482) * z2 - 1920) * z2 - 945) * z / 92160;
    return z + (g1 + (g2 + (g3 + g4 / nu) / nu) / nu) / nu;
  }
  // Solve P(T > t) = tail for t >= 0 and use the symmetry of the distribution for p < 0.5.
  // Working with the smaller tail keeps its relative precision (1 - p is exact for p >= 0.5).
  const double tail = p < 0.5 ? p : 1 - p;
  double low = 0, high = 1;
  while (student_t_upper_tail(high, nu) > tail) {
    low = high;
    high *= 2;
    if (!std::isfinite(high)) return p < 0.5 ? -HUGE_VAL : HUGE_VAL;
  }
  // Bisection: robust where Newton would overshoot in the heavy tails of small dof, and cheap.
  for (int iteration = 0; iteration < 2000 && high - low > 4 * DBL_EPSILON * high; ++iteration) {
    const double middle = 0.5 * (low + high);
    if (middle <= low || middle >= high) break;
    if (student_t_upper_tail(middle, nu) > tail) {
      low = middle;
    } else {
      high = middle;
    }
  }
  const double t = 0.5 * (low + high);
  return p < 0.5 ? -t : t;
}

Summary summarize(const std::vector<double>& values) {
  Summary summary;
  summary.n = values.size();
  if (values.empty()) return summary;
  for (double value : values) {
    if (std::isnan(value)) throw std::invalid_argument("summarize: NaN among the values");
  }
  std::vector<double> sorted = values;
  std::sort(sorted.begin(), sorted.end());
  const double n = double(sorted.size());

  double sum = 0;
  for (double value : sorted) sum += value;
  summary.mean = sum / n;
  summary.min = sorted.front();
  summary.max = sorted.back();
  summary.p05 = percentile_of_sorted(sorted, 0.05);
  summary.median = percentile_of_sorted(sorted, 0.5);
  summary.p95 = percentile_of_sorted(sorted, 0.95);
  if (sorted.size() < 2) return summary;

  // Two passes (deviations from the mean) avoid the cancellation of sum-of-squares formulas when
  // accuracies are large and close together.
  double squared_deviations = 0;
  for (double value : sorted) squared_deviations += (value - summary.mean) * (value - summary.mean);
  summary.std = std::sqrt(squared_deviations / (n - 1));
  const double half_width =
      student_t_quantile(0.975, int(sorted.size() - 1)) * summary.std / std::sqrt(n);
  summary.ci_low = summary.mean - half_width;
  summary.ci_high = summary.mean + half_width;
  return summary;
}

}  // namespace cimsweep
