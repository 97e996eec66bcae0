#include "host/sweep.h"

#include <cstdio>
#include <filesystem>
#include <memory>

#include "host/dataset.h"
#include "host/errors.h"
#include "host/evaluate.h"
#include "host/model_file.h"
#include "host/progress.h"

namespace cimsweep {

std::string default_data_path() {
  return "/usr/share/datasets/fashion-mnist";
}

namespace {

Dataset load_plan_data(const SweepPlan& plan) {
  std::string path = plan.data_path.empty() ? default_data_path() : plan.data_path;
  if (plan.data_path.empty() && !std::filesystem::exists(path))
    throw UserError("no --data given and Fashion-MNIST is not installed at " + path +
                    ": run `apt-get install dataset-fashion-mnist` or pass --data PATH");
  Dataset data = load_dataset(path, plan.split);
  if (plan.limit > 0) {
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

std::vector<TrialRecord> run_sweep(const SweepPlan& plan, const SweepOptions& options) {
  validate_plan(plan);
  const Dataset data = load_plan_data(plan);

  struct ModelRun {
    SweepModel entry;
    LoadedModel model;
    std::unique_ptr<TrialRunner> runner;
  };
  std::vector<std::unique_ptr<ModelRun>> runs;
  for (const SweepModel& entry : plan.models) {
    auto run = std::make_unique<ModelRun>();
    run->entry = entry;
    run->model = load_model(entry.path);
    run->runner = std::make_unique<TrialRunner>(run->model, data, plan.cim, entry.label);
    runs.push_back(std::move(run));
  }

  std::unique_ptr<ResultsLog> log;
  if (!options.results_path.empty())
    log = std::make_unique<ResultsLog>(options.results_path, options.resume);

  // Work units in a fixed order: per model its clean reference, then σ-major, trial-minor.
  struct Unit {
    ModelRun* run;
    double sigma;
    int trial;
  };
  std::vector<Unit> todo;
  std::vector<TrialRecord> records;
  for (auto& run : runs) {
    std::vector<Unit> units;
    if (plan.clean_reference) units.push_back({run.get(), 0.0, -1});
    for (double sigma : plan.sigmas)
      for (int t = plan.first_trial; t < plan.first_trial + plan.trials; ++t)
        units.push_back({run.get(), sigma, t});
    for (const Unit& unit : units) {
      TrialRecord key;
      key.model = run->entry.label;
      key.config_hash = run->runner->config_hash();
      key.sigma = unit.sigma;
      key.trial = unit.trial;
      if (log && log->has(key)) {
        for (const TrialRecord& r : log->existing())
          if (unit_key(r) == unit_key(key)) records.push_back(r);
      } else {
        todo.push_back(unit);
      }
    }
  }

  if (options.on_start) options.on_start();
  Progress progress(todo.size(), options.show_progress);
  for (const Unit& unit : todo) {
    const std::string what =
        unit.run->entry.label +
        (unit.trial < 0 ? " clean"
                        : " σ=" + sigma_text(unit.sigma) + " trial " + std::to_string(unit.trial));
    progress.start_unit(what, data.size());
    auto on_batch = [&](size_t done) { progress.images_done(done); };
    TrialRecord record = unit.trial < 0
                             ? unit.run->runner->run_clean(on_batch)
                             : unit.run->runner->run_trial(unit.sigma, unit.trial, on_batch);
    if (log) log->append(record);
    records.push_back(record);
    progress.unit_done();
  }
  progress.finish();
  return records;
}

}  // namespace cimsweep
