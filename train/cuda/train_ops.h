// The CUDA path of the training engine: the ops of train/layers.h, train/quantise.h and
// train/optimizer.h on GPU-resident tensors, with the same semantics (results equal up to float
// rounding). Convolutions and batch norm run on cuDNN, fully connected layers (1×1 convolutions
// of 1×1 maps) on cuBLAS, everything cuDNN/cuBLAS has no op for on this folder's own kernels:
// the QAT fake quantisers with their straight-through gradients, ReLU, the option-A shortcut,
// global average pooling, softmax cross-entropy and the SGD update.
//
// Layout: on the GPU a batch is NCHW (image-major, as cuDNN reads it), unlike the CPU's
// channel-major FeatureMap; upload()/download() convert. Dataset images [N, C, H, W] are NCHW
// already (upload_images).
//
// Built only with CUDA and cuDNN (CIMSWEEP_HAVE_CUDNN); plain C++ header, no CUDA types, so that
// host code and the tests include it with the ordinary compiler.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "train/layers.h"
#include "train/optimizer.h"
#include "train/quantise.h"

namespace cimsweep::train::gpu {

// fp32: every convolution and GEMM in IEEE fp32 FMA math (no TF32, no fp16); mixed: TF32 tensor
// cores for convolutions and GEMMs, fp32 master weights, fp32 batch norm, quantisers and update.
enum class Precision { kFp32, kMixed };
Precision parse_precision(const std::string& text);  // fp32 | mixed; UserError otherwise
std::string to_string(Precision precision);

// Why the CUDA training path cannot run on GPU `device` ("" when it can): no GPU or driver, GPU
// unusable for this build, cuDNN missing at run time. Never throws.
std::string unavailable_reason(int device = 0);

// An owning array on the GPU (zeroed on construction), movable, not copyable.
template <class T>
class DeviceVector {
 public:
  DeviceVector() = default;
  explicit DeviceVector(size_t count);
  explicit DeviceVector(const std::vector<T>& host);
  ~DeviceVector();
  DeviceVector(DeviceVector&& other) noexcept;
  DeviceVector& operator=(DeviceVector&& other) noexcept;
  DeviceVector(const DeviceVector&) = delete;
  DeviceVector& operator=(const DeviceVector&) = delete;

  void resize(size_t count);  // contents lost when the size changes; zeroed
  void upload(const T* host, size_t count);
  void upload(const std::vector<T>& host) { upload(host.data(), host.size()); }
  std::vector<T> download() const;
  T* data() { return data_; }
  const T* data() const { return data_; }
  size_t size() const { return count_; }

 private:
  T* data_ = nullptr;
  size_t count_ = 0;
};
extern template class DeviceVector<float>;
extern template class DeviceVector<uint8_t>;
extern template class DeviceVector<int32_t>;
extern template class DeviceVector<double>;

// A batch of feature maps on the GPU, NCHW: element (n, c, y, x) at ((n·C + c)·H + y)·W + x.
struct DeviceMap {
  int channels = 0, images = 0, height = 0, width = 0;
  DeviceVector<float> data;

  DeviceMap() = default;
  DeviceMap(int c, int n, int h, int w)
      : channels(c), images(n), height(h), width(w), data(size_t(c) * n * h * w) {}
  size_t size() const { return size_t(channels) * images * height * width; }
  size_t plane() const { return size_t(height) * width; }
};

// What the training-mode batch norm keeps for its backward pass (cuDNN's saved statistics).
struct DeviceBatchNormCache {
  DeviceVector<float> input;  // x before normalisation
  DeviceVector<float> mean, inv_std;
};

class CudaTrainOps {
 public:
  // Creates the cuDNN and cuBLAS handles on GPU `device`. Throws when the GPU cannot be used.
  explicit CudaTrainOps(int device = 0, Precision precision = Precision::kFp32);
  ~CudaTrainOps();
  CudaTrainOps(const CudaTrainOps&) = delete;
  CudaTrainOps& operator=(const CudaTrainOps&) = delete;

  Precision precision() const;
  void synchronize();

  DeviceMap upload(const FeatureMap& x);           // channel-major (CPU) → NCHW (GPU)
  FeatureMap download(const DeviceMap& x);         // NCHW → channel-major
  DeviceMap upload_images(const float* images, int n, int c, int h, int w);  // [N, C, H, W]

  // All pointers below are device pointers. Same contracts as train/layers.h.
  DeviceMap conv_forward(const ConvGeometry& g, const float* weight, const float* bias,
                         const DeviceMap& x);
  void conv_backward(const ConvGeometry& g, const float* weight, const DeviceMap& x,
                     const DeviceMap& dy, DeviceMap* dx, float* dweight, float* dbias);

  void batchnorm_train_forward(const float* gamma, const float* beta, DeviceMap& x,
                               DeviceBatchNormCache& cache, float* running_mean,
                               float* running_var);
  void batchnorm_eval_forward(const float* gamma, const float* beta, const float* running_mean,
                              const float* running_var, DeviceMap& x);
  void batchnorm_backward(const float* gamma, const DeviceBatchNormCache& cache, DeviceMap& dy,
                          float* dgamma, float* dbeta);

  void relu_forward(DeviceMap& x);
  void relu_backward(const DeviceMap& y, DeviceMap& dy);

  DeviceMap shortcut_a_forward(const DeviceMap& x, int out_channels, int stride, int before);
  void shortcut_a_backward(const DeviceMap& dy, int stride, int before, DeviceMap& dx);

  DeviceMap global_average_pool(const DeviceMap& x);
  DeviceMap global_average_pool_backward(const DeviceMap& dy, int height, int width);

  // labels: device array of logits.images labels. Returns the mean loss (synchronises).
  double softmax_cross_entropy(const DeviceMap& logits, const int32_t* labels, float weight,
                               DeviceMap& dlogits, int* correct);

  // The fake quantisers of train/quantise.h (same values: the shared kernels/cim_math.h
  // functions compute the levels on both sides). pass/region may be null.
  void quantise_weights(const float* w, size_t count, int fan_in, int weight_bits,
                        WeightScaling scaling, float* out, uint8_t* pass);
  void quantise_inputs(const float* x, size_t count, float a_max, int input_bits, float* out,
                       uint8_t* region);
  // d_range (host pointer, may be null): Σ dy over the inputs clipped at the top, summed in
  // double in a fixed order (synchronises).
  void quantise_inputs_backward(const float* dy, const uint8_t* region, size_t count, float* dx,
                                double* d_range);

  DeviceMap clone(const DeviceMap& x);  // a device-side copy
  // y += x (same shape): the residual add and gradient accumulation.
  void add_inplace(DeviceMap& y, const DeviceMap& x);
  // grad[i] = pass[i] ? grad[i] : 0 (the straight-through mask of a clipped weight).
  void mask_gradient(float* grad, const uint8_t* pass, size_t count);

  // sgd_step of train/optimizer.h for one parameter (same float operations).
  void sgd_update(float* value, const float* grad, float* momentum, size_t count,
                  bool weight_decay, const SgdSettings& settings, double lr);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace cimsweep::train::gpu
