#include "cuda/adc_accumulate.cuh"

#include <cub/block/block_reduce.cuh>
#include <stdexcept>

#include "cuda/cuda_check.h"

namespace cimsweep::cuda {
namespace {

constexpr int kBlock = 256;

// Reduction operators for cub::BlockReduce (CCCL 3 dropped cub::Min and cub::Max).
struct MaxOp {
  __device__ double operator()(double a, double b) const { return b > a ? b : a; }
};

struct ReadBatch {
  AccumulateRead reads[kMaxReadsPerLaunch];
};

// One thread per accumulator: (o, q) of the codes' part for i < outs·positions, positions fastest
// (the partial sums of a warp are contiguous in every read), then one per position q of the
// common part. Each adds the group's reads in order.
__global__ void __launch_bounds__(kBlock)
    adc_accumulate_kernel(cimops::ReadParams p, const float* __restrict__ partials, ReadBatch batch,
                          int count, const cimops::SliceRange* __restrict__ ranges,
                          double* __restrict__ codes, double* __restrict__ common,
                          uint64_t* largest_key) {
  const int64_t code_count = int64_t(p.outs) * p.positions, total = code_count + p.positions;
  const int64_t read_stride = int64_t(p.operand_rows()) * p.positions;
  double largest = 0;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    if (i < code_count) {
      const int o = int(i / p.positions);
      const int64_t q = i % p.positions;
      double sum = codes[i];
      for (int read = 0; read < count; ++read)
        sum = cimops::accumulate_codes(
            p, partials + read * read_stride, ranges ? ranges + int64_t(read) * p.slices : nullptr,
            batch.reads[read].subarray_rows, batch.reads[read].bit, o, q, sum, &largest);
      codes[i] = sum;
    } else {
      const int64_t q = i - code_count;
      double sum = common[q];
      for (int read = 0; read < count; ++read)
        sum = cimops::accumulate_common(
            p, partials + read * read_stride, ranges ? ranges + int64_t(read) * p.slices : nullptr,
            batch.reads[read].subarray_rows, batch.reads[read].bit, q, sum);
      common[q] = sum;
    }
  }
  if (largest_key) {  // uniform over the launch: every thread takes part in the reduction
    using Reduce = cub::BlockReduce<double, kBlock>;
    __shared__ typename Reduce::TempStorage storage;
    const double block_largest = Reduce(storage).Reduce(largest, MaxOp());
    if (threadIdx.x == 0)
      atomicMax(reinterpret_cast<unsigned long long*>(largest_key),
                cimops::order_key(block_largest));
  }
}

void launch_adc_accumulate(const cimops::ReadParams& p, const float* partials,
                           const AccumulateRead* reads, int count, const cimops::SliceRange* ranges,
                           double* codes, double* common, uint64_t* largest_key,
                           cudaStream_t stream) {
  ReadBatch batch{};
  for (int i = 0; i < count; ++i) batch.reads[i] = reads[i];
  adc_accumulate_kernel<<<grid_for(int64_t(p.outs + 1) * p.positions, kBlock), kBlock, 0, stream>>>(
      p, partials, batch, count, ranges, codes, common, largest_key);
  CIM_CUDA_CHECK_LAUNCH();
}

}  // namespace

void adc_accumulate(const cimops::ReadParams& p, const float* partials, const AccumulateRead* reads,
                    int count, const cimops::SliceRange* ranges, double* codes, double* common,
                    uint64_t* largest_key, cudaStream_t stream) {
  if (!partials || !codes || !common)
    throw std::invalid_argument("adc_accumulate: null device pointer");
  if (count < 1 || count > kMaxReadsPerLaunch || p.positions < 1 || p.outs < 1 || p.slices < 1)
    throw std::invalid_argument("adc_accumulate: bad read count or shape");
  if (p.adc == cimops::AdcMode::kDynamic && !p.ideal_clean && !ranges)
    throw std::invalid_argument("adc_accumulate: ADC dynamic needs the ranges of its reads");
  if (p.adc == cimops::AdcMode::kCalibrated && !(p.calibrated_full_scale > 0))
    throw std::invalid_argument("adc_accumulate: ADC calibrated without a measured range");
  for (int i = 0; i < count; ++i)
    if (reads[i].bit < 0 || reads[i].bit > 15 || reads[i].subarray_rows < 1)
      throw std::invalid_argument("adc_accumulate: read " + std::to_string(i) +
                                  " has a bad bit or sub-array size");
  launch_adc_accumulate(p, partials, reads, count, ranges, codes, common, largest_key, stream);
}

}  // namespace cimsweep::cuda
