// `cimsweep eval MODEL --sigma S`: one model at one σ over one or more chips.
#pragma once
#include <string>

#include "host/cli/run_options.h"

namespace cimsweep {

struct EvalOptions {
  std::string model;  // model file (.safetensors)
  double sigma = 0;
  RunOptions run;
};

CLI::App* setup_eval(CLI::App& app, EvalOptions& options);
// Returns the exit code; UserError on bad input, before any work.
int run_eval(const EvalOptions& options);

}  // namespace cimsweep
