// The CIFAR ResNet family (He et al. 2016): depth 6n+2, three stages of n basic blocks with widths
// w, 2w, 4w, any kernel size (padding k/2), option-A or -B shortcuts, optional early exits after
// stages 1 and 2, and a forward pass that takes a per-image keep/skip mask over the blocks.
// Convs and FC layers run on a CimBackend; batch norm, ReLU, additions and pooling run here in
// float32.
#pragma once
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/cim_backend.h"
#include "common/tensor.h"

namespace cimsweep {

struct ExitHeadSpec {
  std::string type = "conv";  // "conv": conv + BN + ReLU + pool + FC; "pool": pool + FC
  int kernel = 3, stride = 2;
  int channels = 0;  // 0: the stage's width
};

struct ResNetArch {
  int depth = 20;
  int kernel = 3;
  int width = 16;
  int in_channels = 3;
  int input_height = 32, input_width = 32;
  int num_classes = 10;
  char shortcut = 'A';
  // Option A's zero channels: "split" evenly before and after the identity channels (Idelbayev's
  // CIFAR ResNet), or all "after" them (F.pad(x, (0, 0, 0, 0, 0, extra))).
  std::string shortcut_padding = "split";
  std::vector<int> exits;  // subset of {1, 2}
  ExitHeadSpec exit_head;

  int blocks_per_stage() const { return (depth - 2) / 6; }
  int num_blocks() const { return 3 * blocks_per_stage(); }
  int num_exits() const { return int(exits.size()) + 1; }
  void validate() const;  // UserError on an impossible architecture
  nlohmann::json to_json() const;
  static ResNetArch from_json(const nlohmann::json& j);  // UserError on bad fields
  std::string describe() const;  // e.g. "ResNet-20 (kernel 3, width 16, …)"
};

class ResNet {
 public:
  // Takes the tensors (names per docs/model-format.md) and every CIM layer's input range; checks
  // that every required tensor is present with its exact shape. UserError otherwise.
  ResNet(const ResNetArch& arch, std::map<std::string, Tensor> tensors,
         const std::map<std::string, float>& input_ranges);

  const ResNetArch& arch() const { return arch_; }
  // The CIM layers in forward order; the position is the layer's noise index.
  const std::vector<CimLayerSpec>& cim_layers() const { return cim_layers_; }
  int64_t parameter_count() const;
  // Multiply-accumulates of each CIM layer for one image, in cim_layers() order.
  std::vector<int64_t> layer_macs() const;

  // images: [n, C, H, W] in [0, 1]. keep: nullptr (all blocks) or [n × num_blocks] with 1 = run
  // the block, 0 = skip it (its shortcut still applies). Returns logits [num_exits][n × classes],
  // early exits first, the final head last.
  std::vector<std::vector<float>> forward(const float* images, int n, CimBackend& backend,
                                          const uint8_t* keep = nullptr) const;

 private:
  struct Norm {  // batch norm folded into y = x·scale + shift
    std::vector<float> scale, shift;
  };
  struct ConvNorm {
    int layer = -1;  // index into cim_layers_
    Norm norm;
  };
  struct Block {
    int in_channels, out_channels, stride;
    ConvNorm conv1, conv2;
    bool projection = false;  // option B where the shape changes
    ConvNorm shortcut;
  };
  struct Exit {
    int after_stage;
    bool has_conv;
    ConvNorm conv;
    int fc = -1;
  };

  int add_cim_layer(const std::string& name, int out, int in, int kernel, int stride, int pad,
                    int in_h, int in_w, bool with_bias, const std::map<std::string, float>& ranges);
  const Tensor& require(const std::string& name, const std::vector<int64_t>& shape) const;
  Norm load_norm(const std::string& prefix, int channels) const;

  ResNetArch arch_;
  std::map<std::string, Tensor> tensors_;
  std::vector<CimLayerSpec> cim_layers_;
  std::vector<std::pair<int, int>> input_sizes_;  // each CIM layer's input height and width
  ConvNorm stem_;
  std::vector<Block> blocks_;
  std::vector<Exit> exits_;
  int fc_ = -1;
};

}  // namespace cimsweep
