#include "host/cli/sweep.h"

#include <CLI/CLI.hpp>

namespace cimsweep {

CLI::App* setup_sweep(CLI::App& app, SweepCommandOptions& o) {
  CLI::App* command =
      app.add_subcommand("sweep", "run models × σ values × chips and print the accuracy table");
  command->add_option("models", o.models, "model files (or [[models]] in --spec)");
  command->add_option("--spec", o.spec_path, "sweep file (TOML), e.g. sweeps/fmnist-quick.toml");
  command->add_option("--sigmas", o.sigmas, "comma-separated σ values, e.g. 0,0.05,0.1,0.15,0.2");
  add_run_options(*command, o.run);
  command->add_option("--shard", o.run.shard,
                      "run only share I of N (0 ≤ I < N) of the work units, e.g. "
                      "--shard ${SLURM_ARRAY_TASK_ID}/8; `merge` joins the shards' --results");
  return command;
}

int run_sweep_command(const SweepCommandOptions& o) {
  SweepPlan plan;
  if (!o.spec_path.empty()) plan = read_sweep_spec(o.spec_path);
  if (!o.models.empty()) {
    plan.models.clear();
    for (const std::string& m : o.models) plan.models.push_back({default_label(m), m});
  }
  if (!o.sigmas.empty()) plan.sigmas = parse_sigma_list(o.sigmas, "σ list");
  std::vector<std::pair<std::string, std::string>> read_files;
  if (!o.spec_path.empty()) read_files.emplace_back(o.spec_path, "the sweep file");
  return run_plan(plan, o.run, read_files);
}

}  // namespace cimsweep
