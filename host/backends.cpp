#include "host/backends.h"

#include "host/cim_cpu.h"
#include "host/errors.h"

namespace cimsweep {

std::unique_ptr<CimBackend> make_backend(const BackendChoice& choice,
                                         const std::vector<CimLayerSpec>& layers,
                                         const CimConfig& config) {
  if (choice.kind == BackendChoice::Kind::kCuda)
    throw UserError("the CUDA backend is not in this version: use --backend cpu");
  return std::make_unique<CpuCimBackend>(layers, config);
}

}  // namespace cimsweep
