// `cimsweep train`: its options and the run that loads the data, trains (train/trainer.h) and
// writes the model file.
#pragma once
#include <string>

#include "train/trainer.h"

namespace CLI {
class App;
}

namespace cimsweep {

struct TrainOptions {
  // Everything the trainer takes; settings.command_line is the command as typed (provenance).
  train::TrainSettings settings;
  std::string data, output, shortcut = "A", schedule = "cosine", scaling = "maxabs";
  std::string ranges = "calibrate", exit_head = "conv", precision = "fp32";
  long long limit = 0, test_limit = 0;
  int threads = 0;
  bool no_qat = false;
};

CLI::App* setup_train(CLI::App& app, TrainOptions& options);
// Trains and writes the model; returns the exit code. UserError on bad input, before training.
int run_train(const TrainOptions& options);

}  // namespace cimsweep
