// The CUDA training ops (train_ops.h): cuDNN convolutions and batch norm, cuBLAS fully connected
// layers, and this file's kernels for everything else.
#include "train/cuda/train_ops.h"

#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <cudnn.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <mutex>
#include <utility>
#include <vector>
#include <stdexcept>
#include <string>
#include <tuple>

#include "cuda/cuda_check.h"
#include "cuda/device_info.h"
#include "common/errors.h"
#include "kernels/cim_math.h"
#include "train/cuda/train_kernels.h"

#define TRAIN_CUDNN_CHECK(call)                                                            \
  do {                                                                                     \
    const cudnnStatus_t status_ = (call);                                                  \
    if (status_ != CUDNN_STATUS_SUCCESS)                                                   \
      throw std::runtime_error(std::string("cuDNN error ") + cudnnGetErrorString(status_) + \
                               " in " #call " at " __FILE__ ":" + std::to_string(__LINE__)); \
  } while (0)

#define TRAIN_CUBLAS_CHECK(call)                                                             \
  do {                                                                                       \
    const cublasStatus_t status_ = (call);                                                   \
    if (status_ != CUBLAS_STATUS_SUCCESS)                                                    \
      throw std::runtime_error(std::string("cuBLAS error ") + std::to_string(int(status_)) + \
                               " in " #call " at " __FILE__ ":" + std::to_string(__LINE__)); \
  } while (0)

namespace cimsweep::train::gpu {

using cimsweep::cuda::grid_for;

// ---------------------------------------------------------------------------------------------
// DeviceVector, on a caching pool: a training step allocates and frees the same sizes every step,
// and cudaMalloc/cudaFree (which synchronise) would cost more than the kernels. Blocks are kept
// per (device, size rounded up to 512 bytes) and handed out again; the pool is emptied and the
// allocation retried once when the GPU runs out of memory.

namespace {

constexpr size_t kPoolGranule = 512;

struct Pool {
  std::mutex mutex;
  std::map<std::pair<int, size_t>, std::vector<void*>> free_blocks;
};
Pool& pool() {
  static Pool* p = new Pool;  // never destroyed: DeviceVectors with static lifetime may outlive it
  return *p;
}

size_t pool_bytes(size_t bytes) {
  return (std::max<size_t>(bytes, 1) + kPoolGranule - 1) / kPoolGranule * kPoolGranule;
}

void release_pool() {
  Pool& p = pool();
  std::lock_guard<std::mutex> lock(p.mutex);
  for (auto& [key, blocks] : p.free_blocks)
    for (void* block : blocks) cudaFree(block);
  p.free_blocks.clear();
}

void* pool_allocate(size_t bytes) {
  int device = 0;
  CIM_CUDA_CHECK(cudaGetDevice(&device));
  const size_t size = pool_bytes(bytes);
  {
    Pool& p = pool();
    std::lock_guard<std::mutex> lock(p.mutex);
    auto it = p.free_blocks.find({device, size});
    if (it != p.free_blocks.end() && !it->second.empty()) {
      void* block = it->second.back();
      it->second.pop_back();
      return block;
    }
  }
  void* ptr = nullptr;
  cudaError_t error = cudaMalloc(&ptr, size);
  if (error == cudaErrorMemoryAllocation) {
    cudaGetLastError();
    release_pool();
    error = cudaMalloc(&ptr, size);
  }
  if (error == cudaErrorMemoryAllocation) {
    cudaGetLastError();
    throw UserError("the GPU is out of memory for training (" + std::to_string(size >> 20) +
                    " MiB more): lower --batch, or free the GPU of other jobs");
  }
  CIM_CUDA_CHECK(error);
  return ptr;
}

void pool_free(void* ptr, size_t bytes) {
  if (!ptr) return;
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return;
  Pool& p = pool();
  std::lock_guard<std::mutex> lock(p.mutex);
  p.free_blocks[{device, pool_bytes(bytes)}].push_back(ptr);
}

}  // namespace

template <class T>
DeviceVector<T>::DeviceVector(size_t count) {
  resize(count);
}
template <class T>
DeviceVector<T>::DeviceVector(const std::vector<T>& host) {
  upload(host);
}
template <class T>
DeviceVector<T>::~DeviceVector() {
  pool_free(data_, count_ * sizeof(T));
}
template <class T>
DeviceVector<T>::DeviceVector(DeviceVector&& other) noexcept
    : data_(std::exchange(other.data_, nullptr)), count_(std::exchange(other.count_, 0)) {}
template <class T>
DeviceVector<T>& DeviceVector<T>::operator=(DeviceVector&& other) noexcept {
  if (this != &other) {
    pool_free(data_, count_ * sizeof(T));
    data_ = std::exchange(other.data_, nullptr);
    count_ = std::exchange(other.count_, 0);
  }
  return *this;
}
template <class T>
void DeviceVector<T>::resize(size_t count) {
  if (count != count_ || !data_) {
    pool_free(data_, count_ * sizeof(T));
    data_ = nullptr;
    count_ = 0;
    data_ = static_cast<T*>(pool_allocate(count * sizeof(T)));
    count_ = count;
  }
  if (count) CIM_CUDA_CHECK(cudaMemsetAsync(data_, 0, count * sizeof(T)));
}
template <class T>
void DeviceVector<T>::upload(const T* host, size_t count) {
  if (count != count_ || !data_) resize(count);
  if (count) CIM_CUDA_CHECK(cudaMemcpy(data_, host, count * sizeof(T), cudaMemcpyHostToDevice));
}
template <class T>
std::vector<T> DeviceVector<T>::download() const {
  std::vector<T> host(count_);
  if (count_)
    CIM_CUDA_CHECK(cudaMemcpy(host.data(), data_, count_ * sizeof(T), cudaMemcpyDeviceToHost));
  return host;
}
template class DeviceVector<float>;
template class DeviceVector<uint8_t>;
template class DeviceVector<int32_t>;
template class DeviceVector<double>;

// ---------------------------------------------------------------------------------------------
// Kernels: each thread runs the per-element body of train_kernels.h (shared with the CPU copy,
// train_reference.cpp); the reductions add their per-thread partials in one fixed tree.

namespace {

using kernel::kBlock;
using kernel::kClippedSumThreads;
using kernel::kCrossEntropyBlock;
using kernel::ShortcutShape;

#define TRAIN_GRID_STRIDE_LOOP(i, n)                                                   \
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < (n); \
       i += int64_t(gridDim.x) * blockDim.x)

__global__ void relu_kernel(float* x, int64_t n) {
  TRAIN_GRID_STRIDE_LOOP(i, n) x[i] = kernel::relu(x[i]);
}

__global__ void relu_backward_kernel(const float* y, float* dy, int64_t n) {
  TRAIN_GRID_STRIDE_LOOP(i, n) dy[i] = kernel::relu_backward(y[i], dy[i]);
}

// Channel-major [C, N, plane] <-> NCHW [N, C, plane].
__global__ void cnhw_to_nchw(const float* in, float* out, int c, int n, int64_t plane) {
  TRAIN_GRID_STRIDE_LOOP(i, int64_t(c) * n * plane)
  out[kernel::cnhw_to_nchw_index(i, c, n, plane)] = in[i];
}
__global__ void nchw_to_cnhw(const float* in, float* out, int c, int n, int64_t plane) {
  TRAIN_GRID_STRIDE_LOOP(i, int64_t(c) * n * plane)
  out[kernel::nchw_to_cnhw_index(i, c, n, plane)] = in[i];
}

__global__ void shortcut_forward_kernel(const float* x, float* y, ShortcutShape s) {
  TRAIN_GRID_STRIDE_LOOP(i, int64_t(s.n) * s.out_c * s.oh * s.ow)
  y[i] = kernel::shortcut_forward(x, i, s);
}
__global__ void shortcut_backward_kernel(const float* dy, float* dx, ShortcutShape s) {
  TRAIN_GRID_STRIDE_LOOP(i, int64_t(s.n) * s.in_c * s.oh * s.ow) {
    int64_t to, from;
    kernel::shortcut_backward_indices(i, s, &to, &from);
    dx[to] += dy[from];
  }
}

// One thread per (n, c) plane.
__global__ void gap_kernel(const float* x, float* y, int64_t planes, int64_t plane) {
  TRAIN_GRID_STRIDE_LOOP(i, planes) y[i] = kernel::average_plane(x + i * plane, plane);
}
__global__ void gap_backward_kernel(const float* dy, float* dx, int64_t planes, int64_t plane,
                                    float inv) {
  TRAIN_GRID_STRIDE_LOOP(i, planes * plane) dx[i] = dy[i / plane] * inv;
}

// The block's partials added pairwise: partial[t] += partial[t + s] for s = threads/2, ..., 1.
template <typename T, typename Op>
__device__ T block_tree(T* partial, Op op) {
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) partial[threadIdx.x] = op(partial[threadIdx.x], partial[threadIdx.x + s]);
    __syncthreads();
  }
  return partial[0];
}
struct Add {
  __device__ double operator()(double a, double b) const { return a + b; }
};
struct Max {
  __device__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

// Per channel of an NCHW tensor, one block per channel: the same sum on every run.
__global__ void channel_sum_kernel(const float* x, float* out, int n, int c, int64_t plane) {
  __shared__ double partial[kBlock];
  partial[threadIdx.x] =
      kernel::channel_sum_partial(x, blockIdx.x, n, c, plane, threadIdx.x, blockDim.x);
  const double sum = block_tree(partial, Add{});
  if (threadIdx.x == 0) out[blockIdx.x] = float(sum);
}

// y[n, o, plane] += bias[o].
__global__ void add_bias_kernel(float* y, const float* bias, int n, int c, int64_t plane) {
  TRAIN_GRID_STRIDE_LOOP(i, int64_t(n) * c * plane) y[i] += bias[(i / plane) % c];
}

// One thread per image: logits [N, classes] row-major.
__global__ void cross_entropy_kernel(const float* logits, const int32_t* labels, int n,
                                     int classes, float weight, float* dlogits, double* losses,
                                     int* right) {
  TRAIN_GRID_STRIDE_LOOP(img, int64_t(n))
  kernel::cross_entropy_image(logits, labels, int(img), n, classes, weight, dlogits,
                              losses + img, right + img);
}

// max |w| over the whole array (one block).
__global__ void max_abs_kernel(const float* w, int64_t count, float* out) {
  __shared__ float partial[kBlock];
  partial[threadIdx.x] = kernel::max_abs_partial(w, count, threadIdx.x, blockDim.x);
  const float m = block_tree(partial, Max{});
  if (threadIdx.x == 0) *out = m;
}

__global__ void quantise_weights_maxabs_kernel(const float* w, int64_t count, const float* max_abs_p,
                                               int bits, float* out, uint8_t* pass) {
  const float max_abs = *max_abs_p;
  TRAIN_GRID_STRIDE_LOOP(i, count) {
    out[i] = kernel::quantise_weight_maxabs(w[i], max_abs, bits);
    if (pass) pass[i] = 1;
  }
}

__global__ void quantise_weights_wage_kernel(const float* w, int64_t count, double alpha,
                                             int bits, float* out, uint8_t* pass) {
  TRAIN_GRID_STRIDE_LOOP(i, count) {
    out[i] = kernel::quantise_weight_wage(w[i], alpha, bits);
    if (pass) pass[i] = kernel::wage_passes(w[i], alpha, bits);
  }
}

__global__ void quantise_inputs_kernel(const float* x, int64_t count, float a_max, int bits,
                                       double step, float* out, uint8_t* region) {
  TRAIN_GRID_STRIDE_LOOP(i, count) {
    out[i] = kernel::quantise_input(x[i], a_max, bits, step);
    if (region) region[i] = kernel::input_region(x[i], a_max);
  }
}

__global__ void quantise_inputs_backward_kernel(const float* dy, const uint8_t* region,
                                                int64_t count, float* dx) {
  TRAIN_GRID_STRIDE_LOOP(i, count) dx[i] = kernel::quantise_input_backward(dy[i], region[i]);
}

// Σ dy where region = above, in double, one block: deterministic.
__global__ void clipped_sum_kernel(const float* dy, const uint8_t* region, int64_t count,
                                   double* out) {
  __shared__ double partial[kClippedSumThreads];
  partial[threadIdx.x] = kernel::clipped_sum_partial(dy, region, count, threadIdx.x, blockDim.x);
  const double sum = block_tree(partial, Add{});
  if (threadIdx.x == 0) *out = sum;
}

__global__ void add_kernel(float* y, const float* x, int64_t n) {
  TRAIN_GRID_STRIDE_LOOP(i, n) y[i] += x[i];
}

__global__ void mask_kernel(float* grad, const uint8_t* pass, int64_t n) {
  TRAIN_GRID_STRIDE_LOOP(i, n) grad[i] = pass[i] ? grad[i] : 0.0f;
}

__global__ void sgd_kernel(float* value, const float* grad, float* momentum, int64_t count,
                           bool decays, float decay, float mu, float rate, bool nesterov) {
  TRAIN_GRID_STRIDE_LOOP(i, count)
  kernel::sgd_element(value[i], grad[i], momentum[i], decays, decay, mu, rate, nesterov);
}

// RAII wrappers of the cuDNN descriptors.
struct TensorDesc {
  cudnnTensorDescriptor_t d = nullptr;
  TensorDesc(int n, int c, int h, int w) {
    TRAIN_CUDNN_CHECK(cudnnCreateTensorDescriptor(&d));
    TRAIN_CUDNN_CHECK(cudnnSetTensor4dDescriptor(d, CUDNN_TENSOR_NCHW, CUDNN_DATA_FLOAT, n, c, h, w));
  }
  ~TensorDesc() { cudnnDestroyTensorDescriptor(d); }
  TensorDesc(const TensorDesc&) = delete;
  TensorDesc& operator=(const TensorDesc&) = delete;
};
struct FilterDesc {
  cudnnFilterDescriptor_t d = nullptr;
  explicit FilterDesc(const ConvGeometry& g) {
    TRAIN_CUDNN_CHECK(cudnnCreateFilterDescriptor(&d));
    TRAIN_CUDNN_CHECK(cudnnSetFilter4dDescriptor(d, CUDNN_DATA_FLOAT, CUDNN_TENSOR_NCHW,
                                                 g.out_channels, g.in_channels, g.kernel,
                                                 g.kernel));
  }
  ~FilterDesc() { cudnnDestroyFilterDescriptor(d); }
  FilterDesc(const FilterDesc&) = delete;
  FilterDesc& operator=(const FilterDesc&) = delete;
};
struct ConvDesc {
  cudnnConvolutionDescriptor_t d = nullptr;
  ConvDesc(const ConvGeometry& g, Precision precision) {
    TRAIN_CUDNN_CHECK(cudnnCreateConvolutionDescriptor(&d));
    // Cross-correlation, as the im2col GEMM (and PyTorch) compute.
    TRAIN_CUDNN_CHECK(cudnnSetConvolution2dDescriptor(d, g.pad, g.pad, g.stride, g.stride, 1, 1,
                                                      CUDNN_CROSS_CORRELATION, CUDNN_DATA_FLOAT));
    // FMA math: no tensor cores, so no TF32 rounding of the operands; DEFAULT math lets cuDNN
    // use TF32 tensor cores on Ampere and later.
    TRAIN_CUDNN_CHECK(cudnnSetConvolutionMathType(
        d, precision == Precision::kFp32 ? CUDNN_FMA_MATH : CUDNN_DEFAULT_MATH));
  }
  ~ConvDesc() { cudnnDestroyConvolutionDescriptor(d); }
  ConvDesc(const ConvDesc&) = delete;
  ConvDesc& operator=(const ConvDesc&) = delete;
};

// The first algorithm cuDNN's heuristics rank that succeeded, is deterministic (for the backward
// passes: no atomics, so a rerun gives the same gradients) and fits the workspace limit.
template <class Perf>
std::pair<int, size_t> pick_algorithm(const Perf* perf, int returned, bool need_deterministic,
                                      const char* what) {
  constexpr size_t kWorkspaceLimit = size_t(1) << 30;
  for (int pass = 0; pass < 2; ++pass)
    for (int i = 0; i < returned; ++i) {
      if (perf[i].status != CUDNN_STATUS_SUCCESS || perf[i].memory > kWorkspaceLimit) continue;
      if (pass == 0 && need_deterministic && perf[i].determinism != CUDNN_DETERMINISTIC) continue;
      return {int(perf[i].algo), perf[i].memory};
    }
  throw std::runtime_error(std::string("cuDNN offers no ") + what + " algorithm for this layer");
}

}  // namespace

// ---------------------------------------------------------------------------------------------

Precision parse_precision(const std::string& text) {
  if (text == "fp32") return Precision::kFp32;
  if (text == "mixed") return Precision::kMixed;
  throw UserError("unknown --precision '" + text + "': fp32 or mixed");
}

std::string to_string(Precision precision) {
  return precision == Precision::kFp32 ? "fp32" : "mixed";
}

std::string unavailable_reason(int device) {
  try {
    if (cuda_device_count() <= device) return "no GPU found";
    const std::string why = cuda_device_unusable_reason(device);
    if (!why.empty()) return why;
    cudnnHandle_t handle = nullptr;
    CIM_CUDA_CHECK(cudaSetDevice(device));
    const cudnnStatus_t status = cudnnCreate(&handle);
    if (status != CUDNN_STATUS_SUCCESS)
      return std::string("cuDNN cannot start: ") + cudnnGetErrorString(status);
    cudnnDestroy(handle);
    return "";
  } catch (const std::exception& e) {
    return e.what();
  }
}

struct CudaTrainOps::Impl {
  int device = 0;
  Precision precision = Precision::kFp32;
  cudnnHandle_t cudnn = nullptr;
  cublasHandle_t cublas = nullptr;
  DeviceVector<uint8_t> workspace;
  DeviceVector<float> scalar;     // max |w|
  DeviceVector<double> d_scalar;  // d_range
  DeviceVector<double> losses;
  DeviceVector<int32_t> right;
  // Algorithms per (geometry, input shape): kind, in, out, k, stride, pad, n, h, w.
  std::map<std::tuple<int, int, int, int, int, int, int, int, int>, std::pair<int, size_t>> algos;

  void* workspace_for(size_t bytes) {
    if (workspace.size() < bytes) workspace.resize(bytes);
    return bytes ? workspace.data() : nullptr;
  }
};

CudaTrainOps::CudaTrainOps(int device, Precision precision) : impl_(std::make_unique<Impl>()) {
  const std::string why = unavailable_reason(device);
  if (!why.empty()) throw UserError("the CUDA training path cannot run on GPU " +
                                    std::to_string(device) + ": " + why);
  impl_->device = device;
  impl_->precision = precision;
  CIM_CUDA_CHECK(cudaSetDevice(device));
  TRAIN_CUDNN_CHECK(cudnnCreate(&impl_->cudnn));
  TRAIN_CUBLAS_CHECK(cublasCreate(&impl_->cublas));
  TRAIN_CUBLAS_CHECK(cublasSetMathMode(
      impl_->cublas, precision == Precision::kFp32 ? CUBLAS_PEDANTIC_MATH
                                                   : CUBLAS_TF32_TENSOR_OP_MATH));
  impl_->scalar.resize(1);
  impl_->d_scalar.resize(1);
}

CudaTrainOps::~CudaTrainOps() {
  if (impl_->cublas) cublasDestroy(impl_->cublas);
  if (impl_->cudnn) cudnnDestroy(impl_->cudnn);
}

Precision CudaTrainOps::precision() const { return impl_->precision; }

void CudaTrainOps::synchronize() { CIM_CUDA_CHECK(cudaDeviceSynchronize()); }

DeviceMap CudaTrainOps::upload(const FeatureMap& x) {
  DeviceVector<float> staging(x.data);
  DeviceMap y(x.channels, x.images, x.height, x.width);
  if (y.size()) {
    cnhw_to_nchw<<<grid_for(int64_t(y.size()), kBlock), kBlock>>>(
        staging.data(), y.data.data(), x.channels, x.images, int64_t(x.plane()));
    CIM_CUDA_CHECK_LAUNCH();
  }
  return y;
}

FeatureMap CudaTrainOps::download(const DeviceMap& x) {
  DeviceVector<float> staging(x.size());
  if (x.size()) {
    nchw_to_cnhw<<<grid_for(int64_t(x.size()), kBlock), kBlock>>>(
        x.data.data(), staging.data(), x.channels, x.images, int64_t(x.plane()));
    CIM_CUDA_CHECK_LAUNCH();
  }
  FeatureMap y(x.channels, x.images, x.height, x.width);
  y.data = staging.download();
  return y;
}

DeviceMap CudaTrainOps::upload_images(const float* images, int n, int c, int h, int w) {
  DeviceMap y(c, n, h, w);
  y.data.upload(images, y.size());
  return y;
}

namespace {
// A fully connected layer: a 1×1 convolution of a 1×1 map, an [N, in] × [in, out] GEMM.
bool is_fully_connected(const ConvGeometry& g, const DeviceMap& x) {
  return g.kernel == 1 && g.stride == 1 && g.pad == 0 && x.height == 1 && x.width == 1;
}
}  // namespace

DeviceMap CudaTrainOps::conv_forward(const ConvGeometry& g, const float* weight, const float* bias,
                                     const DeviceMap& x) {
  const int oh = g.output_size(x.height), ow = g.output_size(x.width), n = x.images;
  DeviceMap y(g.out_channels, n, oh, ow);
  if (n == 0) return y;
  if (is_fully_connected(g, x)) {
    // Column-major view: y(out × N) = Wᵀ(out × in) · x(in × N), W row-major [out, in].
    const float one = 1.0f, zero = 0.0f;
    TRAIN_CUBLAS_CHECK(cublasSgemm(impl_->cublas, CUBLAS_OP_T, CUBLAS_OP_N, g.out_channels, n,
                                   g.in_channels, &one, weight, g.in_channels, x.data.data(),
                                   g.in_channels, &zero, y.data.data(), g.out_channels));
  } else {
    TensorDesc xd(n, x.channels, x.height, x.width), yd(n, g.out_channels, oh, ow);
    FilterDesc wd(g);
    ConvDesc cd(g, impl_->precision);
    const auto key = std::make_tuple(0, g.in_channels, g.out_channels, g.kernel, g.stride, g.pad, n,
                                     x.height, x.width);
    auto it = impl_->algos.find(key);
    if (it == impl_->algos.end()) {
      cudnnConvolutionFwdAlgoPerf_t perf[CUDNN_CONVOLUTION_FWD_ALGO_COUNT];
      int returned = 0;
      TRAIN_CUDNN_CHECK(cudnnGetConvolutionForwardAlgorithm_v7(
          impl_->cudnn, xd.d, wd.d, cd.d, yd.d, CUDNN_CONVOLUTION_FWD_ALGO_COUNT, &returned, perf));
      it = impl_->algos.emplace(key, pick_algorithm(perf, returned, false, "forward")).first;
    }
    const float one = 1.0f, zero = 0.0f;
    TRAIN_CUDNN_CHECK(cudnnConvolutionForward(
        impl_->cudnn, &one, xd.d, x.data.data(), wd.d, weight, cd.d,
        cudnnConvolutionFwdAlgo_t(it->second.first), impl_->workspace_for(it->second.second),
        it->second.second, &zero, yd.d, y.data.data()));
  }
  if (bias) {
    add_bias_kernel<<<grid_for(int64_t(y.size()), kBlock), kBlock>>>(
        y.data.data(), bias, n, g.out_channels, int64_t(y.plane()));
    CIM_CUDA_CHECK_LAUNCH();
  }
  return y;
}

void CudaTrainOps::conv_backward(const ConvGeometry& g, const float* weight, const DeviceMap& x,
                                 const DeviceMap& dy, DeviceMap* dx, float* dweight,
                                 float* dbias) {
  const int n = x.images;
  if (dx) *dx = DeviceMap(x.channels, x.images, x.height, x.width);
  if (dbias) {
    channel_sum_kernel<<<g.out_channels, kBlock>>>(dy.data.data(), dbias, n, g.out_channels,
                                                   int64_t(dy.plane()));
    CIM_CUDA_CHECK_LAUNCH();
  }
  const float one = 1.0f, zero = 0.0f;
  if (is_fully_connected(g, x)) {
    // dW (in × out, column-major = [out, in] row-major) = x(in × N) · dyᵀ(N × out).
    TRAIN_CUBLAS_CHECK(cublasSgemm(impl_->cublas, CUBLAS_OP_N, CUBLAS_OP_T, g.in_channels,
                                   g.out_channels, n, &one, x.data.data(), g.in_channels,
                                   dy.data.data(), g.out_channels, &zero, dweight, g.in_channels));
    if (dx)
      // dx(in × N) = W(in × out) · dy(out × N).
      TRAIN_CUBLAS_CHECK(cublasSgemm(impl_->cublas, CUBLAS_OP_N, CUBLAS_OP_N, g.in_channels, n,
                                     g.out_channels, &one, weight, g.in_channels, dy.data.data(),
                                     g.out_channels, &zero, dx->data.data(), g.in_channels));
    return;
  }
  TensorDesc xd(n, x.channels, x.height, x.width), yd(n, dy.channels, dy.height, dy.width);
  FilterDesc wd(g);
  ConvDesc cd(g, impl_->precision);
  {
    const auto key = std::make_tuple(1, g.in_channels, g.out_channels, g.kernel, g.stride, g.pad,
                                     n, x.height, x.width);
    auto it = impl_->algos.find(key);
    if (it == impl_->algos.end()) {
      cudnnConvolutionBwdFilterAlgoPerf_t perf[CUDNN_CONVOLUTION_BWD_FILTER_ALGO_COUNT];
      int returned = 0;
      TRAIN_CUDNN_CHECK(cudnnGetConvolutionBackwardFilterAlgorithm_v7(
          impl_->cudnn, xd.d, yd.d, cd.d, wd.d, CUDNN_CONVOLUTION_BWD_FILTER_ALGO_COUNT, &returned,
          perf));
      it = impl_->algos.emplace(key, pick_algorithm(perf, returned, true, "backward-filter")).first;
    }
    TRAIN_CUDNN_CHECK(cudnnConvolutionBackwardFilter(
        impl_->cudnn, &one, xd.d, x.data.data(), yd.d, dy.data.data(), cd.d,
        cudnnConvolutionBwdFilterAlgo_t(it->second.first), impl_->workspace_for(it->second.second),
        it->second.second, &zero, wd.d, dweight));
  }
  if (!dx) return;
  const auto key = std::make_tuple(2, g.in_channels, g.out_channels, g.kernel, g.stride, g.pad, n,
                                   x.height, x.width);
  auto it = impl_->algos.find(key);
  if (it == impl_->algos.end()) {
    cudnnConvolutionBwdDataAlgoPerf_t perf[CUDNN_CONVOLUTION_BWD_DATA_ALGO_COUNT];
    int returned = 0;
    TRAIN_CUDNN_CHECK(cudnnGetConvolutionBackwardDataAlgorithm_v7(
        impl_->cudnn, wd.d, yd.d, cd.d, xd.d, CUDNN_CONVOLUTION_BWD_DATA_ALGO_COUNT, &returned,
        perf));
    it = impl_->algos.emplace(key, pick_algorithm(perf, returned, true, "backward-data")).first;
  }
  TRAIN_CUDNN_CHECK(cudnnConvolutionBackwardData(
      impl_->cudnn, &one, wd.d, weight, yd.d, dy.data.data(), cd.d,
      cudnnConvolutionBwdDataAlgo_t(it->second.first), impl_->workspace_for(it->second.second),
      it->second.second, &zero, xd.d, dx->data.data()));
}

void CudaTrainOps::batchnorm_train_forward(const float* gamma, const float* beta, DeviceMap& x,
                                           DeviceBatchNormCache& cache, float* running_mean,
                                           float* running_var) {
  const int c = x.channels;
  // cuDNN's backward reads x itself: keep it, and normalise it into x's buffer.
  cache.input = std::move(x.data);
  x.data = DeviceVector<float>(x.size());
  cache.mean.resize(size_t(c));
  cache.inv_std.resize(size_t(c));
  TensorDesc xd(x.images, c, x.height, x.width), pd(1, c, 1, 1);
  const float one = 1.0f, zero = 0.0f;
  // Without running statistics to update, a factor of 0 into scratch buffers.
  DeviceVector<float> scratch_mean, scratch_var;
  const bool update = running_mean && running_var;
  if (!update) {
    scratch_mean.resize(size_t(c));
    scratch_var.resize(size_t(c));
  }
  TRAIN_CUDNN_CHECK(cudnnBatchNormalizationForwardTraining(
      impl_->cudnn, CUDNN_BATCHNORM_SPATIAL, &one, &zero, xd.d, cache.input.data(), xd.d,
      x.data.data(), pd.d, gamma, beta, update ? double(kBatchNormMomentum) : 0.0,
      update ? running_mean : scratch_mean.data(), update ? running_var : scratch_var.data(),
      double(kBatchNormEps), cache.mean.data(), cache.inv_std.data()));
}

void CudaTrainOps::batchnorm_eval_forward(const float* gamma, const float* beta,
                                          const float* running_mean, const float* running_var,
                                          DeviceMap& x) {
  TensorDesc xd(x.images, x.channels, x.height, x.width), pd(1, x.channels, 1, 1);
  DeviceVector<float> y(x.size());
  const float one = 1.0f, zero = 0.0f;
  TRAIN_CUDNN_CHECK(cudnnBatchNormalizationForwardInference(
      impl_->cudnn, CUDNN_BATCHNORM_SPATIAL, &one, &zero, xd.d, x.data.data(), xd.d, y.data(), pd.d,
      gamma, beta, running_mean, running_var, double(kBatchNormEps)));
  x.data = std::move(y);
}

void CudaTrainOps::batchnorm_backward(const float* gamma, const DeviceBatchNormCache& cache,
                                      DeviceMap& dy, float* dgamma, float* dbeta) {
  TensorDesc xd(dy.images, dy.channels, dy.height, dy.width), pd(1, dy.channels, 1, 1);
  DeviceVector<float> dx(dy.size());
  const float one = 1.0f, zero = 0.0f;
  TRAIN_CUDNN_CHECK(cudnnBatchNormalizationBackward(
      impl_->cudnn, CUDNN_BATCHNORM_SPATIAL, &one, &zero, &one, &zero, xd.d, cache.input.data(),
      xd.d, dy.data.data(), xd.d, dx.data(), pd.d, gamma, dgamma, dbeta, double(kBatchNormEps),
      cache.mean.data(), cache.inv_std.data()));
  dy.data = std::move(dx);
}

void CudaTrainOps::relu_forward(DeviceMap& x) {
  if (!x.size()) return;
  relu_kernel<<<grid_for(int64_t(x.size()), kBlock), kBlock>>>(x.data.data(), int64_t(x.size()));
  CIM_CUDA_CHECK_LAUNCH();
}

void CudaTrainOps::relu_backward(const DeviceMap& y, DeviceMap& dy) {
  if (!dy.size()) return;
  relu_backward_kernel<<<grid_for(int64_t(dy.size()), kBlock), kBlock>>>(
      y.data.data(), dy.data.data(), int64_t(dy.size()));
  CIM_CUDA_CHECK_LAUNCH();
}

DeviceMap CudaTrainOps::shortcut_a_forward(const DeviceMap& x, int out_channels, int stride,
                                           int before) {
  const int oh = (x.height + stride - 1) / stride, ow = (x.width + stride - 1) / stride;
  DeviceMap y(out_channels, x.images, oh, ow);
  if (!y.size()) return y;
  const ShortcutShape shape{x.images, x.channels, x.height, x.width, out_channels, oh, ow,
                            stride, before};
  shortcut_forward_kernel<<<grid_for(int64_t(y.size()), kBlock), kBlock>>>(x.data.data(),
                                                                          y.data.data(), shape);
  CIM_CUDA_CHECK_LAUNCH();
  return y;
}

void CudaTrainOps::shortcut_a_backward(const DeviceMap& dy, int stride, int before,
                                       DeviceMap& dx) {
  const int64_t total = int64_t(dx.images) * dx.channels * dy.height * dy.width;
  if (!total) return;
  const ShortcutShape shape{dx.images, dx.channels, dx.height, dx.width, dy.channels,
                            dy.height, dy.width, stride, before};
  shortcut_backward_kernel<<<grid_for(total, kBlock), kBlock>>>(dy.data.data(), dx.data.data(),
                                                               shape);
  CIM_CUDA_CHECK_LAUNCH();
}

DeviceMap CudaTrainOps::global_average_pool(const DeviceMap& x) {
  DeviceMap y(x.channels, x.images, 1, 1);
  if (!y.size()) return y;
  gap_kernel<<<grid_for(int64_t(y.size()), kBlock), kBlock>>>(
      x.data.data(), y.data.data(), int64_t(y.size()), int64_t(x.plane()));
  CIM_CUDA_CHECK_LAUNCH();
  return y;
}

DeviceMap CudaTrainOps::global_average_pool_backward(const DeviceMap& dy, int height, int width) {
  DeviceMap dx(dy.channels, dy.images, height, width);
  if (!dx.size()) return dx;
  const int64_t plane = int64_t(height) * width;
  gap_backward_kernel<<<grid_for(int64_t(dx.size()), kBlock), kBlock>>>(
      dy.data.data(), dx.data.data(), int64_t(dy.size()), plane, 1.0f / float(plane));
  CIM_CUDA_CHECK_LAUNCH();
  return dx;
}

double CudaTrainOps::softmax_cross_entropy(const DeviceMap& logits, const int32_t* labels,
                                           float weight, DeviceMap& dlogits, int* correct) {
  const int n = logits.images, classes = logits.channels;
  dlogits = DeviceMap(classes, n, 1, 1);
  if (n == 0) {
    if (correct) *correct = 0;
    return 0.0;
  }
  impl_->losses.resize(size_t(n));
  impl_->right.resize(size_t(n));
  cross_entropy_kernel<<<grid_for(n, kCrossEntropyBlock), kCrossEntropyBlock>>>(
      logits.data.data(), labels, n, classes, weight, dlogits.data.data(), impl_->losses.data(),
      impl_->right.data());
  CIM_CUDA_CHECK_LAUNCH();
  const std::vector<double> losses = impl_->losses.download();
  const std::vector<int32_t> right = impl_->right.download();
  double loss = 0;
  int total = 0;
  for (int i = 0; i < n; ++i) {  // in image order, as the CPU
    loss += losses[size_t(i)];
    total += right[size_t(i)];
  }
  if (correct) *correct = total;
  return loss / n;
}

void CudaTrainOps::quantise_weights(const float* w, size_t count, int fan_in, int weight_bits,
                                    WeightScaling scaling, float* out, uint8_t* pass) {
  if (!count) return;
  if (scaling == WeightScaling::kMaxAbs) {
    max_abs_kernel<<<1, kBlock>>>(w, int64_t(count), impl_->scalar.data());
    CIM_CUDA_CHECK_LAUNCH();
    quantise_weights_maxabs_kernel<<<grid_for(int64_t(count), kBlock), kBlock>>>(
        w, int64_t(count), impl_->scalar.data(), weight_bits, out, pass);
  } else {
    quantise_weights_wage_kernel<<<grid_for(int64_t(count), kBlock), kBlock>>>(
        w, int64_t(count), wage_alpha(fan_in, weight_bits), weight_bits, out, pass);
  }
  CIM_CUDA_CHECK_LAUNCH();
}

void CudaTrainOps::quantise_inputs(const float* x, size_t count, float a_max, int input_bits,
                                   float* out, uint8_t* region) {
  if (!count) return;
  const double step = double(a_max) / double(cim::max_code(input_bits));
  quantise_inputs_kernel<<<grid_for(int64_t(count), kBlock), kBlock>>>(
      x, int64_t(count), a_max, input_bits, step, out, region);
  CIM_CUDA_CHECK_LAUNCH();
}

void CudaTrainOps::quantise_inputs_backward(const float* dy, const uint8_t* region, size_t count,
                                            float* dx, double* d_range) {
  if (count) {
    quantise_inputs_backward_kernel<<<grid_for(int64_t(count), kBlock), kBlock>>>(
        dy, region, int64_t(count), dx);
    CIM_CUDA_CHECK_LAUNCH();
  }
  if (d_range) {
    clipped_sum_kernel<<<1, kClippedSumThreads>>>(dy, region, int64_t(count), impl_->d_scalar.data());
    CIM_CUDA_CHECK_LAUNCH();
    *d_range = impl_->d_scalar.download()[0];
  }
}

DeviceMap CudaTrainOps::clone(const DeviceMap& x) {
  DeviceMap y(x.channels, x.images, x.height, x.width);
  if (y.size())
    CIM_CUDA_CHECK(cudaMemcpy(y.data.data(), x.data.data(), y.size() * sizeof(float),
                              cudaMemcpyDeviceToDevice));
  return y;
}

void CudaTrainOps::add_inplace(DeviceMap& y, const DeviceMap& x) {
  if (y.size() != x.size()) throw std::logic_error("add_inplace: shapes differ");
  if (!y.size()) return;
  add_kernel<<<grid_for(int64_t(y.size()), kBlock), kBlock>>>(y.data.data(), x.data.data(),
                                                             int64_t(y.size()));
  CIM_CUDA_CHECK_LAUNCH();
}

void CudaTrainOps::mask_gradient(float* grad, const uint8_t* pass, size_t count) {
  if (!count) return;
  mask_kernel<<<grid_for(int64_t(count), kBlock), kBlock>>>(grad, pass, int64_t(count));
  CIM_CUDA_CHECK_LAUNCH();
}

void CudaTrainOps::sgd_update(float* value, const float* grad, float* momentum, size_t count,
                              bool weight_decay, const SgdSettings& settings, double lr) {
  if (!count) return;
  const float decay = float(settings.weight_decay);
  sgd_kernel<<<grid_for(int64_t(count), kBlock), kBlock>>>(
      value, grad, momentum, int64_t(count), weight_decay && decay > 0, decay,
      float(settings.momentum), float(lr), settings.nesterov);
  CIM_CUDA_CHECK_LAUNCH();
}

}  // namespace cimsweep::train::gpu
