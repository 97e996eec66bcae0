#include "host/cli/slurm.h"

#include <CLI/CLI.hpp>

#include "host/cli/run_options.h"

namespace cimsweep {

CLI::App* setup_slurm(CLI::App& app, SlurmOptions& o) {
  CLI::App* cmd = app.add_subcommand(
      "slurm",
      "write (and --submit) a Slurm job array running a sweep in N shards, plus its merge job");
  cmd->add_option("spec", o.spec_path, "sweep file (TOML), e.g. sweeps/fmnist-quick.toml")
      ->required();
  cmd->add_option("--shards", o.shards,
                  "array tasks 0 … N−1; task I runs share I/N of the work units (1 … 100000)")
      ->required();
  cmd->add_option("--results-dir", o.results_dir,
                  "shard-I.jsonl, merged.jsonl, table.md, logs/ and the scripts go here "
                  "(on a file system every node sees)")
      ->required();
  cmd->add_option("--partition", o.partition, "Slurm partition (default: the cluster's)");
  cmd->add_option("--account", o.account, "Slurm account to charge (default: yours)");
  cmd->add_option("--time", o.time, "time limit per task, e.g. 02:00:00 or 1-00:00:00");
  cmd->add_option("--gpus-per-task", o.gpus_per_task,
                  "GPUs per task as --gres=gpu:G (default 1; 0 on CPU-only clusters)");
  cmd->add_option("--cpus-per-task", o.cpus_per_task, "CPU cores per task, also its threads");
  cmd->add_option("--mem", o.mem, "memory per task, e.g. 16G (default: the cluster's)");
  cmd->add_option("--max-parallel", o.max_parallel, "at most K tasks running at once (%K)");
  cmd->add_option("--extra-sbatch", o.extra_sbatch,
                  "one more #SBATCH option for both jobs, e.g. --extra-sbatch=--qos=high or "
                  "--extra-sbatch qos=high (repeatable)")
      ->allow_extra_args(false);
  cmd->add_option("--script", o.script_path,
                  "path of the array script (default: RESULTS_DIR/cimsweep-<name>.sbatch); the "
                  "merge script goes next to it as …-merge.sbatch");
  cmd->add_option_function<std::string>(
      "--only-tasks",
      [&o](const std::string& v) { o.only_tasks = parse_task_list(v, kMaxSlurmShards); },
      "resubmit only these array tasks, e.g. 3,7 (0-based), and a new merge job after them");
  cmd->add_flag("--submit", o.submit, "submit both jobs with sbatch now");
  // What each task's sweep computes: the options eval and sweep take, passed on as given.
  add_computation_options(*cmd, o);
  cmd->get_option("--ci-width")
      ->description("passed to every task's sweep (shards then take whole cells); the merge "
                    "marks the cells that hit --max-trials");
  cmd->get_option("--threads")
      ->description("threads per task (default: --cpus-per-task, else all cores of the node)");
  cmd->add_option("--sigmas", o.sigmas, "comma-separated σ values, e.g. 0,0.05,0.1 (default: the "
                  "sweep file's)");
  return cmd;
}

}  // namespace cimsweep
