// Which backend runs the CIM layers, and building it: the CPU reference or the CUDA backend.
#pragma once
#include <memory>
#include <string>
#include <vector>

#include "common/cim_backend.h"
#include "common/cim_config.h"

namespace cimsweep {

struct BackendChoice {
  enum class Kind { kCpu, kCuda };
  Kind kind = Kind::kCpu;
  int device = 0;  // GPU ordinal for kCuda; for kCpu only a worker label
  // kCuda: exact (fp32, agrees with the CPU backend to ~1e-5) or fast (fp16 tensor cores).
  enum class Precision { kExact, kFast };
  Precision precision = Precision::kExact;
};

// What the machine offers for GPU `device`: filled by survey_gpu(), or by hand in tests.
struct GpuSurvey {
  bool built_with_cuda = false;
  std::string unusable_reason;  // why the GPU cannot run the CUDA backend; "" when it can
  std::string description;      // the usable GPU, e.g. "NVIDIA H100 80GB HBM3 (sm_90, 79.1 GiB free)"
};
GpuSurvey survey_gpu(int device);

// The outcome of --backend auto|cpu|cuda: the choice, and the reason for the one-line notice
// (kCuda: the GPU's description; kCpu: why not the GPU, e.g. "no GPU found", or "requested").
struct BackendResolution {
  BackendChoice choice;
  std::string reason;
};
// auto: the GPU when the survey says it is usable, else the CPU; cuda: the GPU or a UserError
// saying why not; cpu: the CPU. UserError on any other name. No GPU query (pure).
BackendResolution decide_backend(const std::string& requested, int device,
                                 const GpuSurvey& survey);
// decide_backend with survey_gpu(device) (not queried for `cpu`).
BackendResolution resolve_backend(const std::string& requested, int device = 0);
// exact | fast (--precision); UserError otherwise.
BackendChoice::Precision parse_precision(const std::string& text);

// Builds the backend for the layers of one network. kCuda in a build without CUDA: UserError.
std::unique_ptr<CimBackend> make_backend(const BackendChoice& choice,
                                         const std::vector<CimLayerSpec>& layers,
                                         const CimConfig& config);

}  // namespace cimsweep
