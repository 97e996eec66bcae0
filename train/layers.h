// The layers of the trainable ResNet, forward and backward, on the CPU: convolution (oneDNN; the
// FC layer and unstrided 1×1 convolutions on OpenBLAS sgemm), batch norm, ReLU, option-A shortcut,
// global average pooling and softmax cross-entropy. Activations are channel-major [C, N, H, W] so
// that a convolution over the whole batch is one GEMM output and batch norm reads each channel
// contiguously.
//
// Determinism: every result is a pure function of the inputs, whatever the thread count. Threads
// take fixed chunks of images (never sized from the thread count), each chunk's convolution or
// GEMM runs on one thread (oneDNN primitives set up for one thread), and every sum over the batch
// (weight gradients, BN statistics) adds per-chunk or per-channel partial results in a fixed order.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace cimsweep::train {

// The arithmetic of the convolutions: fp32, or bf16 operands (input, weights, output gradient)
// with fp32 accumulation and fp32 results (outputs and all gradients).
enum class ConvPrecision { kFp32, kBf16 };
// --precision of the CPU trainer: "fp32", or "bf16" where oneDNN runs bf16 convolutions natively
// (AVX-512 BF16 or AMX); otherwise UserError with one line.
ConvPrecision parse_cpu_precision(const std::string& precision);
bool cpu_has_bf16_convolutions();
// oneDNN's name for the instruction set its kernels use on this CPU ("avx2", "avx512_core", …).
std::string convolution_isa();

// A batch of feature maps, channel-major: element (c, n, y, x) at ((c·N + n)·H + y)·W + x.
struct FeatureMap {
  int channels = 0, images = 0, height = 0, width = 0;
  std::vector<float> data;

  FeatureMap() = default;
  FeatureMap(int c, int n, int h, int w)
      : channels(c), images(n), height(h), width(w), data(size_t(c) * n * h * w, 0.0f) {}
  size_t plane() const { return size_t(height) * width; }
  size_t channel_size() const { return size_t(images) * height * width; }
  size_t size() const { return data.size(); }
  bool same_shape(const FeatureMap& o) const {
    return channels == o.channels && images == o.images && height == o.height && width == o.width;
  }
};

// Images [N, C, H, W] (row-major, as data sets and ResNet::forward hold them) to channel-major.
FeatureMap from_images(const float* images, int n, int c, int h, int w);
// Channel-major [classes, N, 1, 1] logits to row-major [N × classes].
std::vector<float> logits_row_major(const FeatureMap& logits);

// A convolution: weights [out, in, k, k], padding `pad`, square stride. A fully connected layer
// is the 1×1 convolution of a 1×1 map.
struct ConvGeometry {
  int in_channels = 0, out_channels = 0, kernel = 1, stride = 1, pad = 0;
  int rows() const { return in_channels * kernel * kernel; }
  int output_size(int input) const { return (input + 2 * pad - kernel) / stride + 1; }
};

// y = W ⊛ x (+ bias). `bias` may be null.
FeatureMap conv_forward(const ConvGeometry& g, const float* weight, const float* bias,
                        const FeatureMap& x, ConvPrecision precision = ConvPrecision::kFp32);
// Gradients of conv_forward: `dx` (null: not needed, e.g. the first layer) is overwritten;
// `dweight` [out × rows] and `dbias` [out] (may be null) are overwritten with this batch's sums.
void conv_backward(const ConvGeometry& g, const float* weight, const FeatureMap& x,
                   const FeatureMap& dy, FeatureMap* dx, float* dweight, float* dbias,
                   ConvPrecision precision = ConvPrecision::kFp32);

constexpr float kBatchNormEps = 1e-5f;      // as networks/resnet.cpp and PyTorch
constexpr float kBatchNormMomentum = 0.1f;  // running-statistics update, as PyTorch

// What the training-mode batch norm keeps for its backward pass.
struct BatchNormCache {
  std::vector<float> normalised;  // x̂ = (x − μ)/sqrt(σ² + eps), same layout as x
  std::vector<float> inv_std;     // per channel
};

// Training mode, in place: normalises each channel with the batch's mean and (biased) variance,
// then scales by gamma and shifts by beta. When running_mean/running_var are non-null they are
// updated as PyTorch does (momentum 0.1, unbiased variance).
void batchnorm_train_forward(const float* gamma, const float* beta, FeatureMap& x,
                             BatchNormCache& cache, float* running_mean, float* running_var);
// Evaluation mode, in place, folded exactly as networks/resnet.cpp folds it, so that the
// trainer's evaluation equals the evaluator's digital path up to GEMM rounding.
void batchnorm_eval_forward(const float* gamma, const float* beta, const float* running_mean,
                            const float* running_var, FeatureMap& x);
// In place: dy becomes dx. dgamma and dbeta are overwritten.
void batchnorm_backward(const float* gamma, const BatchNormCache& cache, FeatureMap& dy,
                        float* dgamma, float* dbeta);

void relu_forward(FeatureMap& x);
// In place: dy becomes dx, zero where the ReLU's output y was not positive.
void relu_backward(const FeatureMap& y, FeatureMap& dy);

// Option-A shortcut: subsample by the stride (ceil division, as networks/resnet.cpp), then place
// the channels at offset `before` among `out_channels` (the rest are zero).
FeatureMap shortcut_a_forward(const FeatureMap& x, int out_channels, int stride, int before);
// Adds the shortcut's gradient into dx (same shape as the shortcut's input).
void shortcut_a_backward(const FeatureMap& dy, int stride, int before, FeatureMap& dx);

// Mean over each image's plane: [C, N, H, W] → [C, N, 1, 1], summed in double as the evaluator.
FeatureMap global_average_pool(const FeatureMap& x);
FeatureMap global_average_pool_backward(const FeatureMap& dy, int height, int width);

// Mean softmax cross-entropy over the batch of `logits` ([classes, N, 1, 1]); writes
// d(weight·loss)/d logits into dlogits and counts the correct top-1 predictions (first maximum).
double softmax_cross_entropy(const FeatureMap& logits, const int32_t* labels, float weight,
                             FeatureMap& dlogits, int* correct);

}  // namespace cimsweep::train
