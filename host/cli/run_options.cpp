#include "host/cli/run_options.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <thread>
#include <tuple>

#include <CLI/CLI.hpp>

#include "common/errors.h"
#include "host/backends.h"
#include "host/io/output_file.h"
#include "host/results/results.h"
#include "host/sweep/runner.h"
#include "host/sweep/slurm.h"

namespace cimsweep {

void add_cim_options(CLI::App& command, CimOptionValues& values) {
  for (const CimOption& option : cim_options()) {
    const std::string name = option.name;
    if (option.flag) {
      command.add_flag_callback(
          "--" + name, [&values, name] { values.emplace_back(name, "true"); }, option.help);
    } else {
      command.add_option_function<std::string>(
          "--" + name, [&values, name](const std::string& v) { values.emplace_back(name, v); },
          option.help);
    }
  }
}

template <class Options>
void add_computation_options(CLI::App& command, Options& o) {
  command.add_option("--data", o.data,
                     "data set: CIFAR-10 binary, IDX(.gz) or image-folder path (default: Debian's "
                     "Fashion-MNIST, /usr/share/datasets/fashion-mnist)");
  command.add_option("--split", o.split, "test or train (default test)");
  command.add_option("--limit", o.limit, "class-balanced subset of N images (default all)");
  command.add_option("--trials", o.trials, "Monte-Carlo chips per σ (default 1)");
  command.add_option("--first-trial", o.first_trial, "number of the first trial (default 0)");
  command.add_option("--ci-width", o.ci_width,
                     "instead of --trials: run chips in rounds until every cell's 95 % interval "
                     "is at most ±W points (or --max-trials)");
  command.add_option("--min-trials", o.min_trials,
                     "--ci-width: chips of the first round (default 10)");
  command.add_option("--max-trials", o.max_trials,
                     "--ci-width: at most this many chips per cell (default 5000); the table "
                     "marks cells that stopped there");
  command.add_flag("--no-clean", o.no_clean, "skip the clean (σ = 0, ADC ideal) reference run");
  command.add_option("--threads", o.threads, "CPU threads (default: all cores)");
  command.add_option("--backend", o.backend,
                     "auto (the GPU if a usable one is found, else the CPU), cpu or cuda "
                     "(default auto)");
  add_cim_options(command, o.cim);
}

template void add_computation_options<RunOptions>(CLI::App&, RunOptions&);
template void add_computation_options<SlurmOptions>(CLI::App&, SlurmOptions&);

void add_run_options(CLI::App& command, RunOptions& o) {
  add_computation_options(command, o);
  command.add_option("--results", o.results, "append every trial to this JSON Lines file");
  command.add_flag("--resume", o.resume, "continue the --results file, skipping finished trials");
  command.add_flag("--wait-for-lock", o.wait_for_lock,
                   "another run is writing the --results file: wait for it to finish (then "
                   "resume what it left) instead of stopping with an error");
  command.add_option("--format", o.format, "table format: md, csv or json (default md)");
  command.add_option("--output", o.output,
                     "write the table to this file (atomically; a device or pipe is written "
                     "straight) instead of stdout");
  command.add_option("--device", o.device, "GPU number (default 0)");
  command.add_option("--devices", o.devices,
                     "spread trials over these GPUs of one machine, e.g. 0,1,2,3 (with the CPU "
                     "backend: as many CPU workers)");
  command.add_option("--precision", o.precision,
                     "CUDA backend: exact (agrees with the CPU to ~1e-5) or fast (fp16 tensor "
                     "cores) (default exact)");
  command.add_flag("--quiet", o.quiet, "no progress line");
  command.add_flag("--print-config", o.print_config,
                   "print the run as planned (every option, the sweep file's and the command "
                   "line's, as a sweep file for --spec) and stop without running it");
  command.add_option("--exit-policy", o.exit_policy.policy,
                     "multi-exit models: fixed:E, entropy:T1,T2,…, best-static, sigma-aware or "
                     "sigma-aware-learned (exits numbered 1 … E, E = final)");
  command.add_option(
      "--calibration", o.exit_policy.calibration_images,
      "images held apart (before --limit) to calibrate best-static/sigma-aware policies");
  command.add_option("--calibration-trials", o.exit_policy.calibration_trials,
                     "calibration chips per σ (default 3)");
  command.add_option("--mac-budget", o.exit_policy.mac_budget,
                     "best-static/sigma-aware: mean MACs per image at most this");
  command.add_flag("--policy-on-cim", o.policy_on_cim,
                   "BlockDrop models (policy files from train-blockdrop): run the policy network "
                   "on the simulated chip too, not digitally");
  command.add_option("--entropy-grid", o.exit_policy.entropy_grid,
                     "G: also evaluate G+1 shared entropy thresholds 0 … ln(classes) and print "
                     "the accuracy–compute frontier per σ");
}

void apply_run_options(const RunOptions& o, SweepPlan& plan) {
  set_cim_options(plan.cim, o.cim);
  if (!o.data.empty()) plan.data_path = o.data;
  if (!o.split.empty()) plan.split = o.split;
  if (o.limit != RunOptions::kNotGiven) {
    plan.limit = size_t(o.limit);
  }
  if (o.trials != RunOptions::kNotGiven) plan.trials = o.trials;  // validate_plan: at least 1
  if (!std::isnan(o.ci_width)) {
    if (o.trials != RunOptions::kNotGiven)
      throw UserError("--trials and --ci-width both given: --ci-width decides the number of "
                      "chips (bounded by --min-trials and --max-trials); leave one out");
    if (!(o.ci_width > 0))
      throw UserError("--ci-width must be a half-width in points > 0, e.g. --ci-width 1");
    plan.ci_width = o.ci_width;
  }
  if ((o.min_trials != RunOptions::kNotGiven || o.max_trials != RunOptions::kNotGiven) &&
      !plan.adaptive())
    throw UserError("--min-trials and --max-trials bound --ci-width: give --ci-width W too (or "
                    "--trials T for a fixed number of chips)");
  if (o.min_trials != RunOptions::kNotGiven) plan.min_trials = o.min_trials;
  if (o.max_trials != RunOptions::kNotGiven) plan.max_trials = o.max_trials;
  if (o.first_trial != RunOptions::kNotGiven) plan.first_trial = o.first_trial;  // and ≥ 0
  if (o.no_clean) plan.clean_reference = false;
  if (o.threads < 0) throw UserError("--threads must be at least 1 (or leave it out: all cores)");
  if (o.limit != RunOptions::kNotGiven && o.limit < 0)
    throw UserError("--limit must be ≥ 0 (0, or leaving it out: all images)");
  if (o.device < 0) throw UserError("--device must be a GPU number ≥ 0 (see nvidia-smi)");
  if (o.format != "md" && o.format != "csv" && o.format != "json")
    throw UserError("unknown --format '" + o.format + "': use md, csv or json");
  if (o.resume && o.results.empty())
    throw UserError("--resume needs --results FILE: the file whose finished trials to skip");
}

// ci_width > 0: the table marks the cells that stopped at max_trials above the target.
void emit_table(const std::vector<TrialRecord>& records, const RunOptions& o,
                const OutputPath& output, double ci_width, int max_trials) {
  std::vector<TableRow> rows = aggregate(records);
  if (ci_width > 0) mark_stopping_rule(rows, ci_width, max_trials);
  std::string table = add_frontier(format_table(rows, o.format), records, o.format);
  if (!table.empty() && table.back() != '\n') table += '\n';
  if (output.empty()) {
    std::cout << table;
    std::cout.flush();
  } else {
    output.write(table);
  }
}

// --output, checked before any work: writable, and none of the files the run reads or appends.
OutputPath prepare_output(const RunOptions& o,
                          const std::vector<std::pair<std::string, std::string>>& inputs) {
  if (o.output.empty()) return {};
  OutputPath output(o.output, "--output");
  refuse_same_file(o.output, "--output", o.results, "--results");
  for (const auto& [path, what] : inputs) refuse_same_file(o.output, "--output", path, what);
  return output;
}

namespace {

// The workers of a run, one per device, with the reason for the one-line backend notice.
std::vector<BackendResolution> resolve_workers(const RunOptions& o) {
  const std::vector<int> devices =
      o.devices.empty() ? std::vector<int>{o.device} : parse_device_list(o.devices);
  const BackendChoice::Precision precision = parse_precision(o.precision);
  std::vector<BackendResolution> workers;
  for (int device : devices) {
    BackendResolution r = resolve_backend(o.backend, device);
    r.choice.precision = precision;
    workers.push_back(r);
  }
  return workers;
}

// One line on stderr saying where the work runs, and why there (e.g. why not on a GPU).
void announce_backend(const std::vector<BackendResolution>& workers) {
  const BackendResolution& first = workers.front();
  const int count = int(workers.size());
  if (first.choice.kind == BackendChoice::Kind::kCuda) {
    for (const BackendResolution& w : workers)
      std::fprintf(stderr, "cimsweep: CUDA backend (%s) on GPU %d: %s\n",
                   w.choice.precision == BackendChoice::Precision::kFast ? "fast" : "exact",
                   w.choice.device, w.reason.c_str());
  } else if (count > 1) {
    std::fprintf(stderr, "cimsweep: CPU backend, %d workers × %d threads (%s)\n", count,
                 std::max(1, omp_get_max_threads() / count), first.reason.c_str());
  } else {
    std::fprintf(stderr, "cimsweep: CPU backend, %d threads (%s)\n", omp_get_max_threads(),
                 first.reason.c_str());
  }
}

// More OpenMP threads than this many per hardware thread only cost memory and time (and
// libgomp crashes on a hundred thousand).
constexpr int kThreadsPerCore = 4;

int capped_threads(int requested) {
  const int cores = std::max(1, int(std::thread::hardware_concurrency()));
  if (requested <= kThreadsPerCore * cores) return requested;
  std::fprintf(stderr,
               "cimsweep: note: --threads %d is more than %d × the %d hardware threads; using %d\n",
               requested, kThreadsPerCore, cores, kThreadsPerCore * cores);
  return kThreadsPerCore * cores;
}



// --predictions, checked before any work like --output: writable, none of the inputs, neither
// the table nor the results; and only where every run's per-image answers are at hand.
OutputPath prepare_predictions(const RunOptions& o,
                               const std::vector<std::pair<std::string, std::string>>& inputs) {
  if (o.predictions.empty()) return {};
  if (o.resume)
    throw UserError("--predictions with --resume: the trials taken from the results file have "
                    "no per-image predictions; run without --resume (or with a new --results)");
  if (!o.exit_policy.policy.empty())
    throw UserError("--predictions with --exit-policy: the file holds every exit's class "
                    "(exit_predicted), not the policy's choice; leave --exit-policy out");
  OutputPath predictions(o.predictions, "--predictions");
  refuse_same_file(o.predictions, "--predictions", o.output, "--output");
  refuse_same_file(o.predictions, "--predictions", o.results, "--results");
  for (const auto& [path, what] : inputs)
    refuse_same_file(o.predictions, "--predictions", path, what);
  return predictions;
}

// The per-image lines of every run, in the table's order (clean first, then trial by trial).
void write_predictions(const std::vector<TrialRecord>& records, const OutputPath& predictions) {
  OutputWriter writer(predictions);
  for (const TrialRecord& record : records)
    writer.write(record.prediction_lines.data(), record.prediction_lines.size());
  writer.commit();
}

}  // namespace

int run_plan(SweepPlan plan, const RunOptions& o,
             const std::vector<std::pair<std::string, std::string>>& read_files) {
  apply_run_options(o, plan);
  validate_plan(plan);
  tidy_sigmas(plan);
  if (o.print_config) {
    std::fputs(sweep_spec_text(plan).c_str(), stdout);
    return 0;
  }
  // Every file the run reads: neither the table nor the results may be one of them.
  std::vector<std::pair<std::string, std::string>> inputs;
  for (const SweepModel& m : plan.models) inputs.emplace_back(m.path, "model file");
  inputs.insert(inputs.end(), read_files.begin(), read_files.end());
  if (!plan.data_path.empty() && std::filesystem::is_regular_file(plan.data_path))
    inputs.emplace_back(plan.data_path, "--data");
  for (const auto& [path, what] : inputs) refuse_same_file(o.results, "--results", path, what);
  const OutputPath output = prepare_output(o, inputs);
  const OutputPath predictions = prepare_predictions(o, inputs);
  if (o.threads > 0) omp_set_num_threads(capped_threads(o.threads));
  SweepOptions options;
  options.results_path = o.results;
  options.resume = o.resume;
  options.wait_for_lock = o.wait_for_lock;
  options.show_progress = !o.quiet;
  if (!o.shard.empty()) std::tie(options.shard_index, options.shard_count) = parse_shard(o.shard);
  const std::vector<BackendResolution> workers = resolve_workers(o);
  for (const BackendResolution& w : workers) options.workers.push_back(w.choice);
  options.on_start = [&workers] { announce_backend(workers); };
  options.exit_policy = o.exit_policy;
  options.policy_on_cim = o.policy_on_cim;
  options.keep_predictions = !predictions.empty();
  const std::vector<TrialRecord> records = run_sweep(plan, options);
  if (!predictions.empty()) write_predictions(records, predictions);
  emit_table(records, o, output, plan.ci_width, plan.max_trials);
  return 0;
}

}  // namespace cimsweep
