#include "host/policies/blockdrop_eval.h"

#include <cmath>
#include <cstdio>
#include <filesystem>

#include "common/errors.h"

namespace cimsweep {

namespace {
constexpr const char* kBlockDropKey = "cimsweep.blockdrop";
// The policy's simulated chip draws its noise under another seed than the backbone's, so that the
// two networks' first layers do not share their cells' variation.
constexpr uint32_t kPolicySeedOffset = 0x9e3779b9u;
}  // namespace

nlohmann::json BlockDropModel::identity() const {
  return {{"blockdrop_policy", policy.content_hash}, {"policy_on_cim", policy_on_cim}};
}

bool is_blockdrop_policy(const LoadedModel& model) {
  return model.metadata.count(kBlockDropKey) != 0;
}

LoadedModel load_blockdrop(LoadedModel policy, bool policy_on_cim,
                           std::shared_ptr<const BlockDropModel>& blockdrop) {
  const std::string where = "BlockDrop policy '" + policy.path + "'";
  nlohmann::json meta;
  try {
    meta = nlohmann::json::parse(policy.metadata.at(kBlockDropKey));
    (void)meta.at("backbone").get<std::string>();
    (void)meta.at("backbone_hash").get<std::string>();
  } catch (const std::exception&) {
    throw UserError(where + " has unreadable " + kBlockDropKey +
                    " metadata: write it with cimsweep train-blockdrop");
  }
  auto model = std::make_shared<BlockDropModel>();
  const std::filesystem::path folder = std::filesystem::path(policy.path).parent_path();
  model->backbone_path = (folder / meta["backbone"].get<std::string>()).lexically_normal().string();
  model->sigma_scale = meta.value("sigma_scale", 1.0);
  model->sigma_weight = meta.value("sigma_weight", std::vector<float>{});
  model->policy_on_cim = policy_on_cim;
  if (!std::filesystem::exists(model->backbone_path))
    throw UserError(where + " names backbone '" + model->backbone_path +
                    "', which does not exist: keep the backbone beside the policy as it was");
  LoadedModel backbone = load_model(model->backbone_path);
  if (backbone.content_hash != meta["backbone_hash"].get<std::string>())
    throw UserError(where + " was trained for another version of '" + model->backbone_path +
                    "' (content hash differs): restore that backbone or retrain the policy");
  model->policy = std::move(policy);
  const ResNetArch& policy_arch = model->policy.network->arch();
  const ResNetArch& backbone_arch = backbone.network->arch();
  if (policy_arch.num_classes != backbone_arch.num_blocks() ||
      policy_arch.in_channels != backbone_arch.in_channels ||
      policy_arch.input_height != backbone_arch.input_height ||
      policy_arch.input_width != backbone_arch.input_width)
    throw UserError(where + " does not fit its backbone's blocks or images: retrain the policy");
  if (!model->sigma_weight.empty() && model->sigma_weight.size() != size_t(model->blocks()))
    throw UserError(where + " has " + std::to_string(model->sigma_weight.size()) +
                    " σ weights for " + std::to_string(model->blocks()) + " blocks: retrain it");
  blockdrop = std::move(model);
  return backbone;
}

BlockDropDecider::BlockDropDecider(std::shared_ptr<const BlockDropModel> model,
                                   const CimConfig& config, const BackendChoice& backend)
    : model_(std::move(model)) {
  CimConfig policy_config = config;
  policy_config.seed = config.seed + kPolicySeedOffset;
  // The calibrated ADC is set from clean data; the policy network's chip keeps it simple.
  if (policy_config.adc == AdcMode::kCalibrated) policy_config.adc = AdcMode::kDynamic;
  backend_ = make_backend(model_->policy_on_cim ? backend : BackendChoice{},
                          model_->policy.network->cim_layers(), policy_config);
  set_chip(0, 0.0, true);
}

void BlockDropDecider::set_chip(uint32_t trial, double sigma, bool clean) {
  sigma_ = sigma;
  if (model_->policy_on_cim && !clean) {
    backend_->set_all_digital(false);
    backend_->program_chip(trial, sigma);
  } else {
    backend_->program_chip(0, 0.0);
    backend_->set_all_digital(true);
  }
}

std::vector<uint8_t> BlockDropDecider::decide(const float* images, int n, uint32_t batch_index) {
  backend_->begin_batch(batch_index);
  const auto logits = model_->policy.network->forward(images, n, *backend_);
  const size_t blocks = size_t(model_->blocks());
  const double sigma_input = sigma_ / model_->sigma_scale;
  std::vector<uint8_t> keep(size_t(n) * blocks);
  for (size_t at = 0; at < keep.size(); ++at) {
    double z = logits.back()[at];
    if (!model_->sigma_weight.empty()) z += model_->sigma_weight[at % blocks] * sigma_input;
    keep[at] = z >= 0 ? 1 : 0;  // p = sigmoid(z) ≥ 0.5
  }
  return keep;
}

BlockMacs block_macs(const ResNet& net) {
  BlockMacs macs;
  const int per_stage = net.arch().blocks_per_stage();
  macs.block.assign(size_t(net.arch().num_blocks()), 0);
  const std::vector<int64_t> layer_macs = net.layer_macs();
  for (size_t i = 0; i < layer_macs.size(); ++i) {
    macs.total += layer_macs[i];
    const std::string& name = net.cim_layers()[i].name;  // e.g. "layer2.0.conv1"
    int stage = 0, index = 0, conv = 0;
    if (std::sscanf(name.c_str(), "layer%d.%d.conv%d", &stage, &index, &conv) == 3 &&
        name.find("shortcut") == std::string::npos && stage >= 1 && stage <= 3)
      macs.block[size_t((stage - 1) * per_stage + index)] += layer_macs[i];
  }
  return macs;
}

void KeepStatistics::add(const uint8_t* masks, int n, int blocks) {
  blocks_ = blocks;
  for (int i = 0; i < n; ++i) {
    const uint8_t* mask = masks + size_t(i) * size_t(blocks);
    int kept = 0;
    for (int k = 0; k < blocks; ++k) {
      kept += mask[k];
      if (!mask[k] && size_t(k) < macs_.block.size())
        skipped_macs_ += double(macs_.block[size_t(k)]);
    }
    ++images_;
    kept_sum_ += kept;
    kept_squares_ += double(kept) * kept;
    patterns_.emplace(mask, mask + blocks);
  }
}

nlohmann::json KeepStatistics::to_json(const BlockDropModel& model) const {
  const double n = double(images_);
  const double mean = images_ ? kept_sum_ / n : 0.0;
  const double variance = images_ ? std::max(0.0, kept_squares_ / n - mean * mean) : 0.0;
  return {{"policy", std::filesystem::path(model.policy.path).filename().string()},
          {"blocks", blocks_},
          {"mean_blocks_kept", mean},
          {"std_blocks_kept", std::sqrt(variance)},
          {"patterns", patterns_.size()},
          {"macs_per_image", images_ ? double(macs_.total) - skipped_macs_ / n : 0.0},
          {"policy_on_cim", model.policy_on_cim}};
}

}  // namespace cimsweep
