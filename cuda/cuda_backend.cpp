// The CUDA backend's host side: device memory, the order of the kernels, cuBLAS calls. Compiled by
// the C++ compiler; every kernel sits behind a validated entry in cuda/*.cuh.
#include "cuda/cuda_backend.h"

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <stdexcept>

#include "cuda/adc_accumulate.cuh"
#include "cuda/adc_ranges.cuh"
#include "cuda/cim_plan.h"
#include "cuda/cuda_check.h"
#include "cuda/device_info.h"
#include "cuda/half_operands.cuh"
#include "cuda/levels_to_double.cuh"
#include "cuda/partial_sums.cuh"
#include "cuda/program_subarray.cuh"
#include "cuda/quantise_im2col.cuh"
#include "cuda/scale_output.cuh"
#include "common/errors.h"

#define CIM_CUBLAS_CHECK(call)                                                                   \
  do {                                                                                           \
    const cublasStatus_t cim_status_ = (call);                                                   \
    if (cim_status_ != CUBLAS_STATUS_SUCCESS)                                                    \
      throw std::runtime_error(std::string("cuBLAS error ") + cublasGetStatusName(cim_status_) + \
                               " in " #call " at " + __FILE__ + ":" + std::to_string(__LINE__)); \
  } while (0)

namespace cimsweep {

using cuda::DeviceBuffer;
using cuda::DeviceScope;

std::string to_string(CudaPrecision precision) {
  return precision == CudaPrecision::kExact ? "exact" : "fast";
}

namespace {

// The digital layer's GEMM takes the input levels as doubles in chunks of this many bytes.
constexpr size_t kDigitalChunkBytes = size_t(256) << 20;
constexpr size_t kDefaultWorkspaceBytes = size_t(2) << 30;

struct DeviceLayer {
  DeviceBuffer<uint16_t> levels{"weight levels"};
  DeviceBuffer<int> mapped_to_logical{"row mapping"};
  DeviceBuffer<float> bias{"bias"};
  DeviceBuffer<double> digital_weights{"digital weights"};
  // Every sub-array's operand; sub-array s starts at operand_rows·subarray_begin[s].
  DeviceBuffer<float> chip{"programmed chip"};
  DeviceBuffer<uint16_t> chip_half{"fp16 chip"};
  int max_width = 0;
};

}  // namespace

struct CudaCimBackend::Impl {
  int device = 0;
  CimConfig config;
  CudaBackendOptions options;
  std::vector<QuantisedLayer> layers;
  std::vector<DeviceLayer> device_layers;
  cudaStream_t stream = nullptr;
  cublasHandle_t cublas = nullptr;
  uint32_t trial = 0, batch_index = 0;
  double sigma = 0;
  bool calibrating = false, all_digital = false;
  std::vector<double> calibration_max;
  size_t workspace_bytes = kDefaultWorkspaceBytes;

  // Per-layer scratch, grown to the largest layer and batch seen.
  DeviceBuffer<float> x{"layer input"}, y{"layer output"};
  DeviceBuffer<uint16_t> mapped{"input levels"};
  // The layer's sums: the codes' part [outs][positions] (a digital layer's exact sums) and the
  // part common to a position's outputs [positions] (cim-model.md §5, "Summation order").
  DeviceBuffer<double> acc{"accumulators"}, common{"common parts"};
  DeviceBuffer<double> digital_inputs{"digital inputs"};
  DeviceBuffer<float> partials{"partial sums"}, cycle_operands{"per-read operands"};
  DeviceBuffer<uint16_t> cycle_half{"fp16 per-read operands"}, planes{"fp16 bit planes"};
  DeviceBuffer<uint64_t> range_keys{"ADC range keys"}, largest{"calibration maximum"};
  DeviceBuffer<cimops::SliceRange> ranges{"ADC ranges"};

  ~Impl() {
    try {
      DeviceScope scope(device);
      if (cublas) cublasDestroy(cublas);
      if (stream) cudaStreamDestroy(stream);
    } catch (...) {
      // Destructors must not throw; the process is going down with the device anyway.
    }
  }

  int operand_rows(int index) const {
    return config.cells_per_weight() * layers[index].spec.out_channels +
           config.chip(sigma, trial, index).reference_rows();
  }
  bool fast() const { return options.precision == CudaPrecision::kFast; }

  void program_layer(int index);
  void run_cim(int index, int64_t positions);
  void run_digital(int index, int64_t positions);
  void fast_partial_sums(int index, const cuda::PartialSumJob* jobs, int count, int64_t positions,
                         bool cycle);
  void check_guards() const;
};

CudaCimBackend::CudaCimBackend(int device, const std::vector<CimLayerSpec>& layers,
                               const CimConfig& config, const CudaBackendOptions& options)
    : impl_(std::make_unique<Impl>()) {
  Impl& im = *impl_;
  im.device = device;
  im.config = config;
  im.options = options;
  im.config.validate();

  const int count = cuda_device_count();
  if (count == 0) throw UserError("--backend cuda: no GPU found: use --backend cpu or auto");
  if (device < 0 || device >= count)
    throw UserError("--device " + std::to_string(device) + ": this machine has " +
                    std::to_string(count) + " GPU(s), numbered from 0");
  const CudaDeviceInfo info = cuda_device_info(device);
  const std::string sm = std::to_string(info.major) + std::to_string(info.minor);
  if (info.major < kCudaMinMajor)
    throw UserError("GPU " + std::to_string(device) + " (" + info.name + ") is sm_" + sm +
                    "; the CUDA backend needs sm_70 or newer: use --backend cpu");
  if (!info.has_kernels)
    throw UserError("this build has no code for GPU " + std::to_string(device) + " (sm_" + sm +
                    "): rebuild with -DCIMSWEEP_CUDA_ARCHITECTURES=" + sm);
  DeviceScope scope(device);

  for (const std::string& name : im.config.digital_layers) {
    const bool known = std::any_of(layers.begin(), layers.end(),
                                   [&](const CimLayerSpec& l) { return l.name == name; });
    if (!known)
      throw UserError("--digital-layers names '" + name +
                      "', which is not a layer of this model: see `cimsweep info MODEL`");
  }
  CIM_CUDA_CHECK(cudaStreamCreateWithFlags(&im.stream, cudaStreamNonBlocking));
  CIM_CUBLAS_CHECK(cublasCreate(&im.cublas));
  CIM_CUBLAS_CHECK(cublasSetStream(im.cublas, im.stream));

  im.device_layers.resize(layers.size());
  for (size_t i = 0; i < layers.size(); ++i) {
    const bool digital = std::find(im.config.digital_layers.begin(), im.config.digital_layers.end(),
                                   layers[i].name) != im.config.digital_layers.end();
    im.layers.push_back(quantise_layer(layers[i], int(i), im.config, digital));
    const QuantisedLayer& layer = im.layers.back();
    DeviceLayer& d = im.device_layers[i];
    d.levels.upload(layer.levels);
    d.mapped_to_logical.upload(layer.mapped_to_logical);
    if (layer.spec.bias) d.bias.upload(layer.spec.bias, size_t(layer.spec.out_channels));
    d.digital_weights.upload(digital_weights(layer, im.config));
    for (int s = 0; s < layer.subarrays(); ++s)
      d.max_width = std::max(d.max_width, layer.subarray_begin[s + 1] - layer.subarray_begin[s]);
  }
  // The uploads ran on the legacy stream, which the backend's non-blocking stream does not wait
  // for.
  CIM_CUDA_CHECK(cudaDeviceSynchronize());
  im.calibration_max.assign(layers.size(), 0.0);
  im.workspace_bytes = options.workspace_bytes;
  if (im.workspace_bytes == 0)
    im.workspace_bytes =
        std::max<size_t>(std::min(kDefaultWorkspaceBytes, info.free_bytes / 4), size_t(64) << 20);
  program_chip(0, 0.0);
}

CudaCimBackend::~CudaCimBackend() = default;

std::string CudaCimBackend::name() const {
  return impl_->fast() ? "cuda-fast" : "cuda";
}
int CudaCimBackend::device() const {
  return impl_->device;
}
const std::vector<QuantisedLayer>& CudaCimBackend::layers() const {
  return impl_->layers;
}

void CudaCimBackend::program_chip(uint32_t trial, double sigma) {
  if (!(sigma >= 0) || !std::isfinite(sigma))
    throw UserError("σ must be a finite number ≥ 0, got " + std::to_string(sigma));
  DeviceScope scope(impl_->device);
  impl_->trial = trial;
  impl_->sigma = sigma;
  for (const QuantisedLayer& layer : impl_->layers)
    if (!layer.digital) impl_->program_layer(layer.index);
  CIM_CUDA_CHECK(cudaStreamSynchronize(impl_->stream));
}

void CudaCimBackend::Impl::program_layer(int index) {
  const QuantisedLayer& layer = layers[index];
  DeviceLayer& d = device_layers[index];
  cimops::ChipParams chip = cimops::make_chip_params(layer, config, sigma, trial);
  chip.levels = d.levels.data();
  chip.mapped_to_logical = d.mapped_to_logical.data();
  const size_t rows_op = size_t(operand_rows(index));
  d.chip.reserve_discard(rows_op * layer.spec.rows(), stream);
  for (int s = 0; s < layer.subarrays(); ++s) {
    const int r0 = layer.subarray_begin[s], width = layer.subarray_begin[s + 1] - r0;
    cuda::program_subarray(chip, r0, width, 0, d.chip.data() + rows_op * r0, stream);
  }
  if (fast()) {
    d.chip_half.reserve_discard(d.chip.size(), stream);
    cuda::floats_to_half(d.chip.data(), int64_t(d.chip.size()), d.chip_half.data(), stream);
  }
}

void CudaCimBackend::set_calibrating(bool on) {
  Impl& im = *impl_;
  if (on) {
    std::fill(im.calibration_max.begin(), im.calibration_max.end(), 0.0);
  } else if (im.calibrating) {
    for (QuantisedLayer& layer : im.layers) layer.adc_full_scale = im.calibration_max[layer.index];
  }
  im.calibrating = on;
}

void CudaCimBackend::set_all_digital(bool on) {
  impl_->all_digital = on;
}
void CudaCimBackend::begin_batch(uint32_t batch_index) {
  impl_->batch_index = batch_index;
}

void CudaCimBackend::run_layer(int index, const float* x, int n, int h, int w, float* y) {
  Impl& im = *impl_;
  DeviceScope scope(im.device);
  const QuantisedLayer& layer = im.layers.at(size_t(index));
  const CimLayerSpec& spec = layer.spec;
  const int out_h = spec.output_size(h, spec.kernel_h), out_w = spec.output_size(w, spec.kernel_w);
  if (out_h < 1 || out_w < 1)
    throw UserError("layer '" + spec.name + "' gets a " + std::to_string(h) + "×" +
                    std::to_string(w) + " input, too small for its kernel: use larger images");
  if (n < 1) return;
  const cimops::LayerGeometry g = cimops::make_geometry(spec, n, h, w);
  if (g.positions > INT_MAX)
    throw UserError(
        "layer '" + spec.name + "' has " + std::to_string(g.positions) +
        " output positions in one batch, more than the CUDA backend takes: lower --batch");
  const size_t in_count = size_t(n) * spec.in_channels * h * w;
  const size_t out_count = size_t(n) * spec.out_channels * out_h * out_w;

  im.x.reserve_discard(in_count, im.stream);
  CIM_CUDA_CHECK(
      cudaMemcpyAsync(im.x.data(), x, in_count * sizeof(float), cudaMemcpyHostToDevice, im.stream));
  im.mapped.reserve_discard(size_t(g.rows) * g.positions, im.stream);
  cuda::quantise_im2col(im.x.data(), g, im.device_layers[index].mapped_to_logical.data(),
                        spec.input_range, im.config.input_bits, im.mapped.data(), im.stream);
  im.acc.reserve_discard(size_t(spec.out_channels) * g.positions, im.stream);
  const bool digital = layer.digital || im.all_digital;
  if (digital)
    im.run_digital(index, g.positions);
  else
    im.run_cim(index, g.positions);

  im.y.reserve_discard(out_count, im.stream);
  const DeviceLayer& d = im.device_layers[index];
  cuda::scale_output(im.acc.data(), digital ? nullptr : im.common.data(), n, spec.out_channels,
                     int64_t(out_h) * out_w, layer.output_scale,
                     d.bias.empty() ? nullptr : d.bias.data(), im.y.data(), im.stream);
  CIM_CUDA_CHECK(cudaMemcpyAsync(y, im.y.data(), out_count * sizeof(float), cudaMemcpyDeviceToHost,
                                 im.stream));
  CIM_CUDA_CHECK(cudaStreamSynchronize(im.stream));
  if (im.options.check_each_layer) im.check_guards();
}

// The quantised digital layer: Σ (2D − (2^wb − 1))·A as a double GEMM, exact in any order.
void CudaCimBackend::Impl::run_digital(int index, int64_t positions) {
  const QuantisedLayer& layer = layers[index];
  const int rows = layer.spec.rows(), outs = layer.spec.out_channels;
  const int64_t chunk = std::max<int64_t>(
      1, std::min<int64_t>(positions, int64_t(kDigitalChunkBytes / sizeof(double)) / rows));
  digital_inputs.reserve_discard(size_t(rows) * chunk, stream);
  const double one = 1.0, zero = 0.0;
  for (int64_t q0 = 0; q0 < positions; q0 += chunk) {
    const int64_t cols = std::min(chunk, positions - q0);
    cuda::levels_to_double(mapped.data(), rows, positions, q0, cols, digital_inputs.data(), stream);
    // Row-major acc[o][q] = W[o][r]·X[r][q] is column-major accᵀ = Xᵀ·Wᵀ.
    CIM_CUBLAS_CHECK(cublasDgemm(cublas, CUBLAS_OP_N, CUBLAS_OP_N, int(cols), outs, rows, &one,
                                 digital_inputs.data(), int(cols),
                                 device_layers[index].digital_weights.data(), rows, &zero,
                                 acc.data() + q0, int(positions)));
  }
}

void CudaCimBackend::Impl::run_cim(int index, int64_t positions) {
  const QuantisedLayer& layer = layers[index];
  DeviceLayer& d = device_layers[index];
  const cimops::ReadParams p =
      cimops::make_read_params(layer, config, sigma, calibrating, positions);
  if (p.adc == AdcMode::kCalibrated && !(layer.adc_full_scale > 0))
    throw UserError("ADC 'calibrated' needs a calibration run first (internal: layer '" +
                    layer.spec.name + "' has no range)");
  const bool cycle = config.chip(sigma, trial, index).redrawn_per_read();
  const bool dynamic = p.adc == AdcMode::kDynamic;
  const bool track_largest = calibrating && p.ideal_clean;
  const int rows_op = p.operand_rows(), input_bits = config.input_bits;
  const int reads = layer.subarrays() * input_bits;
  const size_t slot = size_t(rows_op) * d.max_width;  // one read's operand in mode `cycle`

  // How many reads keep their partial sums on the device at once.
  size_t per_read = size_t(rows_op) * positions * sizeof(float);
  if (fast()) per_read += size_t(d.max_width) * positions * sizeof(uint16_t);
  if (cycle) per_read += slot * (sizeof(float) + (fast() ? sizeof(uint16_t) : 0));
  const int group =
      int(std::max<size_t>(1, std::min<size_t>({workspace_bytes / per_read,
                                                size_t(cuda::kMaxReadsPerLaunch), size_t(reads)})));

  partials.reserve_discard(size_t(group) * rows_op * positions, stream);
  if (dynamic) {
    ranges.reserve_discard(size_t(group) * p.slices, stream);
    range_keys.reserve_discard(size_t(group) * (p.slices + p.ref_rows) * 2, stream);
  }
  if (cycle) cycle_operands.reserve_discard(size_t(group) * slot, stream);
  if (cycle && fast()) cycle_half.reserve_discard(size_t(group) * slot, stream);
  if (fast()) planes.reserve_discard(size_t(group) * d.max_width * positions, stream);
  if (track_largest) {
    largest.reserve_discard(1, stream);
    CIM_CUDA_CHECK(cudaMemsetAsync(largest.data(), 0, sizeof(uint64_t), stream));
  }
  common.reserve_discard(size_t(positions), stream);
  CIM_CUDA_CHECK(cudaMemsetAsync(acc.data(), 0, acc.size() * sizeof(double), stream));
  CIM_CUDA_CHECK(cudaMemsetAsync(common.data(), 0, size_t(positions) * sizeof(double), stream));

  cimops::ChipParams chip = cimops::make_chip_params(layer, config, sigma, trial);
  chip.levels = d.levels.data();
  chip.mapped_to_logical = d.mapped_to_logical.data();
  std::vector<cuda::PartialSumJob> jobs(group);
  std::vector<cuda::AccumulateRead> accumulate(group);
  for (int first = 0; first < reads; first += group) {
    const int count = std::min(group, reads - first);
    for (int j = 0; j < count; ++j) {
      const int read = first + j, s = read / input_bits, bit = read % input_bits;
      const int r0 = layer.subarray_begin[s], width = layer.subarray_begin[s + 1] - r0;
      float* operand = d.chip.data() + size_t(rows_op) * r0;
      if (cycle) {
        operand = cycle_operands.data() + j * slot;
        cuda::program_subarray(chip, r0, width,
                               cim::ChipModel::cycle_read(batch_index, input_bits, bit), operand,
                               stream);
      }
      jobs[j] = cuda::PartialSumJob{operand, r0, width, bit,
                                    partials.data() + size_t(j) * rows_op * positions};
      accumulate[j] = cuda::AccumulateRead{bit, width};
    }
    if (fast())
      fast_partial_sums(index, jobs.data(), count, positions, cycle);
    else
      cuda::partial_sums(jobs.data(), count, rows_op, mapped.data(), layer.spec.rows(), positions,
                         stream);
    if (dynamic)
      cuda::adc_ranges(p, partials.data(), count, range_keys.data(), ranges.data(), stream);
    cuda::adc_accumulate(p, partials.data(), accumulate.data(), count,
                         dynamic ? ranges.data() : nullptr, acc.data(), common.data(),
                         track_largest ? largest.data() : nullptr, stream);
  }
  if (track_largest) {
    uint64_t key = 0;
    CIM_CUDA_CHECK(
        cudaMemcpyAsync(&key, largest.data(), sizeof key, cudaMemcpyDeviceToHost, stream));
    CIM_CUDA_CHECK(cudaStreamSynchronize(stream));
    calibration_max[index] = std::max(calibration_max[index], cimops::from_order_key(key));
  }
}

// Fast mode: the partial sums of a group of reads as cuBLAS fp16 GEMMs with fp32 accumulation,
// one strided-batched call per run of reads on the same sub-array (one read per input bit).
void CudaCimBackend::Impl::fast_partial_sums(int index, const cuda::PartialSumJob* jobs, int count,
                                             int64_t positions, bool cycle) {
  DeviceLayer& d = device_layers[index];
  const int rows_op = operand_rows(index);
  const size_t slot = size_t(rows_op) * d.max_width;
  const int64_t plane_stride = int64_t(d.max_width) * positions;
  if (cycle)
    cuda::floats_to_half(cycle_operands.data(), int64_t(count * slot), cycle_half.data(), stream);
  const float one = 1.0f, zero = 0.0f;
  for (int j0 = 0; j0 < count;) {
    int j1 = j0 + 1;
    while (j1 < count && jobs[j1].r0 == jobs[j0].r0 && jobs[j1].bit == jobs[j1 - 1].bit + 1) ++j1;
    const cuda::PartialSumJob& job = jobs[j0];
    uint16_t* a = planes.data() + j0 * plane_stride;
    cuda::bit_planes_half(mapped.data(), positions, job.r0, job.width, job.bit, j1 - j0,
                          plane_stride, a, stream);
    const uint16_t* b =
        cycle ? cycle_half.data() + j0 * slot : d.chip_half.data() + size_t(rows_op) * job.r0;
    const long long stride_b = cycle ? (long long)slot : 0;
    // Row-major P[row][q] = Σ_k operand[row][k]·plane[k][q] is column-major Pᵀ = planeᵀ·operandᵀ.
    CIM_CUBLAS_CHECK(cublasGemmStridedBatchedEx(
        cublas, CUBLAS_OP_N, CUBLAS_OP_N, int(positions), rows_op, job.width, &one, a, CUDA_R_16F,
        int(positions), plane_stride, b, CUDA_R_16F, job.width, stride_b, &zero, job.partials,
        CUDA_R_32F, int(positions), (long long)rows_op * positions, j1 - j0, CUBLAS_COMPUTE_32F,
        CUBLAS_GEMM_DEFAULT));
    j0 = j1;
  }
}

std::vector<float> CudaCimBackend::programmed_subarray(int index, int s) const {
  const Impl& im = *impl_;
  DeviceScope scope(im.device);
  const QuantisedLayer& layer = im.layers.at(size_t(index));
  if (layer.digital) throw std::out_of_range("layer " + std::to_string(index) + " is digital");
  if (s < 0 || s >= layer.subarrays()) throw std::out_of_range("no such sub-array");
  const int rows_op = im.operand_rows(index);
  const int r0 = layer.subarray_begin[s], width = layer.subarray_begin[s + 1] - r0;
  std::vector<float> operand(size_t(rows_op) * width);
  CIM_CUDA_CHECK(cudaStreamSynchronize(im.stream));
  CIM_CUDA_CHECK(cudaMemcpy(operand.data(),
                            im.device_layers[index].chip.data() + size_t(rows_op) * r0,
                            operand.size() * sizeof(float), cudaMemcpyDeviceToHost));
  return operand;
}

void CudaCimBackend::check_guards() const {
  DeviceScope scope(impl_->device);
  impl_->check_guards();
}

void CudaCimBackend::Impl::check_guards() const {
  CIM_CUDA_CHECK(cudaStreamSynchronize(stream));
  for (const DeviceLayer& d : device_layers) {
    d.levels.check_guard();
    d.mapped_to_logical.check_guard();
    d.bias.check_guard();
    d.digital_weights.check_guard();
    d.chip.check_guard();
    d.chip_half.check_guard();
  }
  x.check_guard();
  y.check_guard();
  mapped.check_guard();
  acc.check_guard();
  common.check_guard();
  digital_inputs.check_guard();
  partials.check_guard();
  cycle_operands.check_guard();
  cycle_half.check_guard();
  planes.check_guard();
  range_keys.check_guard();
  largest.check_guard();
  ranges.check_guard();
}

std::unique_ptr<CimBackend> make_cuda_backend(int device, const std::vector<CimLayerSpec>& layers,
                                              const CimConfig& config,
                                              const CudaBackendOptions& options) {
  return std::make_unique<CudaCimBackend>(device, layers, config, options);
}

}  // namespace cimsweep
