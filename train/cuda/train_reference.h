// The CPU copy of the CUDA training path's own kernels (train_ops.cu): each function runs the
// kernel's per-element body (train_kernels.h) over the whole tensor, and each reduction splits
// its work over the same threads and adds the partials in the same tree, so it computes what the
// GPU computes. Compiled into the tests of every build (no CUDA needed): tests/test_train_reference
// checks it against the CPU engine (train/layers.h, train/quantise.h, sgd_step), the GPU tests
// check the kernels against the CPU engine. Tensors are NCHW unless named channel-major.
#pragma once
#include <cstddef>
#include <cstdint>

#include "train/cuda/train_kernels.h"

namespace cimsweep::train::gpu::reference {

void relu_forward(float* x, int64_t n);
void relu_backward(const float* y, float* dy, int64_t n);
void cnhw_to_nchw(const float* in, float* out, int c, int n, int64_t plane);
void nchw_to_cnhw(const float* in, float* out, int c, int n, int64_t plane);
// y must hold n·out_c·oh·ow values; dx accumulates (the caller zeroes it, as the GPU op's does).
void shortcut_a_forward(const float* x, float* y, const kernel::ShortcutShape& shape);
void shortcut_a_backward(const float* dy, float* dx, const kernel::ShortcutShape& shape);
void global_average_pool(const float* x, float* y, int64_t planes, int64_t plane);
void global_average_pool_backward(const float* dy, float* dx, int64_t planes, int64_t plane);
// out[ch] = Σ over (n, plane) of channel ch: the bias gradient of a convolution.
void channel_sum(const float* x, float* out, int n, int c, int64_t plane);
void add_bias(float* y, const float* bias, int n, int c, int64_t plane);
// logits [n, classes] row-major; returns the mean loss, sums the losses in image order.
double softmax_cross_entropy(const float* logits, const int32_t* labels, int n, int classes,
                             float weight, float* dlogits, int* correct);
float max_abs(const float* w, int64_t count);
void quantise_weights(const float* w, int64_t count, int fan_in, int bits, WeightScaling scaling,
                      float* out, uint8_t* pass);
void quantise_inputs(const float* x, int64_t count, float a_max, int bits, float* out,
                     uint8_t* region);
void quantise_inputs_backward(const float* dy, const uint8_t* region, int64_t count, float* dx,
                              double* d_range);
void add_inplace(float* y, const float* x, int64_t n);
void mask_gradient(float* grad, const uint8_t* pass, int64_t n);
void sgd_update(float* value, const float* grad, float* momentum, int64_t count, bool decays,
                float decay, float mu, float rate, bool nesterov);

}  // namespace cimsweep::train::gpu::reference
