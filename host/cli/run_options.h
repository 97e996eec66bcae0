// The options eval, sweep and slurm share, registered once: what a run computes (data, chips, the
// stopping rule, backend) and the CIM options; for eval and sweep also where its results go. Then
// the one run both eval and sweep end in: plan checked, trials run, table written.
#pragma once
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "common/cim_config.h"
#include "host/io/output_file.h"
#include "host/policies/exit_policy.h"
#include "host/results/results.h"
#include "host/sweep/sweep_spec.h"

namespace CLI {
class App;
}

namespace cimsweep {

struct RunOptions {
  CimOptionValues cim;  // the CIM options given (common/cim_config.h)
  std::string data, split, results, format = "md", output, backend = "auto", shard, devices,
                                                            precision = "exact", predictions;
  // kNotGiven, a value nobody types, marks an option left out, so that a negative one is refused.
  static constexpr int kNotGiven = std::numeric_limits<int>::min();
  long long limit = kNotGiven;
  int trials = kNotGiven, first_trial = kNotGiven, threads = 0, device = 0;
  double ci_width = std::numeric_limits<double>::quiet_NaN();  // NaN: not given
  int min_trials = kNotGiven, max_trials = kNotGiven;
  bool print_config = false;  // print the plan as a sweep file and stop
  bool resume = false, quiet = false, no_clean = false, policy_on_cim = false,
       wait_for_lock = false, force = false;
  ExitPolicyOptions exit_policy;  // --exit-policy and its calibration, --entropy-grid
};

// --weight-bits … --seed (host/cim_config.h's cim_options()), each appended to `values` as given.
void add_cim_options(CLI::App& command, CimOptionValues& values);

// What a run computes, for any options struct with these fields (RunOptions, SlurmOptions, whose
// tasks are sweeps): --data, --split, --limit, --trials, --first-trial, --ci-width, --min-trials,
// --max-trials, --no-clean, --threads, --backend and the CIM options. The struct's defaults say
// "not given". Defined (and instantiated for both) in run_options.cpp.
template <class Options>
void add_computation_options(CLI::App& command, Options& o);

// Everything eval and sweep take: add_computation_options and where the results go.
void add_run_options(CLI::App& command, RunOptions& o);

// The plan a run makes of the options: every option given replaces the sweep file's value.
void apply_run_options(const RunOptions& o, SweepPlan& plan);

// eval and sweep from here on: checks the plan and every output before any work (`read_files`:
// the files the run reads besides the models and the data, with what they are), runs it and
// writes the table (and --predictions). Returns the exit code.
int run_plan(SweepPlan plan, const RunOptions& o,
             const std::vector<std::pair<std::string, std::string>>& read_files);

// --output, checked before any work: writable, and none of the files the run reads or appends.
OutputPath prepare_output(const RunOptions& o,
                          const std::vector<std::pair<std::string, std::string>>& inputs);

// The table of `records` (format o.format) to `output`, or stdout when it is empty. ci_width > 0:
// the table marks the cells that stopped at max_trials above the target.
void emit_table(const std::vector<TrialRecord>& records, const RunOptions& o,
                const OutputPath& output, double ci_width = 0, int max_trials = 0);

}  // namespace cimsweep
