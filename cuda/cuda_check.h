// Error checks and device buffers for the CUDA backend's own sources (never included by host/).
// A failing CUDA call throws std::runtime_error naming the call, file and line; running out of
// device memory is a UserError that says how to ask for less.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "common/errors.h"

namespace cimsweep::cuda {

[[noreturn]] inline void throw_cuda_error(cudaError_t error, const char* call, const char* file,
                                          int line) {
  throw std::runtime_error(std::string("CUDA error ") + cudaGetErrorName(error) + " (" +
                           cudaGetErrorString(error) + ") in " + call + " at " + file + ":" +
                           std::to_string(line));
}

}  // namespace cimsweep::cuda

#define CIM_CUDA_CHECK(call)                                                     \
  do {                                                                           \
    const cudaError_t cim_error_ = (call);                                       \
    if (cim_error_ != cudaSuccess)                                               \
      ::cimsweep::cuda::throw_cuda_error(cim_error_, #call, __FILE__, __LINE__); \
  } while (0)

// After a kernel launch: a bad configuration is reported here, a fault at the next sync.
#define CIM_CUDA_CHECK_LAUNCH() CIM_CUDA_CHECK(cudaGetLastError())

namespace cimsweep::cuda {

// Makes `device` current for the calling thread: every public entry of the backend starts with
// it, since sweep workers may call one backend from different threads.
class DeviceScope {
 public:
  explicit DeviceScope(int device) { CIM_CUDA_CHECK(cudaSetDevice(device)); }
};

// A device array that only grows, followed by guard bytes of a known pattern: check_guard()
// catches a kernel that wrote past the end (the tests and --check mode call it after each layer).
template <class T>
class DeviceBuffer {
 public:
  static constexpr size_t kGuardBytes = 256;
  static constexpr unsigned char kGuardByte = 0xA5;

  explicit DeviceBuffer(const char* name = "buffer") : name_(name) {}
  ~DeviceBuffer() { release(); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  DeviceBuffer(DeviceBuffer&& other) noexcept { *this = std::move(other); }
  DeviceBuffer& operator=(DeviceBuffer&& other) noexcept {
    if (this != &other) {
      release();
      data_ = std::exchange(other.data_, nullptr);
      count_ = std::exchange(other.count_, 0);
      capacity_ = std::exchange(other.capacity_, 0);
      guard_offset_ = std::exchange(other.guard_offset_, 0);
      name_ = other.name_;
    }
    return *this;
  }

  // Makes room for `count` elements (contents lost when it has to grow) and moves the guard bytes
  // to just past them, so that a write past the logical end is caught too.
  void reserve_discard(size_t count, cudaStream_t stream = nullptr) {
    if (count > capacity_ || !data_) {
      release();
      const size_t bytes = count * sizeof(T) + kGuardBytes;
      void* ptr = nullptr;
      const cudaError_t error = cudaMalloc(&ptr, bytes);
      if (error == cudaErrorMemoryAllocation) {
        cudaGetLastError();
        throw UserError("the GPU is out of memory for the " + std::string(name_) + " (" +
                        std::to_string(bytes >> 20) +
                        " MiB): lower --batch, or free the GPU of other jobs");
      }
      CIM_CUDA_CHECK(error);
      data_ = static_cast<T*>(ptr);
      capacity_ = count;
      guard_offset_ = ~size_t{0};
    }
    count_ = count;
    if (guard_offset_ != count * sizeof(T)) {
      guard_offset_ = count * sizeof(T);
      CIM_CUDA_CHECK(cudaMemsetAsync(reinterpret_cast<unsigned char*>(data_) + guard_offset_,
                                     kGuardByte, kGuardBytes, stream));
    }
  }
  void upload(const T* host, size_t count) {
    reserve_discard(count);
    if (count) CIM_CUDA_CHECK(cudaMemcpy(data_, host, count * sizeof(T), cudaMemcpyHostToDevice));
  }
  void upload(const std::vector<T>& host) { upload(host.data(), host.size()); }
  std::vector<T> download(size_t count) const {
    std::vector<T> host(count);
    if (count)
      CIM_CUDA_CHECK(cudaMemcpy(host.data(), data_, count * sizeof(T), cudaMemcpyDeviceToHost));
    return host;
  }
  // Throws std::logic_error when a kernel overwrote the guard bytes past the allocation.
  void check_guard() const {
    if (!data_) return;
    CIM_CUDA_CHECK(cudaDeviceSynchronize());
    unsigned char guard[kGuardBytes];
    CIM_CUDA_CHECK(cudaMemcpy(guard, reinterpret_cast<const unsigned char*>(data_) + guard_offset_,
                              kGuardBytes, cudaMemcpyDeviceToHost));
    for (size_t i = 0; i < kGuardBytes; ++i)
      if (guard[i] != kGuardByte)
        throw std::logic_error("CUDA backend: a kernel wrote past the end of the device " +
                               std::string(name_) + " (guard byte " + std::to_string(i) + ")");
  }

  T* data() { return data_; }
  const T* data() const { return data_; }
  size_t size() const { return count_; }
  bool empty() const { return data_ == nullptr; }

 private:
  void release() {
    if (data_) cudaFree(data_);
    data_ = nullptr;
    capacity_ = count_ = 0;
  }
  T* data_ = nullptr;
  size_t count_ = 0, capacity_ = 0, guard_offset_ = 0;
  const char* name_ = "buffer";
};

// Grid size for a grid-stride loop over `count` items.
inline unsigned grid_for(int64_t count, int block) {
  const int64_t blocks = (count + block - 1) / block;
  return unsigned(blocks < 1 ? 1 : (blocks > (int64_t(1) << 20) ? (int64_t(1) << 20) : blocks));
}

}  // namespace cimsweep::cuda
