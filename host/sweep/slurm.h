// `cimsweep slurm`: turns a sweep file into a Slurm job array (task i runs share i of the sweep's
// work units into its own results file) plus a merge job that runs once every task succeeded, and
// optionally submits both with sbatch.
#pragma once
#include <iosfwd>
#include <string>
#include <vector>

#include "common/cim_config.h"
#include "host/run_command.h"  // shell_quote, used by the scripts

namespace cimsweep {

// The most array tasks a job may have: --shards and --only-tasks are checked against it.
constexpr int kMaxSlurmShards = 100000;

struct SlurmOptions {
  std::string spec_path;    // sweep file; written into the scripts as an absolute path
  int shards = 0;           // array tasks 0 … shards − 1, one share of the work units each
  std::string results_dir;  // shard-I.jsonl, merged.jsonl, table.md, logs/ and the scripts

  // sbatch resources; empty or 0: the cluster's default (not written into the script).
  std::string partition, account, time, mem;
  int gpus_per_task = 1;                  // --gres=gpu:G per task; 0 on CPU-only clusters
  int cpus_per_task = 0;                  // also the sweep's OpenMP threads
  int max_parallel = 0;                   // the array's %K throttle
  std::vector<std::string> extra_sbatch;  // verbatim #SBATCH options of both jobs, e.g. --qos=high

  std::string script_path;      // array script; empty: results_dir/cimsweep-<name>[-retry].sbatch
  std::vector<int> only_tasks;  // resubmit these array tasks alone (ascending, unique); empty: all
  bool submit = false;          // run sbatch now instead of printing the commands

  // Options passed on to every task's `cimsweep sweep`; empty or negative: the sweep file's.
  std::string data, split, sigmas, backend;
  long long limit = -1;
  int trials = -1, first_trial = -1, threads = 0;
  double ci_width = 0;                    // --ci-width W: the tasks' stopping rule (0: none)
  int min_trials = -1, max_trials = -1;
  bool no_clean = false;
  CimOptionValues cim;  // --adc, --adc-bits, …: each task's sweep gets them, in this order

  std::string binary;             // cimsweep the tasks run; empty: this process's /proc/self/exe
  std::string sbatch = "sbatch";  // the sbatch program (a name is looked up in PATH)
};

// Validates the options and the sweep file, writes both scripts and the logs/ directory, then
// submits them (options.submit) or prints the sbatch commands to `out`. Returns the exit code.
// Throws UserError on anything the user can fix.
int run_slurm(SlurmOptions options, std::ostream& out);

// The pieces of run_slurm, public for the tests.

// What run_slurm writes, with every path absolute.
struct SlurmJob {
  SlurmOptions options;  // normalised: absolute paths, binary filled in
  std::string name;      // sweep name, sanitised for a job name
  std::string array_script_path, merge_script_path;
  // The stopping rule the tasks run with (sweep file or options): the merge marks capped cells.
  double ci_width = 0;
  int max_trials = 0;
};

// Checks and normalises the options (absolute paths, sweep file readable, resources well formed)
// and creates results_dir/logs. Throws UserError with one line on the first problem found.
SlurmJob plan_slurm_job(const SlurmOptions& options);

std::string array_script(const SlurmJob& job);
std::string merge_script(const SlurmJob& job);

// The value of #SBATCH --array: "0-(N-1)" or the listed tasks "3,7", then "%K" when throttled.
std::string array_indexes(int shards, const std::vector<int>& only_tasks, int max_parallel);

// "3,7,10" → {3, 7, 10}, sorted and unique, each in [0, shards). UserError otherwise.
std::vector<int> parse_task_list(const std::string& text, int shards);

// Whether text is one of sbatch's --time formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S (minutes
// and seconds below 60, hours after a day count below 24), or UNLIMITED / INFINITE.
bool is_slurm_time(const std::string& text);

// What `sbatch --parsable` printed as the job id: "1234" or "1234;cluster" (its last non-empty
// line, as sbatch may print warnings before it). UserError when there is none.
std::string parse_sbatch_job_id(const std::string& parsable_output);

// `cimsweep slurm …` with the same options, retrying only `tasks`, as a shell command line.
std::string resubmit_command(const SlurmJob& job, const std::string& tasks);

}  // namespace cimsweep
