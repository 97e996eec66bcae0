#include "cuda/adc_ranges.cuh"

#include <cub/block/block_reduce.cuh>
#include <limits>
#include <stdexcept>

#include "cuda/cuda_check.h"

namespace cimsweep::cuda {
namespace {

constexpr int kBlock = 256;

// Reduction operators for cub::BlockReduce (CCCL 3 dropped cub::Min and cub::Max).
struct MinOp {
  __device__ double operator()(double a, double b) const { return b < a ? b : a; }
};
struct MaxOp {
  __device__ double operator()(double a, double b) const { return b > a ? b : a; }
};

__global__ void init_keys_kernel(uint64_t* keys, int slots) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= slots) return;
  const double inf = __longlong_as_double(0x7ff0000000000000LL);
  keys[2 * i] = cimops::order_key(inf);       // running min
  keys[2 * i + 1] = cimops::order_key(-inf);  // running max
}

// Block (x, y, z): a stretch of positions of operand row y of read z. Each thread folds its
// positions, the block reduces with CUB, one thread merges into the slot with integer atomics.
__global__ void __launch_bounds__(kBlock)
    adc_ranges_kernel(cimops::ReadParams p, const float* __restrict__ partials, uint64_t* keys) {
  using Reduce = cub::BlockReduce<double, kBlock>;
  __shared__ typename Reduce::TempStorage storage;
  const int row = blockIdx.y, read = blockIdx.z;
  const int rows = p.operand_rows(), slots = p.slices + p.ref_rows;
  const float* P = partials + int64_t(read) * rows * p.positions;
  const double inf = __longlong_as_double(0x7ff0000000000000LL);
  double lo = inf, hi = -inf;
  for (int64_t q = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; q < p.positions;
       q += int64_t(gridDim.x) * blockDim.x) {
    const double v = cimops::range_value(p, P, row, q);
    lo = v < lo ? v : lo;
    hi = v > hi ? v : hi;
  }
  const double block_lo = Reduce(storage).Reduce(lo, MinOp());
  __syncthreads();  // the temp storage is reused
  const double block_hi = Reduce(storage).Reduce(hi, MaxOp());
  if (threadIdx.x == 0) {
    uint64_t* slot = keys + 2 * (int64_t(read) * slots + cimops::range_slot(p, row));
    atomicMin(reinterpret_cast<unsigned long long*>(slot), cimops::order_key(block_lo));
    atomicMax(reinterpret_cast<unsigned long long*>(slot + 1), cimops::order_key(block_hi));
  }
}

__global__ void decode_ranges_kernel(cimops::ReadParams p, int reads, const uint64_t* keys,
                                     cimops::SliceRange* ranges) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= reads * p.slices) return;
  const int read = i / p.slices, m = i % p.slices;
  const int slots = p.slices + p.ref_rows;
  const uint64_t* k = keys + 2 * int64_t(read) * slots;
  const int ref = p.slices + (p.ref_rows == 1 ? 0 : m);
  ranges[i] = cimops::SliceRange{
      cimops::from_order_key(k[2 * m]), cimops::from_order_key(k[2 * m + 1]),
      cimops::from_order_key(k[2 * ref]), cimops::from_order_key(k[2 * ref + 1])};
}

void launch_adc_ranges(const cimops::ReadParams& p, const float* partials, int reads,
                       uint64_t* keys, cimops::SliceRange* ranges, cudaStream_t stream) {
  const int slots = reads * (p.slices + p.ref_rows);
  init_keys_kernel<<<(slots + 255) / 256, 256, 0, stream>>>(keys, slots);
  CIM_CUDA_CHECK_LAUNCH();
  // Enough blocks per row to fill the GPU, few enough to keep the atomics rare.
  const int64_t stretches = (p.positions + int64_t(kBlock) * 8 - 1) / (int64_t(kBlock) * 8);
  const unsigned x = unsigned(stretches < 1 ? 1 : (stretches > 256 ? 256 : stretches));
  adc_ranges_kernel<<<dim3(x, unsigned(p.operand_rows()), unsigned(reads)), kBlock, 0, stream>>>(
      p, partials, keys);
  CIM_CUDA_CHECK_LAUNCH();
  const int count = reads * p.slices;
  decode_ranges_kernel<<<(count + 255) / 256, 256, 0, stream>>>(p, reads, keys, ranges);
  CIM_CUDA_CHECK_LAUNCH();
}

}  // namespace

void adc_ranges(const cimops::ReadParams& p, const float* partials, int reads, uint64_t* keys,
                cimops::SliceRange* ranges, cudaStream_t stream) {
  if (!partials || !keys || !ranges) throw std::invalid_argument("adc_ranges: null device pointer");
  if (reads < 1 || reads > 65535 || p.positions < 1 || p.operand_rows() > 65535 || p.slices < 1 ||
      (p.ref_rows != 1 && p.ref_rows != p.slices))
    throw std::invalid_argument("adc_ranges: bad read count, positions or operand shape");
  launch_adc_ranges(p, partials, reads, keys, ranges, stream);
}

}  // namespace cimsweep::cuda
