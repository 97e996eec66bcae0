#include "host/sweep/runner.h"

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <exception>
#include <filesystem>
#include <memory>
#include <mutex>
#include <optional>
#include <sstream>
#include <thread>
#include <unordered_map>

#include "host/io/dataset.h"
#include "common/errors.h"
#include "host/sweep/evaluate.h"
#include "host/io/model_file.h"
#include "host/progress.h"

namespace cimsweep {

std::string default_data_path() {
  return "/usr/share/datasets/fashion-mnist";
}

namespace {

// Calibration images, when an exit policy asks for them, are held apart before --limit picks the
// evaluation images from the rest.
Dataset load_plan_data(const SweepPlan& plan, size_t calibration_images,
                       std::optional<CalibrationImages>& calibration) {
  std::string path = plan.data_path.empty() ? default_data_path() : plan.data_path;
  if (plan.data_path.empty() && !std::filesystem::exists(path))
    throw UserError("no --data given and Fashion-MNIST is not installed at " + path +
                    ": run `apt-get install dataset-fashion-mnist` or pass --data PATH");
  Dataset data = load_dataset(path, plan.split);
  if (calibration_images > 0) {
    CalibrationSplit split = split_for_calibration(data, calibration_images, plan.cim.seed);
    calibration.emplace(std::move(split.calibration));
    data = std::move(split.evaluation);
  }
  if (plan.limit > data.size())
    std::fprintf(stderr,
                 "cimsweep: note: --limit %zu is more than the %zu images of %s: all of them are "
                 "used\n",
                 plan.limit, data.size(), data.description.c_str());
  if (plan.limit > 0 && plan.limit < data.size()) {
    Dataset subset = balanced_subset(data, plan.limit);
    subset.description += " (class-balanced " + std::to_string(subset.size()) + " images)";
    return subset;
  }
  return data;
}

std::string sigma_text(double sigma) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", sigma);
  return buf;
}

}  // namespace

std::pair<int, int> parse_shard(const std::string& text) {
  const std::string usage = "--shard '" + text +
                            "' is not I/N with 0 ≤ I < N: use e.g. --shard 0/4 … --shard 3/4 "
                            "(Slurm: --shard ${SLURM_ARRAY_TASK_ID}/N with --array=0-(N-1))";
  const size_t slash = text.find('/');
  if (slash == std::string::npos) throw UserError(usage);
  const std::string a = text.substr(0, slash), b = text.substr(slash + 1);
  auto number = [&](const std::string& part) {
    if (part.empty() || part.size() > 9 || part.find_first_not_of("0123456789") != std::string::npos)
      throw UserError(usage);
    return std::stoi(part);
  };
  const int index = number(a), count = number(b);
  if (count < 1 || index >= count) throw UserError(usage);
  return {index, count};
}

std::vector<int> parse_device_list(const std::string& text) {
  std::vector<int> devices;
  std::stringstream ss(text);
  std::string item;
  while (std::getline(ss, item, ',')) {
    if (item.empty() || item.size() > 4 || item.find_first_not_of("0123456789") != std::string::npos)
      throw UserError("--devices '" + text +
                      "' is not a list of device numbers: use e.g. --devices 0,1,2,3");
    const int device = std::stoi(item);
    if (std::find(devices.begin(), devices.end(), device) != devices.end())
      throw UserError("--devices '" + text + "' names device " + item +
                      " twice: list each device once");
    devices.push_back(device);
  }
  if (devices.empty())
    throw UserError("--devices is empty: use e.g. --devices 0,1 or leave it out for one device");
  return devices;
}

