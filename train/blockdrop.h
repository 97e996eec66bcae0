// BlockDrop (Wu et al., CVPR 2018) and its σ-aware variant (the reference study's proposal): a
// small policy ResNet reads the image (and, σ-aware, the chip's σ) and outputs one keep
// probability per residual block of a frozen backbone; at inference a block runs when p ≥ 0.5.
// Training is REINFORCE with the self-critical baseline (the reward of the thresholded policy),
// exploration p' = αp + (1 − α)(1 − p), an entropy bonus, a curriculum that frees the last t
// blocks at epoch t, and Adam. Then, as BlockDrop's last stage (its finetune.py), joint
// fine-tuning: the backbone runs with the sampled keep masks and trains with cross-entropy
// (quantisation-aware, its own Adam and learning rate) while the policy goes on with REINFORCE;
// the fine-tuned backbone is a model file of its own that the policy file names.
//
// The policy is an ordinary TrainableResNet (docs/model-format.md names and shapes) whose
// "classes" are the backbone's K blocks (logit → sigmoid), so that the policy file is an ordinary
// model file that the evaluator can also run on a simulated chip. The σ-aware policy concatenates
// s = σ / sigma_scale to the pooled features before the FC; the FC being linear, that is logit
// z_k + w_k·s, with the K weights w (computed digitally) in the policy file's metadata.
#pragma once
#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "host/backends.h"
#include "common/cim_config.h"
#include "host/io/dataset.h"
#include "host/io/model_file.h"
#include "common/tensor.h"
#include "networks/resnet.h"
#include "train/network.h"

