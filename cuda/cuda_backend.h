// The CUDA backend of the CIM simulator: the same chip and the same numerics as CpuCimBackend
// (cim-model.md), on one GPU. Plain C++: host code includes this without any CUDA header.
//
// Per layer and batch: the input is copied to the GPU, quantised and im2col'ed; every read
// (sub-array × input bit) gets its partial sums (exact mode: a tiled fp32 kernel summing in a
// fixed order; fast mode: cuBLAS fp16 tensor-core GEMMs), the dynamic ADC's ranges over the batch
// (a reduction pass), then one kernel applies the ADC and the shift-and-add recombination in
// double; the result is scaled and copied back. Per trial the chip's conductances, with the
// Philox noise of (seed, trial, layer, cell), are programmed on the GPU (mode `cycle`: per read).
// The input and output of every layer cross PCIe (the network runs its digital parts on the host):
// a device-resident network is a later optimisation.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "common/cim_backend.h"
#include "common/cim_config.h"
#include "common/layer_plan.h"

namespace cimsweep {

enum class CudaPrecision {
  kExact,  // fp32 partial sums in the CPU's per-read structure: logits agree to ~1e-5 relative
  kFast,   // fp16 tensor cores, fp32 accumulation: exact at σ = 0, conductances rounded to fp16
};
std::string to_string(CudaPrecision precision);  // exact | fast

struct CudaBackendOptions {
  CudaPrecision precision = CudaPrecision::kExact;
  // Device memory for the partial sums of the reads in flight; 0: min(2 GiB, ¼ of free memory).
  size_t workspace_bytes = 0;
  // Synchronise and verify the guard bytes of every device buffer after each layer (tests).
  bool check_each_layer = false;
};

class CudaCimBackend : public CimBackend {
 public:
  // Throws UserError when GPU `device` does not exist or cannot run this build's kernels.
  CudaCimBackend(int device, const std::vector<CimLayerSpec>& layers, const CimConfig& config,
                 const CudaBackendOptions& options = {});
  ~CudaCimBackend() override;
  CudaCimBackend(const CudaCimBackend&) = delete;
  CudaCimBackend& operator=(const CudaCimBackend&) = delete;

  std::string name() const override;  // "cuda" or "cuda-fast"
  void program_chip(uint32_t trial, double sigma) override;
  void set_calibrating(bool on) override;
  void set_all_digital(bool on) override;
  void begin_batch(uint32_t batch_index) override;
  void run_layer(int index, const float* x, int n, int h, int w, float* y) override;

  int device() const;
  const std::vector<QuantisedLayer>& layers() const;
  // Sub-array `s` of layer `index` as programmed now, copied back (the layout of
  // CpuCimBackend::programmed_subarray).
  std::vector<float> programmed_subarray(int index, int s) const;
  // Throws std::logic_error when a kernel wrote past the end of any device buffer.
  void check_guards() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// The integration point of host/backends.cpp.
std::unique_ptr<CimBackend> make_cuda_backend(int device, const std::vector<CimLayerSpec>& layers,
                                              const CimConfig& config,
                                              const CudaBackendOptions& options = {});

}  // namespace cimsweep
