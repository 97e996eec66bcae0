// Runs a sweep plan: every (model, σ, trial) work unit not already in the results file, appending
// each finished trial durably, then aggregates the records of this configuration into a table.
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "host/backends.h"
#include "host/policies/exit_policy.h"
#include "host/results/results.h"
#include "host/sweep/sweep_spec.h"

namespace cimsweep {

// The most work units one run (one shard) plans; more is a sweep for more shards.
constexpr int64_t kMaxUnitsPerRun = int64_t(1) << 21;

struct SweepOptions {
  std::string results_path;   // JSON Lines; empty: keep results in memory only
  bool resume = false;        // reuse the trials already in results_path
  bool wait_for_lock = false;  // another writer holds results_path: wait instead of an error
  bool show_progress = true;  // progress line on a terminal
  // Deterministic share: work unit number u (in plan order, over all models) belongs to shard
  // u mod shard_count; with the stopping rule (plan.ci_width) whole cells are shared out instead,
  // cell c (clean references and (model, σ) cells in plan order) to shard c mod shard_count. The
  // union of all shards is the unsharded sweep, trial for trial.
  int shard_index = 0, shard_count = 1;
  // One worker per entry, each with its own backend; they take work units from one queue.
  // Empty: one CPU worker. CPU workers share the OpenMP threads evenly.
  std::vector<BackendChoice> workers;
  // Called once models, data and the results file are ready, before the first trial: the place
  // for a notice that should not precede an input error.
  std::function<void()> on_start;
  // Exit policy of multi-exit models (--exit-policy …): calibrating policies hold
  // exit_policy.calibration_images of the data apart (before --limit) and calibrate on them.
  ExitPolicyOptions exit_policy;
  // BlockDrop models (a model path that is a policy file, host/policies/blockdrop_eval.h): run the policy
  // on the simulated chip too (--policy-on-cim) instead of digitally.
  bool policy_on_cim = false;
  // Every record run (not resumed) carries its per-image predictions (`eval --predictions`).
  bool keep_predictions = false;
};

// Returns the records of this plan's configuration and shard (resumed and new), clean references
// included, in plan order whatever order the workers finished in.
std::vector<TrialRecord> run_sweep(const SweepPlan& plan, const SweepOptions& options);

// The stopping rule of --ci-width for one cell, given its chips so far (trial order): how many
// chips it needs in all. At most chips.size() (the cell is settled) once its 95 % half-width is at
// most ci_width or it has max_trials chips; else the next round's end. A pure function of the
// chips' accuracies, so every shard and every resumed run decides alike.
int next_round_size(const std::vector<TrialRecord>& chips, double ci_width, int min_trials,
                    int max_trials);

// Where a plan without --data reads its images: Debian's Fashion-MNIST.
std::string default_data_path();

// Parses "I/N" (0 ≤ I < N): UserError otherwise.
std::pair<int, int> parse_shard(const std::string& text);
// Parses a device list "0,1,3": UserError on anything but distinct non-negative integers.
std::vector<int> parse_device_list(const std::string& text);

}  // namespace cimsweep
