// `cimsweep sweep [MODELS…] [--spec FILE] [--sigmas LIST]`: models × σ values × chips, and the
// accuracy table.
#pragma once
#include <string>
#include <vector>

#include "host/cli/run_options.h"

namespace cimsweep {

struct SweepCommandOptions {
  std::vector<std::string> models;  // model files; empty: the sweep file's [[models]]
  std::string spec_path;            // sweep file (TOML); empty: none
  std::string sigmas;               // comma-separated σ values; empty: the sweep file's
  RunOptions run;
};

CLI::App* setup_sweep(CLI::App& app, SweepCommandOptions& options);
// Returns the exit code; UserError on bad input, before any work.
int run_sweep_command(const SweepCommandOptions& options);

}  // namespace cimsweep
