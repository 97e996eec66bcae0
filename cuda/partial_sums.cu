#include "cuda/partial_sums.cuh"

#include <stdexcept>

#include "cuda/cim_ops.h"
#include "cuda/cuda_check.h"

namespace cimsweep::cuda {
namespace {

constexpr int kTileRows = 64, kTilePositions = 64, kTileK = 32;
constexpr int kThreadsX = 16, kThreadsY = 16, kPerThread = 4;  // 16·4 = 64 both ways
static_assert(kThreadsX * kPerThread == kTilePositions && kThreadsY * kPerThread == kTileRows);
static_assert(kTileK % cim::kLookupRows == 0, "a k tile holds whole groups of the look-up order");

struct JobBatch {
  PartialSumJob jobs[kMaxReadsPerLaunch];
};

// Block (x, y, z) computes the 64 × 64 tile of P at positions 64x…, rows 64y…, of read z. Each
// thread owns 4 × 4 outputs, strided by 16 so that a warp stores 16 consecutive positions. The
// k loop keeps the order of cim::lookup_order_sum, the CPU backend's table reads: each group of
// kLookupRows rows (k = 4g … 4g + 3 of the sub-array; tiles start at multiples of 4) is summed in
// ascending order from 0, and the groups are added to the partial sum in ascending order (the sum
// starts at +0, and +0 + group 0 is group 0: a group's sum is never −0). Entries past the sub-array
// are zero, and adding 0·0 leaves a group's or a partial sum unchanged, so the padding does not
// alter any rounding.
__global__ void __launch_bounds__(kThreadsX* kThreadsY)
    partial_sums_kernel(JobBatch batch, int operand_rows, const uint16_t* __restrict__ mapped,
                        int64_t positions) {
  const PartialSumJob job = batch.jobs[blockIdx.z];
  __shared__ float a_tile[kTileRows][kTileK + 1];
  __shared__ float b_tile[kTileK][kTilePositions];
  const int tx = threadIdx.x, ty = threadIdx.y, tid = ty * kThreadsX + tx;
  const int row0 = blockIdx.y * kTileRows;
  const int64_t q0 = int64_t(blockIdx.x) * kTilePositions;

  float acc[kPerThread][kPerThread];
  for (int i = 0; i < kPerThread; ++i)
    for (int j = 0; j < kPerThread; ++j) acc[i][j] = 0.0f;

  for (int k0 = 0; k0 < job.width; k0 += kTileK) {
    for (int e = tid; e < kTileRows * kTileK; e += kThreadsX * kThreadsY) {
      const int rr = e / kTileK, kk = e % kTileK;
      const int row = row0 + rr, k = k0 + kk;
      a_tile[rr][kk] =
          (row < operand_rows && k < job.width) ? job.operand[int64_t(row) * job.width + k] : 0.0f;
    }
    for (int e = tid; e < kTileK * kTilePositions; e += kThreadsX * kThreadsY) {
      const int kk = e / kTilePositions, qq = e % kTilePositions;
      const int k = k0 + kk;
      const int64_t q = q0 + qq;
      b_tile[kk][qq] = (k < job.width && q < positions)
                           ? float((mapped[int64_t(job.r0 + k) * positions + q] >> job.bit) & 1)
                           : 0.0f;
    }
    __syncthreads();
    for (int g0 = 0; g0 < kTileK && k0 + g0 < job.width; g0 += cim::kLookupRows) {
      float group[kPerThread][kPerThread];
      for (int i = 0; i < kPerThread; ++i)
        for (int j = 0; j < kPerThread; ++j) group[i][j] = 0.0f;
#pragma unroll
      for (int kk = g0; kk < g0 + cim::kLookupRows; ++kk) {
        float a[kPerThread], b[kPerThread];
        for (int i = 0; i < kPerThread; ++i) a[i] = a_tile[ty + kThreadsY * i][kk];
        for (int j = 0; j < kPerThread; ++j) b[j] = b_tile[kk][tx + kThreadsX * j];
        for (int i = 0; i < kPerThread; ++i)
          for (int j = 0; j < kPerThread; ++j)
            group[i][j] = cimops::add_bit_product(group[i][j], a[i], b[j]);
      }
      for (int i = 0; i < kPerThread; ++i)
        for (int j = 0; j < kPerThread; ++j) acc[i][j] = acc[i][j] + group[i][j];
    }
    __syncthreads();
  }
  for (int i = 0; i < kPerThread; ++i) {
    const int row = row0 + ty + kThreadsY * i;
    if (row >= operand_rows) continue;
    for (int j = 0; j < kPerThread; ++j) {
      const int64_t q = q0 + tx + kThreadsX * j;
      if (q < positions) job.partials[int64_t(row) * positions + q] = acc[i][j];
    }
  }
}

void launch_partial_sums(const PartialSumJob* jobs, int count, int operand_rows,
                         const uint16_t* mapped, int64_t positions, cudaStream_t stream) {
  JobBatch batch{};
  for (int i = 0; i < count; ++i) batch.jobs[i] = jobs[i];
  const dim3 grid(unsigned((positions + kTilePositions - 1) / kTilePositions),
                  unsigned((operand_rows + kTileRows - 1) / kTileRows), unsigned(count));
  const dim3 block(kThreadsX, kThreadsY);
  partial_sums_kernel<<<grid, block, 0, stream>>>(batch, operand_rows, mapped, positions);
  CIM_CUDA_CHECK_LAUNCH();
}

}  // namespace

void partial_sums(const PartialSumJob* jobs, int count, int operand_rows, const uint16_t* mapped,
                  int rows, int64_t positions, cudaStream_t stream) {
  if (count < 1 || count > kMaxReadsPerLaunch)
    throw std::invalid_argument("partial_sums: 1 to kMaxReadsPerLaunch reads per launch");
  if (!mapped || operand_rows < 1 || operand_rows > 65535 * kTileRows || positions < 1 ||
      (positions + kTilePositions - 1) / kTilePositions > 0x7fffffff)
    throw std::invalid_argument("partial_sums: bad operand rows, positions or input");
  for (int i = 0; i < count; ++i) {
    const PartialSumJob& j = jobs[i];
    if (!j.operand || !j.partials || j.width < 1 || j.r0 < 0 || j.r0 + j.width > rows ||
        j.bit < 0 || j.bit > 15)
      throw std::invalid_argument("partial_sums: read " + std::to_string(i) +
                                  " has a null pointer, rows outside the layer or a bad bit");
  }
  launch_partial_sums(jobs, count, operand_rows, mapped, positions, stream);
}

}  // namespace cimsweep::cuda
