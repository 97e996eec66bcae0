// The CPU copy of train_ops.cu's kernels: see train_reference.h.
#include "train/cuda/train_reference.h"

#include <cmath>
#include <functional>
#include <vector>

namespace cimsweep::train::gpu::reference {

namespace {

// A block's partials added as the kernels' block_tree adds them.
template <typename T, typename Op>
T tree(std::vector<T> partial, Op op) {
  for (size_t s = partial.size() / 2; s > 0; s >>= 1)
    for (size_t t = 0; t < s; ++t) partial[t] = op(partial[t], partial[t + s]);
  return partial[0];
}

}  // namespace

void relu_forward(float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = kernel::relu(x[i]);
}

void relu_backward(const float* y, float* dy, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dy[i] = kernel::relu_backward(y[i], dy[i]);
}

void cnhw_to_nchw(const float* in, float* out, int c, int n, int64_t plane) {
  for (int64_t i = 0; i < int64_t(c) * n * plane; ++i)
    out[kernel::cnhw_to_nchw_index(i, c, n, plane)] = in[i];
}

void nchw_to_cnhw(const float* in, float* out, int c, int n, int64_t plane) {
  for (int64_t i = 0; i < int64_t(c) * n * plane; ++i)
    out[kernel::nchw_to_cnhw_index(i, c, n, plane)] = in[i];
}

void shortcut_a_forward(const float* x, float* y, const kernel::ShortcutShape& s) {
  for (int64_t i = 0; i < int64_t(s.n) * s.out_c * s.oh * s.ow; ++i)
    y[i] = kernel::shortcut_forward(x, i, s);
}

void shortcut_a_backward(const float* dy, float* dx, const kernel::ShortcutShape& s) {
  for (int64_t i = 0; i < int64_t(s.n) * s.in_c * s.oh * s.ow; ++i) {
    int64_t to, from;
    kernel::shortcut_backward_indices(i, s, &to, &from);
    dx[to] += dy[from];
  }
}

void global_average_pool(const float* x, float* y, int64_t planes, int64_t plane) {
  for (int64_t i = 0; i < planes; ++i) y[i] = kernel::average_plane(x + i * plane, plane);
}

void global_average_pool_backward(const float* dy, float* dx, int64_t planes, int64_t plane) {
  const float inv = 1.0f / float(plane);  // as the launcher
  for (int64_t i = 0; i < planes * plane; ++i) dx[i] = dy[i / plane] * inv;
}

void channel_sum(const float* x, float* out, int n, int c, int64_t plane) {
  for (int ch = 0; ch < c; ++ch) {
    std::vector<double> partial(kernel::kBlock);
    for (int t = 0; t < kernel::kBlock; ++t)
      partial[size_t(t)] = kernel::channel_sum_partial(x, ch, n, c, plane, t, kernel::kBlock);
    out[ch] = float(tree(partial, std::plus<double>()));
  }
}

void add_bias(float* y, const float* bias, int n, int c, int64_t plane) {
  for (int64_t i = 0; i < int64_t(n) * c * plane; ++i) y[i] += bias[(i / plane) % c];
}

double softmax_cross_entropy(const float* logits, const int32_t* labels, int n, int classes,
                             float weight, float* dlogits, int* correct) {
  double loss = 0;
  int right = 0;
  for (int img = 0; img < n; ++img) {  // the kernel's threads, then the launcher's ordered sum
    double image_loss;
    int image_right;
    kernel::cross_entropy_image(logits, labels, img, n, classes, weight, dlogits, &image_loss,
                                &image_right);
    loss += image_loss;
    right += image_right;
  }
  if (correct) *correct = right;
  return n > 0 ? loss / n : 0.0;
}

float max_abs(const float* w, int64_t count) {
  std::vector<float> partial(kernel::kBlock);
  for (int t = 0; t < kernel::kBlock; ++t)
    partial[size_t(t)] = kernel::max_abs_partial(w, count, t, kernel::kBlock);
  return tree(partial, [](float a, float b) { return std::fmax(a, b); });
}

void quantise_weights(const float* w, int64_t count, int fan_in, int bits, WeightScaling scaling,
                      float* out, uint8_t* pass) {
  if (scaling == WeightScaling::kMaxAbs) {
    const float m = max_abs(w, count);
    for (int64_t i = 0; i < count; ++i) {
      out[i] = kernel::quantise_weight_maxabs(w[i], m, bits);
      if (pass) pass[i] = 1;
    }
  } else {
    const double alpha = wage_alpha(fan_in, bits);
    for (int64_t i = 0; i < count; ++i) {
      out[i] = kernel::quantise_weight_wage(w[i], alpha, bits);
      if (pass) pass[i] = kernel::wage_passes(w[i], alpha, bits);
    }
  }
}

void quantise_inputs(const float* x, int64_t count, float a_max, int bits, float* out,
                     uint8_t* region) {
  const double step = double(a_max) / double(cim::max_code(bits));  // as the launcher
  for (int64_t i = 0; i < count; ++i) {
    out[i] = kernel::quantise_input(x[i], a_max, bits, step);
    if (region) region[i] = kernel::input_region(x[i], a_max);
  }
}

void quantise_inputs_backward(const float* dy, const uint8_t* region, int64_t count, float* dx,
                              double* d_range) {
  for (int64_t i = 0; i < count; ++i) dx[i] = kernel::quantise_input_backward(dy[i], region[i]);
  if (d_range) {
    std::vector<double> partial(kernel::kClippedSumThreads);
    for (int t = 0; t < kernel::kClippedSumThreads; ++t)
      partial[size_t(t)] =
          kernel::clipped_sum_partial(dy, region, count, t, kernel::kClippedSumThreads);
    *d_range = tree(partial, std::plus<double>());
  }
}

void add_inplace(float* y, const float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += x[i];
}

void mask_gradient(float* grad, const uint8_t* pass, int64_t n) {
  for (int64_t i = 0; i < n; ++i) grad[i] = pass[i] ? grad[i] : 0.0f;
}

void sgd_update(float* value, const float* grad, float* momentum, int64_t count, bool decays,
                float decay, float mu, float rate, bool nesterov) {
  for (int64_t i = 0; i < count; ++i)
    kernel::sgd_element(value[i], grad[i], momentum[i], decays, decay, mu, rate, nesterov);
}

}  // namespace cimsweep::train::gpu::reference