std::vector<TrialRecord> run_sweep(const SweepPlan& plan, const SweepOptions& options) {
  validate_plan(plan);
  if (options.shard_count < 1 || options.shard_index < 0 ||
      options.shard_index >= options.shard_count)
    throw UserError("shard " + std::to_string(options.shard_index) + "/" +
                    std::to_string(options.shard_count) + " does not exist: use 0 ≤ I < N");
  options.exit_policy.validate();
  const bool calibrating = !options.exit_policy.policy.empty() &&
                           parse_exit_policy(options.exit_policy.policy).needs_calibration();
  // The shard's work units are planned (and kept) in memory; a sweep too big for that is one
  // for more shards, and saying so beats running out of memory half-way through planning.
  // (validate_plan keeps every trial number below the calibration chips' 2^30.)
  // At σ = 0 nothing varies, so every chip is the same chip: a σ = 0 cell runs one, trial
  // first_trial, whatever --trials asks (aggregate() reports its interval as zero width).
  auto one_chip = [](double sigma) { return sigma == 0; };
  auto chips_at = [&](double sigma) -> int64_t { return one_chip(sigma) ? 1 : plan.trials; };
  int64_t units_per_model = plan.clean_reference ? 1 : 0;
  for (double sigma : plan.sigmas) units_per_model += chips_at(sigma);
  const int64_t total_units = units_per_model * int64_t(plan.models.size());
  const int64_t shard_units =
      total_units / options.shard_count + (options.shard_index < total_units % options.shard_count);
  if (!plan.adaptive() && shard_units > kMaxUnitsPerRun)
    throw UserError("this run has " + std::to_string(shard_units) + " work units (models × σ × " +
                    "trials), more than the " + std::to_string(kMaxUnitsPerRun) +
                    " one run plans: split it with --shard I/N, N ≥ " +
                    std::to_string((total_units + kMaxUnitsPerRun - 1) / kMaxUnitsPerRun) +
                    ", or run fewer --trials");
  std::optional<CalibrationImages> calibration;
  const Dataset data =
      load_plan_data(plan, calibrating ? options.exit_policy.calibration_images : 0, calibration);
  std::vector<BackendChoice> workers = options.workers;
  if (workers.empty()) workers.push_back(BackendChoice{});

  std::vector<LoadedModel> models;
  models.reserve(plan.models.size());
  // A policy file stands for its backbone run with the policy's keep masks.
  std::vector<std::shared_ptr<const BlockDropModel>> blockdrops(plan.models.size());
  for (size_t m = 0; m < plan.models.size(); ++m) {
    LoadedModel loaded = load_model(plan.models[m].path);
    if (is_blockdrop_policy(loaded))
      loaded = load_blockdrop(std::move(loaded), options.policy_on_cim, blockdrops[m]);
    models.push_back(std::move(loaded));
  }
  if (options.policy_on_cim &&
      std::none_of(blockdrops.begin(), blockdrops.end(), [](const auto& b) { return bool(b); }))
    std::fprintf(stderr,
                 "cimsweep: note: --policy-on-cim has no effect: no model of this run is a "
                 "BlockDrop policy file (train-blockdrop writes those)\n");

  // One policy per model (calibrated below, once its trials are known to be needed).
  std::vector<std::shared_ptr<ExitPolicy>> policies(models.size());
  if (options.exit_policy.any()) {
    std::vector<double> policy_sigmas = plan.sigmas;
    if (plan.clean_reference) policy_sigmas.push_back(0.0);  // the clean run decides at σ = 0
    for (size_t m = 0; m < models.size(); ++m) {
      policies[m] = std::make_shared<ExitPolicy>(options.exit_policy, *models[m].network,
                                                 plan.models[m].path, policy_sigmas, plan.cim.seed);
    }
  }

  // Every worker has its own runner (and so its own backend and chip) per model. The first
  // worker's are built here, so that a model/data mismatch or a parameter the backend rejects stops the sweep before any
  // results file is created; the others are built in their worker threads, on demand.
  const int worker_count = int(workers.size());
  std::vector<std::vector<std::unique_ptr<TrialRunner>>> runners(workers.size());
  for (size_t m = 0; m < models.size(); ++m) {
    runners[0].push_back(
        std::make_unique<TrialRunner>(models[m], data, plan.cim, plan.models[m].label, workers[0]));
    runners[0][m]->set_exit_policy(policies[m]);
    runners[0][m]->set_blockdrop(blockdrops[m]);
    runners[0][m]->set_sweep_sigmas(plan.sigmas);
    runners[0][m]->set_keep_predictions(options.keep_predictions);
  }

  std::unique_ptr<ResultsLog> log;
  if (!options.results_path.empty())
    log = std::make_unique<ResultsLog>(options.results_path, options.resume, options.wait_for_lock);
  // The finished trials of the results file by unit key (its records are already one per unit).
  std::unordered_map<std::string, const TrialRecord*> finished;
  if (log)
    for (const TrialRecord& r : log->existing()) finished.emplace(unit_key(r), &r);
  // Trials of a model under other settings stay in the file but are not reused; a changed option
  // is the usual cause, and without this line the rerun of every trial would go unexplained.
  for (size_t m = 0; log && m < models.size(); ++m) {
    const std::string hash = runners[0][m]->config_hash();
    const auto other_settings = std::count_if(
        log->existing().begin(), log->existing().end(), [&](const TrialRecord& record) {
          return record.model == plan.models[m].label && record.config_hash != hash;
        });
    if (other_settings > 0) {
      std::fprintf(stderr,
                   "cimsweep: note: '%s' holds %zu trials of '%s' under other settings (model "
                   "file, data or CIM options); they are kept but not reused\n",
                   options.results_path.c_str(), size_t(other_settings),
                   plan.models[m].label.c_str());
    }
  }

  // A work unit is one chip (or the clean reference, trial −1) of one model at one σ.
  struct Unit {
    size_t model;
    double sigma;
    int trial;
  };
  auto unit_record_key = [&](const Unit& unit) {
    TrialRecord key;
    key.model = plan.models[unit.model].label;
    key.config_hash = runners[0][unit.model]->config_hash();
    key.sigma = unit.sigma;
    key.trial = unit.trial;
    return unit_key(key);
  };

  if (options.on_start) options.on_start();
  // Calibration runs only for models with trials still to do (a finished --resume skips it), on
  // its own runner over the calibration images, never on the evaluation images.
  std::vector<bool> calibrated(models.size(), false);
  auto calibrate_if_needed = [&](size_t m) {
    if (calibrated[m] || !policies[m] || !policies[m]->needs_calibration()) return;
    calibrated[m] = true;
    std::unique_ptr<TrialRunner> calibration_runner;
    policies[m]->calibrate(
        *calibration, [&](const CalibrationImages& images, double sigma, uint32_t trial) {
          if (!calibration_runner) {
            calibration_runner = std::make_unique<TrialRunner>(models[m], images.data(), plan.cim,
                                                               plan.models[m].label, workers[0]);
            calibration_runner->set_blockdrop(blockdrops[m]);
          }
          return calibration_runner->observe_trial(sigma, trial);
        });
  };

  const int total_threads = omp_get_max_threads();
  // The records of `units` (in their order): those of the results file reused, the others run
  // by the workers, which take them from one queue, and appended as they finish.
  auto run_units = [&](const std::vector<Unit>& units) {
    std::vector<std::optional<TrialRecord>> slots(units.size());
    std::vector<size_t> todo;  // indexes into units
    for (size_t i = 0; i < units.size(); ++i) {
      if (auto done = finished.find(unit_record_key(units[i])); done != finished.end()) {
        slots[i] = *done->second;
      } else {
        todo.push_back(i);
      }
    }
    for (size_t i : todo) calibrate_if_needed(units[i].model);
    Progress progress(todo.size(), data.size(), options.show_progress, worker_count);
    std::atomic<size_t> next{0};
    std::mutex error_mutex;
    std::exception_ptr first_error;
    std::atomic<bool> failed{false};
    auto work = [&](int w) {
      try {
        if (worker_count > 1) omp_set_num_threads(std::max(1, total_threads / worker_count));
        runners[size_t(w)].resize(models.size());  // no-op for worker 0
        for (size_t i = next++; i < todo.size() && !failed; i = next++) {
          const Unit& unit = units[todo[i]];
          std::unique_ptr<TrialRunner>& runner_slot = runners[size_t(w)][unit.model];
          if (!runner_slot) {
            runner_slot =
                std::make_unique<TrialRunner>(models[unit.model], data, plan.cim,
                                              plan.models[unit.model].label, workers[size_t(w)]);
            runner_slot->set_exit_policy(policies[unit.model]);
            runner_slot->set_blockdrop(blockdrops[unit.model]);
            runner_slot->set_sweep_sigmas(plan.sigmas);
            runner_slot->set_keep_predictions(options.keep_predictions);
          }
          TrialRunner& runner = *runner_slot;
          const std::string what = plan.models[unit.model].label +
                                   (unit.trial < 0 ? " clean"
                                                   : " σ=" + sigma_text(unit.sigma) + " trial " +
                                                         std::to_string(unit.trial));
          progress.start_unit(w, what);
          auto on_batch = [&](size_t done) { progress.images_done(w, done); };
          TrialRecord record = unit.trial < 0 ? runner.run_clean(on_batch)
                                              : runner.run_trial(unit.sigma, unit.trial, on_batch);
          if (worker_count > 1) record.extra["worker"] = w;
          if (log) log->append(record);
          slots[todo[i]] = std::move(record);
          progress.unit_done(w);
        }
      } catch (...) {
        std::lock_guard<std::mutex> lock(error_mutex);
        if (!first_error) first_error = std::current_exception();
        failed = true;
      }
    };
    if (worker_count == 1) {
      work(0);
    } else {
      std::vector<std::thread> threads;
      for (int w = 0; w < worker_count; ++w) threads.emplace_back(work, w);
      for (std::thread& t : threads) t.join();
    }
    progress.finish();
    if (first_error) std::rethrow_exception(first_error);
    std::vector<TrialRecord> records;
    records.reserve(slots.size());
    for (auto& slot : slots) records.push_back(std::move(*slot));
    return records;
  };

  if (!plan.adaptive()) {
    // Work units in a fixed order: per model its clean reference, then σ-major, trial-minor (one
    // trial at σ = 0). The
    // shard is chosen by position in this order, so it is the same on every node. Only this
    // shard's positions are visited (every shard_count-th), decoded arithmetically: planning
    // costs the shard's units, not the whole sweep's.
    std::vector<Unit> units;
    units.reserve(size_t(shard_units));
    const int64_t clean_units = plan.clean_reference ? 1 : 0;
    for (int64_t position = options.shard_index; position < total_units;
         position += options.shard_count) {
      const size_t m = size_t(position / units_per_model);
      const int64_t local = position % units_per_model;
      Unit unit{m, 0.0, -1};
      if (local >= clean_units) {
        int64_t index = local - clean_units;
        size_t k = 0;
        while (index >= chips_at(plan.sigmas[k])) index -= chips_at(plan.sigmas[k++]);
        unit.sigma = plan.sigmas[k];
        unit.trial = int(plan.first_trial + index);
      }
      units.push_back(unit);
    }
    if (options.shard_count > 1 && units.empty())
      std::fprintf(stderr,
                   "cimsweep: shard %d/%d has no work units (the sweep has %lld): nothing to do\n",
                   options.shard_index, options.shard_count, (long long)total_units);
    return run_units(units);
  }

  // The stopping rule (--ci-width). A cell is a model's clean reference or one (model, σ) with
  // its chips first_trial, first_trial + 1, …; cells are numbered in plan order and cell c
  // belongs to shard c mod N. Whether a cell needs another round depends on its own chips alone,
  // and a round always runs whole, so a shard, a resumed run and the unsharded sweep reach the
  // same stopping point with the same chips.
  struct Cell {
    size_t model;
    double sigma;
    bool clean;
    int wanted;  // chips the cell needs so far (its next round ends there)
    bool settled = false;
    std::vector<TrialRecord> records;  // trial order
  };
  std::vector<Cell> cells;
  size_t cell_number = 0;
  for (size_t m = 0; m < models.size(); ++m) {
    auto add = [&](double sigma, bool clean) {
      if (int(cell_number++ % size_t(options.shard_count)) == options.shard_index)
        cells.push_back({m, sigma, clean, clean || one_chip(sigma) ? 1 : plan.min_trials});
    };
    if (plan.clean_reference) add(0.0, true);
    for (double sigma : plan.sigmas) add(sigma, false);
  }
  if (options.shard_count > 1 && cells.empty())
    std::fprintf(stderr,
                 "cimsweep: shard %d/%d has no cells (the sweep has %zu: clean references and "
                 "(model, σ) cells; with --ci-width shards take whole cells): nothing to do\n",
                 options.shard_index, options.shard_count, cell_number);
  for (;;) {
    std::vector<Unit> round;
    std::vector<size_t> owner;  // cell of each unit
    for (size_t c = 0; c < cells.size(); ++c) {
      Cell& cell = cells[c];
      if (cell.settled) continue;
      if (cell.clean) {
        round.push_back({cell.model, 0.0, -1});
        owner.push_back(c);
        continue;
      }
      for (int k = int(cell.records.size()); k < cell.wanted; ++k) {
        round.push_back({cell.model, cell.sigma, plan.first_trial + k});
        owner.push_back(c);
      }
    }
    if (round.empty()) break;
    std::vector<TrialRecord> done = run_units(round);
    for (size_t i = 0; i < done.size(); ++i) cells[owner[i]].records.push_back(std::move(done[i]));
    for (Cell& cell : cells) {
      if (cell.settled) continue;
      if (cell.clean || one_chip(cell.sigma)) {  // one run: the clean one, or σ = 0
        cell.settled = true;
        continue;
      }
      cell.wanted = next_round_size(cell.records, plan.ci_width, plan.min_trials, plan.max_trials);
      cell.settled = cell.wanted <= int(cell.records.size());
    }
  }
  std::vector<TrialRecord> records;
  for (Cell& cell : cells)
    for (TrialRecord& record : cell.records) records.push_back(std::move(record));
  return records;
}

int next_round_size(const std::vector<TrialRecord>& chips, double ci_width, int min_trials,
                    int max_trials) {
  const int n = int(chips.size());
  if (n < min_trials) return min_trials;
  if (n >= max_trials) return n;
  std::vector<double> accuracies;
  for (const TrialRecord& chip : chips)
    if (!std::isnan(chip.accuracy)) accuracies.push_back(chip.accuracy);
  const double half_width = interval_half_width(summarize(accuracies));
  if (half_width <= ci_width) return n;
  // The half-width falls like 1/√n: aim at the n that reaches the target, 10 % beyond it, but at
  // most double n in one round (a standard deviation from few chips can be far off) and at least
  // add min_trials (rounds of one chip would keep every worker but one idle).
  double aimed = std::isnan(half_width) ? 2.0 * n
                                        : 1.1 * n * (half_width / ci_width) * (half_width / ci_width);
  aimed = std::min(aimed, 2.0 * n);
  const int64_t wanted = std::max<int64_t>(int64_t(n) + min_trials, int64_t(std::ceil(aimed)));
  return int(std::min<int64_t>(wanted, max_trials));
}

}  // namespace cimsweep
