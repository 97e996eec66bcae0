// Summary statistics of Monte-Carlo trial accuracies: mean, spread, a 95 % confidence interval of
// the mean (Student t) and percentiles.
#pragma once
#include <cmath>
#include <cstddef>
#include <vector>

namespace cimsweep {

struct Summary {
  size_t n = 0;
  double mean = NAN, std = NAN;        // sample std (n-1); NAN std when n < 2
  double ci_low = NAN, ci_high = NAN;  // 95 % interval of the mean, Student t with n-1 dof (n>=2)
  // Percentiles use linear interpolation between order statistics (numpy's default method).
  double min = NAN, p05 = NAN, median = NAN, p95 = NAN, max = NAN;
};

// Summarizes `values` (in any order). n == 0 leaves everything NAN; n == 1 sets the mean and the
// order statistics but leaves std and the interval NAN. Throws std::invalid_argument on a NaN
// value, which would make the order statistics meaningless.
Summary summarize(const std::vector<double>& values);

// The p-quantile of Student's t distribution with `dof` degrees of freedom, e.g. p = 0.975 gives
// the half-width factor of a two-sided 95 % interval. Accurate to about 1e-10 relative for any
// dof >= 1. Throws std::invalid_argument unless 0 < p < 1 and dof >= 1.
double student_t_quantile(double p, int dof);

}  // namespace cimsweep
