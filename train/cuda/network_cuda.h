// The trainable ResNet on the GPU: the same network as train/network.h (it is built from a
// TrainableResNet's architecture and parameter list, by tensor name, and mirrors network.cpp's
// forward and backward op for op) with its parameters, gradients, momenta and running statistics
// resident on the GPU, computed by CudaTrainOps (cuDNN, cuBLAS, own kernels).
//
// Supported: every architecture TrainableResNet builds (option A/B shortcuts, split/after
// padding, early exits with conv or pool heads), QAT (maxabs and WAGE weights, clipped inputs
// with PACT range gradients), frozen backbones, running-statistics updates. Not supported (a
// UserError says so): noise-aware training (noise_sigma > 0) and observe_input (calibration runs
// on the CPU network).
//
// Input ranges a_max stay on the host (one float per layer): the range gradients are downloaded
// per layer and trainable ranges are updated on the host with the same SGD formula.
#pragma once
#include <memory>
#include <vector>

#include "train/cuda/train_ops.h"
#include "train/network.h"
#include "train/optimizer.h"

namespace cimsweep::train::gpu {

class CudaResNet {
 public:
  // `net` must outlive this object; its parameters are copied to the GPU (upload()).
  CudaResNet(TrainableResNet& net, CudaTrainOps& ops);
  ~CudaResNet();
  CudaResNet(const CudaResNet&) = delete;
  CudaResNet& operator=(const CudaResNet&) = delete;

  // Host network → GPU: values, momenta, running statistics (ranges are read on every forward).
  void upload();
  // GPU → host network: values, gradients, momenta, running statistics.
  void download();

  // images: host [n, C, H, W] in [0, 1]. Logits of every exit, early exits first, each
  // [n, classes, 1, 1] on the GPU.
  std::vector<DeviceMap> forward(const float* images, int n, const ForwardOptions& options);
  std::vector<DeviceMap> forward(const DeviceMap& images, const ForwardOptions& options);
  // After a training forward(): every parameter's gradient (overwritten), on the GPU.
  void backward(const std::vector<DeviceMap>& dlogits);
  // sgd_step over every trainable parameter (GPU for tensors, host for the input ranges).
  void sgd_step(const SgdSettings& settings, double lr);

  struct Modules;

 private:
  TrainableResNet& net_;
  CudaTrainOps& ops_;
  std::unique_ptr<Modules> m_;
};

}  // namespace cimsweep::train::gpu
