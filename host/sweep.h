// Runs a sweep plan: every (model, σ, trial) work unit not already in the results file, appending
// each finished trial durably, then aggregates the records of this configuration into a table.
#pragma once
#include <functional>
#include <string>
#include <vector>

#include "host/results.h"
#include "host/sweep_spec.h"

namespace cimsweep {

struct SweepOptions {
  std::string results_path;   // JSON Lines; empty: keep results in memory only
  bool resume = false;        // reuse the trials already in results_path
  bool show_progress = true;  // progress line on a terminal
  // Called once models, data and the results file are ready, before the first trial: the place
  // for a notice that should not precede an input error.
  std::function<void()> on_start;
};

// Returns the records of this plan's configuration (resumed and new), clean references included.
std::vector<TrialRecord> run_sweep(const SweepPlan& plan, const SweepOptions& options);

// Where a plan without --data reads its images: Debian's Fashion-MNIST.
std::string default_data_path();

}  // namespace cimsweep
