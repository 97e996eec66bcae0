#include "train/quantise.h"

#include <algorithm>
#include <cmath>

#include "kernels/cim_math.h"

namespace cimsweep::train {

void quantise_weights(const float* w, size_t count, int fan_in, int weight_bits,
                      WeightScaling scaling, float* out, uint8_t* pass) {
  const double top = cim::max_code(weight_bits);
  if (scaling == WeightScaling::kMaxAbs) {
    float max_abs = 0;
    for (size_t i = 0; i < count; ++i) max_abs = std::max(max_abs, std::fabs(w[i]));
    for (size_t i = 0; i < count; ++i) {
      // ŵ = W/s in float, as the evaluator computes it, then the level D.
      const float w_hat = max_abs > 0 ? w[i] / max_abs : 0.0f;
      const int level = cim::weight_level(w_hat, weight_bits);
      out[i] = float(double(max_abs) * (2.0 * level - top) / top);
      if (pass) pass[i] = 1;
    }
    return;
  }
  const double alpha = wage_alpha(fan_in, weight_bits);
  const double limit = 1.0 - std::ldexp(1.0, 1 - weight_bits);
  for (size_t i = 0; i < count; ++i) {
    const int level = cim::weight_level(cim::wage_weight(w[i], alpha, weight_bits), weight_bits);
    out[i] = float((2.0 * level - top) / top / alpha);
    if (pass) pass[i] = std::fabs(alpha * double(w[i])) <= limit ? 1 : 0;
  }
}

void quantise_inputs(const float* x, size_t count, float a_max, int input_bits, float* out,
                     uint8_t* region) {
  const double step = double(a_max) / double(cim::max_code(input_bits));
  const long long n = (long long)count;
#pragma omp parallel for schedule(static) if (n >= (1 << 16))
  for (long long i = 0; i < n; ++i) {
    out[i] = float(step * cim::input_level(x[i], a_max, input_bits));
    if (region) region[i] = x[i] < 0.0f ? kBelowRange : (x[i] > a_max ? kAboveRange : kInRange);
  }
}

void quantise_inputs_backward(const float* dy, const uint8_t* region, size_t count, float* dx,
                              double* d_range) {
  const long long n = (long long)count;
#pragma omp parallel for schedule(static) if (n >= (1 << 16))
  for (long long i = 0; i < n; ++i) dx[i] = region[i] == kInRange ? dy[i] : 0.0f;
  if (d_range) {
    double sum = 0;  // sequential: the same additions on any thread count
    for (long long i = 0; i < n; ++i)
      if (region[i] == kAboveRange) sum += dy[i];
    *d_range = sum;
  }
}

}  // namespace cimsweep::train
