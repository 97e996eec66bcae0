#include "host/cli/train_blockdrop.h"

#include <omp.h>

#include <cstdio>
#include <filesystem>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>

#include "host/io/dataset.h"
#include "common/errors.h"
#include "host/io/output_file.h"
#include "host/sweep/runner.h"
#include "train/blockdrop.h"

namespace cimsweep {

using train::BlockDropResult;
using train::BlockDropSettings;

CLI::App* setup_train_blockdrop(CLI::App& app, TrainBlockDropOptions& o) {
  BlockDropSettings& s = o.settings;
  CLI::App* cmd = app.add_subcommand(
      "train-blockdrop",
      "train a BlockDrop policy (REINFORCE, curriculum) for a frozen backbone, then fine-tune "
      "both together, and write them");
  cmd->add_option("--backbone", o.backbone, "the backbone's model file (.safetensors)")->required();
  cmd->add_option("--output", o.output, "policy file to write (.safetensors)")->required();
  cmd->add_option("--data", o.data,
                  "data set with train and test splits (default: Debian's Fashion-MNIST)");
  cmd->add_option("--limit", o.limit, "class-balanced subset of N training images (default all)");
  cmd->add_option("--test-limit", o.test_limit,
                  "class-balanced subset of N test images (default all)");
  cmd->add_option("--policy-blocks", s.policy_blocks,
                  "basic blocks per stage of the policy ResNet (default 1)");
  cmd->add_option("--policy-width", s.policy_width, "first-stage width of the policy (default 16)");
  cmd->add_option("--gamma", s.reward.gamma, "penalty of a wrong answer: reward −γ (default 5)");
  cmd->add_option("--lr", s.lr, "Adam learning rate (default 1e-4)");
  cmd->add_option("--alpha", s.alpha, "exploration p' = αp + (1 − α)(1 − p) (default 0.8)");
  cmd->add_option("--beta", s.beta, "entropy bonus weight (default 0.1)");
  cmd->add_option("--batch", s.batch, "batch size (default 256)");
  cmd->add_option("--epochs", s.epochs,
                  "policy epochs; epoch t frees the last t blocks (default K + 10, K blocks)");
  cmd->add_option("--finetune-epochs", s.finetune_epochs,
                  "joint fine-tuning epochs after --epochs: the backbone trains on the sampled "
                  "masks with the policy and is written beside it as <output stem>-backbone"
                  ".safetensors (default 10; 0: none; not with --sigma-aware)");
  cmd->add_option("--backbone-lr", s.backbone_lr,
                  "Adam learning rate of the backbone in joint fine-tuning (default 1e-4)");
  cmd->add_option("--seed", s.seed, "seed of the policy's initialisation and sampling (default 1)");
  cmd->add_flag(
      "--sigma-aware", s.sigma_aware,
      "σ-aware BlockDrop: the policy reads σ, every batch runs on a fresh simulated chip, "
      "correct answers earn a constant (accuracy objective)");
  cmd->add_option("--sigma-range", o.sigma_range,
                  "σ-aware: σ drawn uniformly in MIN,MAX (default 0,0.2)");
  cmd->add_option("--compute-weight", s.reward.compute_weight,
                  "σ-aware: a correct answer earns 1 + w·(1 − (kept/K)²) (default 0)");
  cmd->add_option("--cim", o.cim,
                  "σ-aware: chip option NAME=VALUE as eval's --NAME VALUE, e.g. adc-bits=8 "
                  "(repeatable)");
  cmd->add_option("--backend", o.backend, "σ-aware chips: auto, cpu or cuda (default auto)");
  cmd->add_option("--device", o.device, "GPU number (default 0)");
  cmd->add_option("--threads", o.threads, "CPU threads (default: all cores)");
  return cmd;
}

int run_train_blockdrop(const TrainBlockDropOptions& o) {
  BlockDropSettings s = o.settings;
  if (o.limit < 0) throw UserError("--limit must be ≥ 0 (0: all training images)");
  if (o.test_limit < 0) throw UserError("--test-limit must be ≥ 0 (0: all test images)");
  if (o.threads < 0) throw UserError("--threads must be at least 1 (or leave it out: all cores)");
  if (!s.sigma_aware && (!o.sigma_range.empty() || !o.cim.empty() || s.reward.compute_weight != 0))
    throw UserError("--sigma-range, --cim and --compute-weight need --sigma-aware: add it");
  if (!o.sigma_range.empty()) {
    const size_t comma = o.sigma_range.find(',');
    try {
      if (comma == std::string::npos) throw std::invalid_argument("no comma");
      size_t used_min = 0, used_max = 0;
      s.sigma_min = std::stod(o.sigma_range.substr(0, comma), &used_min);
      s.sigma_max = std::stod(o.sigma_range.substr(comma + 1), &used_max);
      if (used_min != comma || used_max != o.sigma_range.size() - comma - 1)
        throw std::invalid_argument("trailing text");
    } catch (const std::exception&) {
      throw UserError("--sigma-range '" + o.sigma_range + "' must be MIN,MAX, e.g. 0,0.2");
    }
  }
  s.reward.accuracy_objective = s.sigma_aware;
  for (const std::string& option : o.cim) {
    const size_t equals = option.find('=');
    if (equals == std::string::npos)
      throw UserError("--cim '" + option + "' must be NAME=VALUE, e.g. adc-bits=8");
    set_cim_option(s.cim, option.substr(0, equals), option.substr(equals + 1));
  }
  if (s.sigma_aware) s.cim.validate();
  train::validate_blockdrop_settings(s);
  // Fail before hours of training, not after: the output must be writable (and no directory).
  (void)OutputPath(o.output, "--output");
  if (o.threads > 0) omp_set_num_threads(o.threads);
  if (s.sigma_aware) {
    const BackendResolution resolved = resolve_backend(o.backend, o.device);
    s.backend = resolved.choice;
    std::fprintf(stderr, "σ-aware chips on the %s backend (%s)\n",
                 resolved.choice.kind == BackendChoice::Kind::kCuda ? "CUDA" : "CPU",
                 resolved.reason.c_str());
  }

  const LoadedModel backbone = load_model(o.backbone);
  const bool default_data = o.data.empty();
  const std::string path = default_data ? default_data_path() : o.data;
  if (default_data && !std::filesystem::exists(path))
    throw UserError("no --data given and Fashion-MNIST is not installed at " + path +
                    ": pass --data PATH");
  const Dataset train_data = load_balanced(path, "train", o.limit);
  const Dataset test_data = load_balanced(path, "test", o.test_limit);

  auto log = [](const std::string& line) {
    std::fprintf(stderr, "%s\n", line.c_str());
    std::fflush(stderr);
  };
  const BlockDropResult result = train::train_blockdrop(s, backbone, train_data, test_data, log);
  train::save_blockdrop_policy(o.output, result, backbone);
  if (result.finetuned()) log("wrote " + train::finetuned_backbone_path(o.output));
  log("wrote " + o.output);
  return 0;
}

}  // namespace cimsweep
