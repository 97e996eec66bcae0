// The per-element work of the CUDA training path's own kernels (train_ops.cu), HOST_DEVICE: each
// kernel runs one of these per thread, and train_reference.cpp, their CPU copy, runs the same
// function in a loop, so a test without a GPU checks what the GPU computes against the CPU engine
// (tests/test_train_reference.cpp). Tensors are NCHW, as cuDNN holds them; the CPU engine's maps
// are channel-major [C, N, plane]. Reductions are split as the kernels split them: thread t of a
// block of `threads` sums elements t, t + threads, ... (the *_partial functions), then the block
// adds its partials pairwise in a fixed tree (train_reference.cpp's tree_sum, the kernels' loop).
#pragma once
#include <math.h>
#include <stdint.h>

#include "kernels/cim_math.h"
#include "kernels/host_device.h"
#include "train/quantise.h"

namespace cimsweep::train::gpu::kernel {

constexpr int kBlock = 256;               // threads per block of every kernel but two:
constexpr int kCrossEntropyBlock = 128;   // one thread per image
constexpr int kClippedSumThreads = 1024;  // the PACT range gradient: one block of these

HOST_DEVICE inline float relu(float x) { return x > 0.0f ? x : 0.0f; }
HOST_DEVICE inline float relu_backward(float y, float dy) { return y > 0.0f ? dy : 0.0f; }

// Element i of a channel-major [C, N, plane] tensor lands here in NCHW [N, C, plane] ...
HOST_DEVICE inline int64_t cnhw_to_nchw_index(int64_t i, int c, int n, int64_t plane) {
  const int64_t p = i % plane, cn = i / plane;
  const int img = int(cn % n), ch = int(cn / n);
  return (int64_t(img) * c + ch) * plane + p;
}
// ... and element i of an NCHW tensor here in channel-major order.
HOST_DEVICE inline int64_t nchw_to_cnhw_index(int64_t i, int c, int n, int64_t plane) {
  const int64_t p = i % plane, nc = i / plane;
  const int ch = int(nc % c), img = int(nc / c);
  return (int64_t(ch) * n + img) * plane + p;
}

// The option-A shortcut: x [n, in_c, h, w] subsampled by `stride` into y [n, out_c, oh, ow], its
// channels placed after `before` zero channels.
struct ShortcutShape {
  int n, in_c, h, w, out_c, oh, ow, stride, before;
};
HOST_DEVICE inline float shortcut_forward(const float* x, int64_t i, const ShortcutShape& s) {
  const int j = int(i % s.ow), r = int((i / s.ow) % s.oh);
  const int oc = int((i / (int64_t(s.ow) * s.oh)) % s.out_c);
  const int img = int(i / (int64_t(s.ow) * s.oh * s.out_c));
  const int c = oc - s.before;
  return c >= 0 && c < s.in_c
             ? x[((int64_t(img) * s.in_c + c) * s.h + int64_t(r) * s.stride) * s.w +
                 int64_t(j) * s.stride]
             : 0.0f;
}
// Backward element i of n·in_c·oh·ow: dx[*dx_index] += dy[*dy_index]; no two i share a dx element.
HOST_DEVICE inline void shortcut_backward_indices(int64_t i, const ShortcutShape& s,
                                                  int64_t* dx_index, int64_t* dy_index) {
  const int j = int(i % s.ow), r = int((i / s.ow) % s.oh);
  const int c = int((i / (int64_t(s.ow) * s.oh)) % s.in_c);
  const int img = int(i / (int64_t(s.ow) * s.oh * s.in_c));
  *dx_index = ((int64_t(img) * s.in_c + c) * s.h + int64_t(r) * s.stride) * s.w +
              int64_t(j) * s.stride;
  *dy_index = ((int64_t(img) * s.out_c + s.before + c) * s.oh + r) * s.ow + j;
}

// Global average pooling of one plane: summed in double in order, as the CPU engine.
HOST_DEVICE inline float average_plane(const float* p, int64_t plane) {
  double sum = 0;
  for (int64_t k = 0; k < plane; ++k) sum += p[k];
  return float(sum / double(plane));
}

// Thread `thread`'s share of Σ over (n, h, w) of channel ch of an NCHW tensor, in double.
HOST_DEVICE inline double channel_sum_partial(const float* x, int ch, int n, int c, int64_t plane,
                                              int thread, int threads) {
  const int64_t count = int64_t(n) * plane;
  double sum = 0;
  for (int64_t i = thread; i < count; i += threads) {
    const int64_t img = i / plane, p = i % plane;
    sum += x[(img * c + ch) * plane + p];
  }
  return sum;
}

// Softmax cross-entropy of image img of logits [n, classes] (row-major): its loss, whether the
// arg-max is its label, and its logit gradients weight·(softmax − one-hot)/n.
HOST_DEVICE inline void cross_entropy_image(const float* logits, const int32_t* labels, int img,
                                            int n, int classes, float weight, float* dlogits,
                                            double* loss, int* right) {
  const float* z = logits + int64_t(img) * classes;
  int best = 0;
  for (int c = 1; c < classes; ++c)
    if (double(z[c]) > double(z[best])) best = c;
  const int label = labels[img];
  *right = best == label;
  double sum = 0;
  for (int c = 0; c < classes; ++c) sum += exp(double(z[c]) - double(z[best]));
  *loss = log(sum) + double(z[best]) - double(z[label]);
  for (int c = 0; c < classes; ++c) {
    const double p = exp(double(z[c]) - double(z[best]));
    const double target = c == label ? 1.0 : 0.0;
    dlogits[int64_t(img) * classes + c] = float(double(weight) * (p / sum - target) / n);
  }
}

// Thread `thread`'s share of max |w| (a max is exact in any order).
HOST_DEVICE inline float max_abs_partial(const float* w, int64_t count, int thread, int threads) {
  float m = 0;
  for (int64_t i = thread; i < count; i += threads) m = fmaxf(m, fabsf(w[i]));
  return m;
}

// The fake quantisers of train/quantise.h, element by element, with the same roundings.
HOST_DEVICE inline float quantise_weight_maxabs(float w, float max_abs, int bits) {
  const double top = cim::max_code(bits);
  const float w_hat = max_abs > 0 ? cim::fdiv_rn(w, max_abs) : 0.0f;
  const int level = cim::weight_level(w_hat, bits);
  return float(cim::div_rn(cim::mul_rn(double(max_abs), cim::sub_rn(2.0 * level, top)), top));
}
HOST_DEVICE inline float quantise_weight_wage(float w, double alpha, int bits) {
  const double top = cim::max_code(bits);
  const int level = cim::weight_level(cim::wage_weight(w, alpha, bits), bits);
  return float(cim::div_rn(cim::div_rn(cim::sub_rn(2.0 * level, top), top), alpha));
}
// Whether WAGE's straight-through gradient flows: |α·w| inside the clipping range.
HOST_DEVICE inline uint8_t wage_passes(float w, double alpha, int bits) {
  const double limit = 1.0 - ldexp(1.0, 1 - bits);
  return fabs(cim::mul_rn(alpha, double(w))) <= limit ? 1 : 0;
}
// step = a_max / (2^bits − 1), computed once by the launcher.
HOST_DEVICE inline float quantise_input(float x, float a_max, int bits, double step) {
  return float(cim::mul_rn(step, double(cim::input_level(x, a_max, bits))));
}
HOST_DEVICE inline uint8_t input_region(float x, float a_max) {
  return x < 0.0f ? kBelowRange : (x > a_max ? kAboveRange : kInRange);
}
HOST_DEVICE inline float quantise_input_backward(float dy, uint8_t region) {
  return region == kInRange ? dy : 0.0f;
}
// Thread `thread`'s share of the PACT range gradient Σ dy over the inputs clipped at the top.
HOST_DEVICE inline double clipped_sum_partial(const float* dy, const uint8_t* region,
                                              int64_t count, int thread, int threads) {
  double sum = 0;
  for (int64_t i = thread; i < count; i += threads)
    if (region[i] == kAboveRange) sum += dy[i];
  return sum;
}

// optimizer.cpp's sgd_step on one element: the same float operations in the same order (no
// contraction: nvcc --fmad=false, g++ -ffp-contract=off).
HOST_DEVICE inline void sgd_element(float& value, float grad, float& momentum, bool decays,
                                    float decay, float mu, float rate, bool nesterov) {
  float g = grad;
  if (decays) g += decay * value;
  momentum = mu * momentum + g;
  const float update = nesterov ? g + mu * momentum : momentum;
  value -= rate * update;
}

}  // namespace cimsweep::train::gpu::kernel
