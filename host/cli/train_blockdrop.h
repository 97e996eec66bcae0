// `cimsweep train-blockdrop`: its options and the run that loads the backbone and the data,
// trains a BlockDrop policy (train/blockdrop.h) and writes the policy file (and, after joint
// fine-tuning, the fine-tuned backbone beside it).
#pragma once
#include <string>
#include <vector>

#include "train/blockdrop.h"

namespace CLI {
class App;
}

namespace cimsweep {

struct TrainBlockDropOptions {
  // Everything the trainer takes; settings.command_line is the command as typed (provenance).
  train::BlockDropSettings settings;
  std::string backbone, data, output, sigma_range, backend = "auto";
  std::vector<std::string> cim;  // NAME=VALUE, as eval's --NAME VALUE
  long long limit = 0, test_limit = 0;
  int threads = 0, device = 0;
};

CLI::App* setup_train_blockdrop(CLI::App& app, TrainBlockDropOptions& options);
// Trains and writes the policy; returns the exit code. UserError on bad input, before training.
int run_train_blockdrop(const TrainBlockDropOptions& options);

}  // namespace cimsweep
