// Evaluating BlockDrop models in eval and sweep: a policy file (train/blockdrop.h, written by
// `cimsweep train-blockdrop`) names its backbone; wherever a model path is a policy file, the
// backbone runs on the simulated chip with the keep masks that the policy chooses per image.
// The policy runs digitally (its σ = 0 quantised network) unless asked to run on the simulated
// chip too (--policy-on-cim); the σ-aware policy receives the chip's σ.
#pragma once
#include <cstdint>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "host/backends.h"
#include "common/cim_config.h"
#include "host/io/model_file.h"
#include "host/results/results.h"

namespace cimsweep {

struct BlockDropModel {
  LoadedModel policy;  // the policy network: its "classes" are the backbone's blocks
  std::string backbone_path;
  double sigma_scale = 1;
  std::vector<float> sigma_weight;  // σ-aware: logit k gains w_k·σ/sigma_scale; else empty
  bool policy_on_cim = false;

  int blocks() const { return policy.network->arch().num_classes; }
  // What decides the keep masks: the configuration hash includes it.
  nlohmann::json identity() const;
};

// Whether a loaded model file is a BlockDrop policy (metadata "cimsweep.blockdrop").
bool is_blockdrop_policy(const LoadedModel& model);

// Takes a loaded policy file, checks its metadata, and loads its backbone (path relative to the
// policy's folder), which must still have the content hash the policy was trained for and one
// block per policy output. UserError otherwise. Returns the backbone.
LoadedModel load_blockdrop(LoadedModel policy, bool policy_on_cim,
                           std::shared_ptr<const BlockDropModel>& blockdrop);

// The policy bound to one backend (one per trial runner): keep masks for batches of images.
class BlockDropDecider {
 public:
  BlockDropDecider(std::shared_ptr<const BlockDropModel> model, const CimConfig& config,
                   const BackendChoice& backend);
  // The chip the next batches run on (digital policy: always its σ = 0 network).
  void set_chip(uint32_t trial, double sigma, bool clean);
  // images: [n, C, H, W] in [0, 1]. Returns [n × blocks], 1 = run the block.
  std::vector<uint8_t> decide(const float* images, int n, uint32_t batch_index);
  const BlockDropModel& model() const { return *model_; }

 private:
  std::shared_ptr<const BlockDropModel> model_;
  std::unique_ptr<CimBackend> backend_;
  double sigma_ = 0;
};

// Multiply-accumulates per image of each residual block's own convs (conv1 and conv2; an option-B
// shortcut conv runs even when its block is skipped), in block order, and of all CIM layers.
struct BlockMacs {
  std::vector<int64_t> block;
  int64_t total = 0;
};
BlockMacs block_macs(const ResNet& net);

// Per-trial statistics of the keep masks: mean and spread of the blocks kept, distinct patterns,
// and the CIM MACs per image that the skipped blocks leave.
class KeepStatistics {
 public:
  explicit KeepStatistics(BlockMacs macs = {}) : macs_(std::move(macs)) {}
  void add(const uint8_t* masks, int n, int blocks);
  // extra["blockdrop"] of a trial record.
  nlohmann::json to_json(const BlockDropModel& model) const;

 private:
  uint64_t images_ = 0;
  BlockMacs macs_;
  int blocks_ = 0;
  double kept_sum_ = 0, kept_squares_ = 0, skipped_macs_ = 0;
  std::set<std::vector<uint8_t>> patterns_;
};

}  // namespace cimsweep