namespace cimsweep::train {

// ---------------------------------------------------------------------------------------------
// The pieces of the estimator, pure functions (tests/test_blockdrop.cpp checks them alone).

// Curriculum: 1 where block b is free to be dropped at 1-based `epoch`: the last min(epoch, K)
// blocks; the others are forced on (kept, no gradient).
std::vector<uint8_t> curriculum_free_blocks(int blocks, int epoch);

struct RewardSettings {
  double gamma = 5;  // the penalty of a wrong answer: reward −γ
  // false (BlockDrop): a correct answer earns 1 − (kept/K)². true (σ-aware): it earns
  // 1 + compute_weight·(1 − (kept/K)²), an accuracy objective with an optional compute term.
  bool accuracy_objective = false;
  double compute_weight = 0;
};
double blockdrop_reward(bool correct, int kept, int blocks, const RewardSettings& settings);

// The exploration probability p' = αp + (1 − α)(1 − p).
inline double explore(double p, double alpha) {
  return alpha * p + (1 - alpha) * (1 - p);
}

// The REINFORCE loss of a batch and its gradient with respect to the policy's logits z (p = σ(z)):
//   L = (1/n) Σ_i Σ_{free k} [ −A_i · log Bernoulli(m_ik; p'_ik) − β · H(p'_ik) ]
// with A_i = R(sampled mask) − R(thresholded mask) (the self-critical baseline) and H the
// Bernoulli entropy. probs, sampled, dlogits: [n × K] row-major; free: [K].
double reinforce_loss_and_gradient(const std::vector<float>& probs,
                                   const std::vector<uint8_t>& sampled,
                                   const std::vector<double>& advantages,
                                   const std::vector<uint8_t>& free, double alpha, double beta,
                                   std::vector<float>& dlogits);

// Adam (Kingma & Ba) over every trainable parameter, without weight decay (BlockDrop's default).
struct AdamState {
  std::vector<std::vector<float>> m, v;
  int64_t step = 0;
};
void adam_step(std::vector<Parameter>& parameters, AdamState& state, double lr, double beta1 = 0.9,
               double beta2 = 0.999, double eps = 1e-8);

// ---------------------------------------------------------------------------------------------
// Training.

struct BlockDropSettings {
  // The policy network: a CIFAR ResNet with `policy_blocks` basic blocks per stage.
  int policy_blocks = 1, policy_width = 16;
  // REINFORCE (BlockDrop's published CIFAR defaults: γ = 5, α = 0.8, β = 0.1, Adam lr 1e-4).
  RewardSettings reward;
  double lr = 1e-4, alpha = 0.8, beta = 0.1;
  int batch = 256;
  // Policy epochs; epoch t (1-based) frees the last t blocks, so the first K are the curriculum.
  // 0: K + 10; fewer than K is a UserError (blocks never freed would have untrained outputs).
  int epochs = 0;
  uint64_t seed = 1;
  // σ-aware: every batch runs on a fresh simulated chip at σ ~ U[sigma_min, sigma_max]; the
  // policy reads σ; the reward is the accuracy objective and comes from the noisy backbone.
  bool sigma_aware = false;
  double sigma_min = 0, sigma_max = 0.2;
  CimConfig cim;          // the simulated chips of σ-aware training
  BackendChoice backend;  // their backend (the CUDA one where present)
  // Joint fine-tuning epochs after `epochs`: every block free, the backbone trained with Adam at
  // `backbone_lr` (BlockDrop's finetune.py: Adam 1e-4 for both networks, no entropy bonus, 2000
  // epochs of its far longer schedule). -1: 10 for BlockDrop, 0 σ-aware (not supported there);
  // 0: none, the policy keeps the original backbone.
  int finetune_epochs = -1;
  double backbone_lr = 1e-4;
  std::string command_line;
};

// The joint fine-tuning epochs that `settings` asks for (resolving the default).
int finetune_epochs(const BlockDropSettings& settings);

// 1-based trial numbers of σ-aware training chips start here, far from evaluation trials.
constexpr uint32_t kBlockDropTrainingFirstTrial = 1u << 29;

void validate_blockdrop_settings(const BlockDropSettings& settings);

struct BlockDropEpoch {
  int epoch = 0, free_blocks = 0;
  double reward = 0;         // mean reward of the thresholded policy over the epoch
  double test_accuracy = 0;  // %, backbone with the thresholded policy's masks (blocks not yet
                             // freed by the curriculum kept)
  double blocks_kept = 0;    // mean on the test data
  double seconds = 0;
  bool joint = false;  // a joint fine-tuning epoch (test accuracy on the fine-tuned backbone)
};

struct BlockDropResult {
  ResNetArch policy_arch;
  std::map<std::string, Tensor> tensors;
  std::map<std::string, float> input_ranges;
  std::vector<BlockDropEpoch> epochs;
  double sigma_scale = 1;           // the σ feature is σ / sigma_scale
  std::vector<float> sigma_weight;  // σ-aware: w_k; empty otherwise
  nlohmann::json provenance;
  // Joint fine-tuning: the fine-tuned backbone (same architecture), its recalibrated input
  // ranges and provenance; no tensors when there was none.
  ResNetArch backbone_arch;
  std::map<std::string, Tensor> backbone_tensors;
  std::map<std::string, float> backbone_input_ranges;
  nlohmann::json backbone_provenance;
  bool finetuned() const { return !backbone_tensors.empty(); }
};

// Where save_blockdrop_policy writes the fine-tuned backbone of the policy file `policy_path`:
// beside it, "<stem>-backbone.safetensors".
std::string finetuned_backbone_path(const std::string& policy_path);

// Trains a policy for the frozen `backbone` on `train_data`, reporting per epoch on `test_data`
// (σ-aware: on a chip at the middle of the σ range). Deterministic for a seed.
BlockDropResult train_blockdrop(const BlockDropSettings& settings, const LoadedModel& backbone,
                                const Dataset& train_data, const Dataset& test_data,
                                const std::function<void(const std::string&)>& log = {});

// Writes the policy file: a model file whose metadata "cimsweep.blockdrop" names the backbone
// (path relative to the policy file's folder, and its content hash) and the σ input. After joint
// fine-tuning it first writes the fine-tuned backbone (finetuned_backbone_path, with `backbone`'s
// other metadata such as class names) and names that one instead.
void save_blockdrop_policy(const std::string& path, const BlockDropResult& result,
                           const LoadedModel& backbone);

}  // namespace cimsweep::train
