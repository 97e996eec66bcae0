#include "host/backends.h"

#include "host/cpu/cim_cpu.h"
#include "common/errors.h"

#if defined(CIMSWEEP_HAVE_CUDA)
#include "cuda/cuda_backend.h"
#include "cuda/device_info.h"
#endif

namespace cimsweep {

std::unique_ptr<CimBackend> make_backend(const BackendChoice& choice,
                                         const std::vector<CimLayerSpec>& layers,
                                         const CimConfig& config) {
  if (choice.kind == BackendChoice::Kind::kCuda) {
#if defined(CIMSWEEP_HAVE_CUDA)
    CudaBackendOptions options;
    options.precision = choice.precision == BackendChoice::Precision::kFast ? CudaPrecision::kFast
                                                                            : CudaPrecision::kExact;
    return make_cuda_backend(choice.device, layers, config, options);
#else
    throw UserError("--backend cuda: this binary was built without CUDA: rebuild with the CUDA "
                    "toolkit installed (-DCIMSWEEP_CUDA=ON) or use --backend cpu");
#endif
  }
  return std::make_unique<CpuCimBackend>(layers, config);
}

GpuSurvey survey_gpu(int device) {
  GpuSurvey survey;
#if defined(CIMSWEEP_HAVE_CUDA)
  survey.built_with_cuda = true;
  survey.unusable_reason = cuda_device_unusable_reason(device);
  if (survey.unusable_reason.empty()) survey.description = cuda_device_info(device).summary();
#else
  (void)device;
#endif
  return survey;
}

BackendResolution decide_backend(const std::string& requested, int device,
                                 const GpuSurvey& survey) {
  BackendResolution r;
  r.choice.device = device;
  if (requested == "cpu") {
    r.reason = "requested";
    return r;
  }
  if (requested != "auto" && requested != "cuda")
    throw UserError("unknown --backend '" + requested + "': use auto, cpu or cuda");
  if (device < 0)
    throw UserError("--device " + std::to_string(device) + " is negative: GPUs count from 0");
  const std::string why = !survey.built_with_cuda ? "built without CUDA" : survey.unusable_reason;
  if (why.empty()) {
    r.choice.kind = BackendChoice::Kind::kCuda;
    r.reason = survey.description;
    return r;
  }
  if (requested == "cuda")
    throw UserError("--backend cuda: " + why + "; use --backend cpu (or auto)");
  r.reason = why;
  return r;
}

BackendResolution resolve_backend(const std::string& requested, int device) {
  if (requested == "cpu") return decide_backend(requested, device, GpuSurvey{});
  return decide_backend(requested, device, survey_gpu(device));
}

BackendChoice::Precision parse_precision(const std::string& text) {
  if (text == "exact") return BackendChoice::Precision::kExact;
  if (text == "fast") return BackendChoice::Precision::kFast;
  throw UserError("unknown --precision '" + text +
                  "': use exact (fp32, agrees with the CPU backend) or fast (fp16 tensor cores)");
}

}  // namespace cimsweep
