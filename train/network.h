// The trainable ResNet: exactly the architecture networks/resnet.cpp evaluates (same tensor names,
// shapes, CIM-layer order, shortcut layouts and exit heads), with a training-mode forward pass
// that keeps what the backward pass needs, and quantisation-aware fake quantisers on every CIM
// layer (cim-model.md §1, §3).
#pragma once
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "common/tensor.h"
#include "networks/resnet.h"
#include "train/layers.h"
#include "train/quantise.h"

namespace cimsweep::train {

// A learnable tensor with its gradient and SGD momentum buffer.
struct Parameter {
  std::string name;  // tensor name (docs/model-format.md), or "<layer>.input_range" for a_max
  std::vector<int64_t> shape;
  std::vector<float> value, grad, momentum;
  bool weight_decay = false;  // conv and FC weights only, never BN parameters, biases or ranges
  bool trainable = true;  // false: the optimizer leaves it alone (frozen, or a calibrated range)
  bool backbone = true;   // false for the early-exit heads
};

struct ForwardOptions {
  bool training = false;  // batch statistics, caches for backward()
  bool update_running_stats = true;
  QuantSettings quant;
  // The convolutions' arithmetic (layers.h); the FC layers, batch norm and the rest stay fp32.
  ConvPrecision precision = ConvPrecision::kFp32;
  // Noise-aware training: every weight the layers use is multiplied by (1 + sigma·z), z ~ N(0, 1)
  // drawn afresh for every `noise_step` (a pure function of seed, step, layer and weight).
  float noise_sigma = 0;
  uint32_t noise_seed = 0;
  uint64_t noise_step = 0;
  // The backbone runs in evaluation mode and gets no gradients; only the exit heads train.
  bool frozen_backbone = false;
  // nullptr (every block runs) or [n × num_blocks] row-major, 1 = run the block, 0 = skip it, as
  // ResNet::forward's mask (BlockDrop): a skipped image gets the block's shortcut alone, and
  // backward() sends its gradient through that shortcut only. The block's residual branch runs on
  // its kept images only, so that in training its batch statistics are theirs; the shortcut runs
  // on the whole batch. Read during forward() only.
  const uint8_t* keep = nullptr;
  // Called with every CIM layer's input before clipping (calibration): layer number, values.
  std::function<void(int layer, const float* values, size_t count)> observe_input;
};

class TrainableResNet {
 public:
  explicit TrainableResNet(const ResNetArch& arch);
  ~TrainableResNet();
  TrainableResNet(const TrainableResNet&) = delete;
  TrainableResNet& operator=(const TrainableResNet&) = delete;

  const ResNetArch& arch() const { return arch_; }

  // He initialisation (kaiming normal, fan_out, as tools/cim_reference.py) of convs, PyTorch's
  // default uniform(±1/sqrt(fan_in)) for FC layers, BN γ = 1, β = 0, running stats 0 and 1.
  void initialise(uint64_t seed);

  std::vector<Parameter>& parameters() { return parameters_; }
  const std::vector<Parameter>& parameters() const { return parameters_; }
  Parameter& parameter(const std::string& name);

  // The CIM layers in forward order (names as networks/resnet.cpp), and their input ranges a_max.
  const std::vector<std::string>& cim_layer_names() const { return cim_layer_names_; }
  std::map<std::string, float> input_ranges() const;
  void set_input_range(const std::string& layer, float a_max);
  // PACT: the ranges (all but conv1's, which reads pixels in [0, 1]) become trainable.
  void set_ranges_trainable(bool on);
  // Raises every range below `minimum` to it (a learned range must stay positive).
  void clamp_input_ranges(float minimum);

  // Every tensor of the model file (weights, biases, BN parameters and running statistics).
  std::map<std::string, Tensor> export_tensors() const;
  // Copies the tensors that exist here (same name and shape); UserError on a shape mismatch.
  // Returns the names of this network's tensors that `tensors` lacked.
  std::vector<std::string> import_tensors(const std::map<std::string, Tensor>& tensors);

  // images: [n, C, H, W] in [0, 1]. Returns the logits of every exit, early exits first, each
  // [classes, n, 1, 1].
  std::vector<FeatureMap> forward(const float* images, int n, const ForwardOptions& options);
  // After a training forward(): the parameters' gradients (overwritten) from the loss gradient
  // with respect to every exit's logits.
  void backward(const std::vector<FeatureMap>& dlogits);

  // Row-major [n × classes] logits per exit, as ResNet::forward returns them.
  std::vector<std::vector<float>> predict(const float* images, int n,
                                          const ForwardOptions& options);

  struct Modules;  // the layers (network.cpp)

 private:
  ResNetArch arch_;
  std::vector<Parameter> parameters_;
  std::vector<std::string> cim_layer_names_;
  std::unique_ptr<Modules> modules_;
};

}  // namespace cimsweep::train
