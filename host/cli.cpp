#include "host/cli.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <tuple>
#include <iostream>
#include <limits>
#include <optional>
#include <sstream>
#include <thread>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "host/cim_cpu.h"
#include "host/errors.h"
#include "host/blockdrop_eval.h"
#include "host/exit_policy.h"
#include "host/model_file.h"
#include "host/plot_command.h"
#include "host/output_file.h"
#include "host/provenance_text.h"
#include "host/results.h"
#include "host/slurm.h"
#include "host/sweep.h"
#include "host/sweep_spec.h"
#include "train/blockdrop_command.h"
#include "train/train_command.h"

namespace cimsweep {
namespace {

// Options shared by `eval` and `sweep`.
struct RunOptions {
  std::vector<std::pair<std::string, std::string>> cim;  // CIM options in command-line order
  std::string data, split, results, format = "md", output, backend = "auto", shard, devices,
                                                            precision = "exact", predictions;
  // kNotGiven, a value nobody types, marks an option left out, so that a negative one is refused.
  static constexpr int kNotGiven = std::numeric_limits<int>::min();
  long long limit = kNotGiven;
  int trials = kNotGiven, first_trial = kNotGiven, threads = 0, device = 0;
  double ci_width = NAN;  // NaN: not given
  int min_trials = kNotGiven, max_trials = kNotGiven;
  bool resume = false, quiet = false, no_clean = false, policy_on_cim = false,
       wait_for_lock = false, force = false;
  ExitPolicyOptions exit_policy;  // --exit-policy and its calibration, --entropy-grid
};

void add_run_options(CLI::App* cmd, RunOptions& o) {
  cmd->add_option("--data", o.data,
                  "data set: CIFAR-10 binary, IDX(.gz) or image-folder path (default: Debian's "
                  "Fashion-MNIST, /usr/share/datasets/fashion-mnist)");
  cmd->add_option("--split", o.split, "test or train (default test)");
  cmd->add_option("--limit", o.limit, "class-balanced subset of N images (default all)");
  cmd->add_option("--trials", o.trials, "Monte-Carlo chips per σ (default 1)");
  cmd->add_option("--first-trial", o.first_trial, "number of the first trial (default 0)");
  cmd->add_option("--ci-width", o.ci_width,
                  "instead of --trials: run chips in rounds until every cell's 95 % interval is "
                  "at most ±W points (or --max-trials)");
  cmd->add_option("--min-trials", o.min_trials, "--ci-width: chips of the first round (default 10)");
  cmd->add_option("--max-trials", o.max_trials, "--ci-width: at most this many chips per cell "
                  "(default 5000); the table marks cells that stopped there");
  cmd->add_option("--results", o.results, "append every trial to this JSON Lines file");
  cmd->add_flag("--resume", o.resume, "continue the --results file, skipping finished trials");
  cmd->add_flag("--wait-for-lock", o.wait_for_lock,
                "another run is writing the --results file: wait for it to finish (then resume "
                "what it left) instead of stopping with an error");
  cmd->add_option("--format", o.format, "table format: md, csv or json (default md)");
  cmd->add_option("--output", o.output,
                  "write the table to this file (atomically; a device or pipe is written "
                  "straight) instead of stdout");
  cmd->add_flag("--no-clean", o.no_clean, "skip the clean (σ = 0, ADC ideal) reference run");
  cmd->add_option("--threads", o.threads, "CPU threads (default: all cores)");
  cmd->add_option("--backend", o.backend,
                  "auto (the GPU if a usable one is found, else the CPU), cpu or cuda (default auto)");
  cmd->add_option("--device", o.device, "GPU number (default 0)");
  cmd->add_option("--devices", o.devices,
                  "spread trials over these GPUs of one machine, e.g. 0,1,2,3 (with the CPU "
                  "backend: as many CPU workers)");
  cmd->add_option("--precision", o.precision,
                  "CUDA backend: exact (agrees with the CPU to ~1e-5) or fast (fp16 tensor "
                  "cores) (default exact)");
  cmd->add_flag("--quiet", o.quiet, "no progress line");
  cmd->add_option("--exit-policy", o.exit_policy.policy,
                  "multi-exit models: fixed:E, entropy:T1,T2,…, best-static, sigma-aware or "
                  "sigma-aware-learned (exits numbered 1 … E, E = final)");
  cmd->add_option(
      "--calibration", o.exit_policy.calibration_images,
      "images held apart (before --limit) to calibrate best-static/sigma-aware policies");
  cmd->add_option("--calibration-trials", o.exit_policy.calibration_trials,
                  "calibration chips per σ (default 3)");
  cmd->add_option("--mac-budget", o.exit_policy.mac_budget,
                  "best-static/sigma-aware: mean MACs per image at most this");
  cmd->add_flag("--policy-on-cim", o.policy_on_cim,
                "BlockDrop models (policy files from train-blockdrop): run the policy network on "
                "the simulated chip too, not digitally");
  cmd->add_option("--entropy-grid", o.exit_policy.entropy_grid,
                  "G: also evaluate G+1 shared entropy thresholds 0 … ln(classes) and print the "
                  "accuracy–compute frontier per σ");

  struct CimOption {
    const char* name;
    const char* help;
    bool flag;
  };
  static const CimOption cim_options[] = {
      {"weight-bits", "weight bits wb (default 8)", false},
      {"cell-bits", "bits per memory cell cb, divides wb (default 4)", false},
      {"input-bits", "input bits ab, fed bit-serially (default 8)", false},
      {"rows", "rows per sub-array R (default 128)", false},
      {"onoff", "on/off conductance ratio r, or inf (default 10)", false},
      {"weight-scaling", "maxabs or wage (default maxabs)", false},
      {"variation", "device (one draw per chip) or cycle (per read) (default device)", false},
      {"clamp-at-zero", "clamp varied conductances at 0", true},
      {"reference-variation", "vary the reference column's cells too", true},
      {"mapping", "kernel or dense (default kernel)", false},
      {"adc-bits", "ADC bits N (default 10)", false},
      {"adc", "dynamic, fixed, calibrated or ideal (default dynamic)", false},
      {"batch", "evaluation batch size; the dynamic ADC spans it (default 500)", false},
      {"digital-layers", "comma-separated layers computed digitally, e.g. conv1,fc", false},
      {"neurosim-scale", "divide by 2^wb·2^ab as NeuroSim does", true},
      {"seed", "sweep seed of the noise (default 1)", false},
  };
  for (const CimOption& opt : cim_options) {
    const std::string name = opt.name;
    if (opt.flag) {
      cmd->add_flag_callback(
          "--" + name, [&o, name] { o.cim.emplace_back(name, "true"); }, opt.help);
    } else {
      cmd->add_option_function<std::string>(
          "--" + name, [&o, name](const std::string& v) { o.cim.emplace_back(name, v); }, opt.help);
    }
  }
}

void apply_run_options(const RunOptions& o, SweepPlan& plan) {
  for (const auto& [name, value] : o.cim) set_cim_option(plan.cim, name, value);
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

// ci_width > 0: the table marks the cells that stopped at max_trials above the target.
void emit_table(const std::vector<TrialRecord>& records, const RunOptions& o,
                const OutputPath& output, double ci_width = 0, int max_trials = 0) {
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
OutputPath prepare_output(const RunOptions& o, const std::vector<std::pair<std::string, std::string>>& inputs) {
  if (o.output.empty()) return {};
  OutputPath output(o.output, "--output");
  refuse_same_file(o.output, "--output", o.results, "--results");
  for (const auto& [path, what] : inputs) refuse_same_file(o.output, "--output", path, what);
  return output;
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

int run_info(const std::string& path, const std::string& format) {
  if (format != "text" && format != "json")
    throw UserError("unknown --format '" + format + "': use text or json");
  const LoadedModel model = load_model(path);
  std::string backbone_line;
  if (is_blockdrop_policy(model)) {
    // A policy's network answers with the backbone's blocks, not classes: say whose, and stop
    // here when that backbone is missing or changed, as eval would.
    std::shared_ptr<const BlockDropModel> blockdrop;
    load_blockdrop(load_model(path), false, blockdrop);
    backbone_line = "blockdrop:   policy for backbone " + blockdrop->backbone_path + " (its " +
                    std::to_string(blockdrop->blocks()) +
                    " outputs are the backbone's residual blocks, not classes)\n";
  }
  if (format == "json") {  // the metadata as stored: every value the raw JSON string
    std::cout << nlohmann::json(model.metadata).dump(2) << "\n";
    return 0;
  }
  const ResNet& net = *model.network;
  std::cout << "model:       " << path << "\n";
  std::cout << "network:     " << net.arch().describe() << "\n" << backbone_line;
  std::cout << "parameters:  " << net.parameter_count() << "\n";
  const auto macs = net.layer_macs();
  int64_t total_macs = 0;
  for (int64_t m : macs) total_macs += m;
  std::cout << "MACs/image:  " << total_macs << " (CIM layers)\n";
  print_metadata_text(model.metadata, std::cout);
  // Crossbar usage under the default CIM model: sub-arrays of R rows, one column per output and
  // cell slice, plus a reference column per sub-array and slice.
  const CimConfig defaults;
  std::cout << "\nper-layer crossbar usage (default mapping '" << to_string(defaults.mapping)
            << "', R = " << defaults.subarray_rows << ", " << defaults.cells_per_weight()
            << " cells per weight):\n\n";
  std::cout << "| # | layer | kernel | stride | in → out | rows | sub-arrays | columns/sub-array | "
               "cells | a_max | MACs/image |\n| --- | --- | --- | --- | --- | --- | --- | --- | "
               "--- | --- | --- |\n";
  int64_t total_cells = 0;
  for (size_t i = 0; i < net.cim_layers().size(); ++i) {
    const CimLayerSpec& s = net.cim_layers()[i];
    const QuantisedLayer q = quantise_layer(s, int(i), defaults, false);
    const int columns = defaults.cells_per_weight() * (s.out_channels + 1);
    const int64_t cells = int64_t(q.subarrays()) * columns * defaults.subarray_rows;
    total_cells += cells;
    char line[512];
    std::snprintf(line, sizeof line,
                  "| %zu | %s | %d×%d | %d | %d → %d | %d | %d | %d | %lld | %.4g | %lld |\n", i,
                  s.name.c_str(), s.kernel_h, s.kernel_w, s.stride, s.in_channels, s.out_channels,
                  s.rows(), q.subarrays(), columns, (long long)cells, double(s.input_range),
                  (long long)macs[i]);
    std::cout << line;
  }
  std::cout << "\ncells in all sub-arrays (incl. unused rows and reference columns): "
            << total_cells << "\n";
  return 0;
}

int run_merge(std::vector<std::string> inputs, const RunOptions& o) {
  if (o.format != "md" && o.format != "csv" && o.format != "json")
    throw UserError("unknown --format '" + o.format + "': use md, csv or json");
  if (!std::isnan(o.ci_width) && !(o.ci_width > 0))
    throw UserError("--ci-width must be a half-width in points > 0, e.g. --ci-width 1");
  if (o.max_trials != RunOptions::kNotGiven && std::isnan(o.ci_width))
    throw UserError("--max-trials marks the cells of a --ci-width sweep: give --ci-width W too");
  std::vector<std::pair<std::string, std::string>> named_inputs;
  for (const std::string& input : inputs) named_inputs.emplace_back(input, "the merge input");
  const OutputPath output = prepare_output(o, named_inputs);
  OutputPath results;
  std::optional<ResultsFileLock> lock;
  if (!o.results.empty()) {
    results = OutputPath(o.results, "--results");
    // Not replaced while a sweep appends to it.
    lock.emplace(results.target(), o.wait_for_lock);
    // An existing merged file joins the inputs, so merging again (or with new shards) keeps it;
    // "among the inputs" by identity, so another spelling of it is not read twice.
    const FileIdentity merged = results.identity();
    const bool listed = std::any_of(inputs.begin(), inputs.end(), [&](const std::string& input) {
      return file_identity(input) == merged;
    });
    if (merged.new_name.empty() && merged.known && !listed) inputs.insert(inputs.begin(), o.results);
  }
  const std::vector<TrialRecord> records = merge_results(inputs, o.force);
  if (!results.empty()) write_results_file(results, records);
  const SweepPlan defaults;
  emit_table(records, o, output, std::isnan(o.ci_width) ? 0 : o.ci_width,
             o.max_trials != RunOptions::kNotGiven ? o.max_trials : defaults.max_trials);
  return 0;
}

}  // namespace

int run_cli(int argc, char** argv) {
  CLI::App app{
      "cimsweep: how accurate is this network on a compute-in-memory chip with noisy cells?\n"
      "Monte-Carlo sweeps of ResNets over conductance variation σ (see README.md)."};
  app.set_version_flag("--version", std::string("cimsweep ") + CIMSWEEP_VERSION);
  app.require_subcommand(1);

  std::string info_model;
  CLI::App* info =
      app.add_subcommand("info", "print a model's architecture, parameters and crossbar usage");
  std::string info_format = "text";
  info->add_option("model", info_model, "model file (.safetensors)")->required();
  info->add_option("--format", info_format,
                   "text (readable lines, default) or json (the metadata as stored)");

  RunOptions eval_options;
  std::string eval_model;
  double eval_sigma = 0;
  CLI::App* eval = app.add_subcommand("eval", "evaluate one model at one σ over one or more chips");
  eval->add_option("model", eval_model, "model file (.safetensors)")->required();
  eval->add_option("--sigma", eval_sigma, "conductance variation σ (default 0)");
  add_run_options(eval, eval_options);
  eval->add_option("--predictions", eval_options.predictions,
                   "write every image's label, predicted class and logits, per run (clean, "
                   "each trial), to this JSON Lines file (atomically)");

  RunOptions sweep_options;
  std::string spec_path, sigma_list;
  std::vector<std::string> sweep_models;
  CLI::App* sweep =
      app.add_subcommand("sweep", "run models × σ values × chips and print the accuracy table");
  sweep->add_option("models", sweep_models, "model files (or [[models]] in --spec)");
  sweep->add_option("--spec", spec_path, "sweep file (TOML), e.g. sweeps/fmnist-quick.toml");
  sweep->add_option("--sigmas", sigma_list, "comma-separated σ values, e.g. 0,0.05,0.1,0.15,0.2");
  add_run_options(sweep, sweep_options);
  sweep->add_option("--shard", sweep_options.shard,
                    "run only share I of N (0 ≤ I < N) of the work units, e.g. "
                    "--shard ${SLURM_ARRAY_TASK_ID}/8; `merge` joins the shards' --results");

  std::vector<std::string> merge_inputs;
  RunOptions merge_options;
  CLI::App* merge = app.add_subcommand(
      "merge", "join the results files of a sharded sweep and print the accuracy table");
  merge->add_option("files", merge_inputs, "results files (JSON Lines) of the shards")->required();
  merge->add_option("--results", merge_options.results,
                    "write the merged results here (atomically; an existing file is merged too)");
  merge->add_option("--format", merge_options.format, "table format: md, csv or json (default md)");
  merge->add_option("--output", merge_options.output,
                    "write the table to this file (atomically; a device or pipe is written "
                    "straight) instead of stdout");
  merge->add_flag("--force", merge_options.force,
                  "merge models run on different data or CIM settings into one table anyway");
  merge->add_flag("--wait-for-lock", merge_options.wait_for_lock,
                  "a sweep is writing the --results file: wait for it instead of an error");
  merge->add_option("--ci-width", merge_options.ci_width,
                    "the shards ran with --ci-width W: mark the cells that stopped at the cap");
  merge->add_option("--max-trials", merge_options.max_trials,
                    "with --ci-width: the shards' --max-trials (default 5000)");

  SlurmOptions slurm_options;
  CLI::App* slurm = add_slurm_subcommand(app, slurm_options);

  PlotOptions plot_options;
  CLI::App* plot = setup_plot(app, plot_options);

  train::TrainCommand train_command(app);
  train::BlockDropCommand blockdrop_command(app);

  try {
    try {
      app.parse(argc, argv);
    } catch (const CLI::ParseError& e) {
      return app.exit(e);
    }
    if (info->parsed()) return run_info(info_model, info_format);
    if (slurm->parsed()) return run_slurm(slurm_options, std::cout);
    if (merge->parsed()) return run_merge(merge_inputs, merge_options);
    if (plot->parsed()) return run_plot(plot_options);
    if (train_command.parsed()) return train_command.run(argc, argv);
    if (blockdrop_command.parsed()) return blockdrop_command.run(argc, argv);

    const bool is_eval = eval->parsed();
    RunOptions& o = is_eval ? eval_options : sweep_options;
    SweepPlan plan;
    if (is_eval) {
      plan.name = "eval";
      plan.models.push_back({default_label(eval_model), eval_model});
      plan.sigmas = {eval_sigma};
    } else {
      if (!spec_path.empty()) plan = read_sweep_spec(spec_path);
      if (!sweep_models.empty()) {
        plan.models.clear();
        for (const auto& m : sweep_models) plan.models.push_back({default_label(m), m});
      }
      if (!sigma_list.empty()) plan.sigmas = parse_sigma_list(sigma_list, "σ list");
    }
    apply_run_options(o, plan);
    validate_plan(plan);
    tidy_sigmas(plan);
    // Every file the run reads: neither the table nor the results may be one of them.
    std::vector<std::pair<std::string, std::string>> inputs;
    for (const SweepModel& m : plan.models) inputs.emplace_back(m.path, "model file");
    if (!spec_path.empty()) inputs.emplace_back(spec_path, "the sweep file");
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
  } catch (const UserError& e) {
    std::fprintf(stderr, "cimsweep: error: %s\n", e.what());
    return 2;
  } catch (const std::bad_alloc&) {
    std::fprintf(stderr, "cimsweep: error: out of memory: use a smaller --batch\n");
    return 3;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "cimsweep: internal error: %s (please report it)\n", e.what());
    return 4;
  }
}

}  // namespace cimsweep
