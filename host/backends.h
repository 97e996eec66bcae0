// Which backend runs the CIM layers, and building it: the CPU reference or the CUDA backend.
#pragma once
#include <memory>
#include <string>
#include <vector>

#include "host/backend.h"
#include "host/cim_config.h"

namespace cimsweep {

struct BackendChoice {
  enum class Kind { kCpu, kCuda };
  Kind kind = Kind::kCpu;
  int device = 0;  // GPU ordinal for kCuda; for kCpu only a worker label
};

// Builds the backend for the layers of one network. kCuda in a build without CUDA: UserError.
std::unique_ptr<CimBackend> make_backend(const BackendChoice& choice,
                                         const std::vector<CimLayerSpec>& layers,
                                         const CimConfig& config);

}  // namespace cimsweep
