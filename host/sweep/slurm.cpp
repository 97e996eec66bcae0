#include "host/sweep/slurm.h"

#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <optional>
#include <ostream>
#include <regex>
#include <sstream>

#include <nlohmann/json.hpp>

#include "common/errors.h"
#include "host/io/output_file.h"
#include "host/results/results.h"
#include "host/run_command.h"
#include "host/sweep/runner.h"
#include "host/sweep/sweep_spec.h"

namespace cimsweep {
namespace fs = std::filesystem;
namespace {

// The merge reads JSON Lines and aggregates: minutes at most, and a short limit lets the
// scheduler backfill it early.
constexpr long kMergeMinutes = 30;

std::string absolute_path(const std::string& path) {
  return fs::absolute(fs::path(path)).lexically_normal().string();
}

// sbatch reads #SBATCH lines without a shell, and expands %-patterns in --output: a path that
// goes there must be plain.
void require_sbatch_safe_path(const std::string& path, const std::string& what) {
  if (path.find_first_of(" \t\n\r'\"%\\") != std::string::npos) {
    throw UserError(what + " '" + path +
                    "' holds a space, quote, backslash or '%', which #SBATCH lines cannot carry: "
                    "choose a path without them");
  }
}

void require_one_word(const std::string& value, const std::string& option) {
  if (value.find_first_of(" \t\n\r'\"") != std::string::npos)
    throw UserError(option + " '" + value + "' holds a space or quote: give a single Slurm name");
}

// Minutes of a Slurm time limit, or nullopt when text is not one of sbatch's formats; 0 for
// UNLIMITED/INFINITE (sbatch's "no limit").
std::optional<long> slurm_time_minutes(const std::string& text) {
  if (text == "UNLIMITED" || text == "INFINITE" || text == "unlimited" || text == "infinite")
    return 0;
  static const std::regex with_days(R"((\d+)-(\d{1,2})(?::(\d{1,2}))?(?::(\d{1,2}))?)");
  static const std::regex without_days(R"((\d+)(?::(\d{1,2}))?(?::(\d{1,2}))?)");
  std::smatch m;
  auto number = [&m](int i) { return m[i].matched ? std::stol(m[i].str()) : 0L; };
  if (text.size() > 16) return std::nullopt;  // keeps stol in range
  if (std::regex_match(text, m, with_days)) {
    const long days = number(1), hours = number(2), minutes = number(3), seconds = number(4);
    if (hours > 23 || minutes > 59 || seconds > 59) return std::nullopt;
    return days * 1440 + hours * 60 + minutes + (seconds > 0 ? 1 : 0);
  }
  if (std::regex_match(text, m, without_days)) {
    if (!m[2].matched) return number(1);  // minutes
    if (!m[3].matched) {                  // minutes:seconds
      if (number(2) > 59) return std::nullopt;
      return number(1) + (number(2) > 0 ? 1 : 0);
    }
    if (number(2) > 59 || number(3) > 59) return std::nullopt;  // hours:minutes:seconds
    return number(1) * 60 + number(2) + (number(3) > 0 ? 1 : 0);
  }
  return std::nullopt;
}

std::string minutes_as_slurm_time(long minutes) {
  char text[32];
  std::snprintf(text, sizeof text, "%02ld:%02ld:00", minutes / 60, minutes % 60);
  return text;
}

std::string job_name_from(const std::string& sweep_name) {
  std::string name;
  for (char c : sweep_name)
    name +=
        (std::isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '_' || c == '-') ? c : '-';
  return name.empty() ? "sweep" : name;
}

std::string round_trip_number(double value) {
  return nlohmann::json(value).dump();
}

// The sweep a task will run, checked here on the login node so that a typo fails once now rather
// than in every array task later.
SweepPlan check_sweep(const SlurmOptions& o) {
  if (!fs::is_regular_file(o.spec_path))
    throw UserError("sweep file '" + o.spec_path +
                    "' does not exist: give a sweep file, e.g. sweeps/fmnist-quick.toml");
  SweepPlan plan = read_sweep_spec(o.spec_path);
  if (!o.data.empty()) plan.data_path = o.data;
  if (!o.split.empty()) plan.split = o.split;
  if (o.limit >= 0) plan.limit = size_t(o.limit);
  if (o.trials >= 0) plan.trials = o.trials;
  if (o.first_trial >= 0) plan.first_trial = o.first_trial;
  if (o.no_clean) plan.clean_reference = false;
  set_cim_options(plan.cim, o.cim);
  if (!o.sigmas.empty()) plan.sigmas = parse_sigma_list(o.sigmas, "--sigmas");
  if (o.trials == 0) throw UserError("--trials must be at least 1");
  if (o.ci_width < 0) throw UserError("--ci-width must be a half-width in points > 0");
  if (o.ci_width > 0 && o.trials >= 0)
    throw UserError("--trials and --ci-width both given: --ci-width decides the number of chips; "
                    "leave one out");
  if (o.ci_width > 0) plan.ci_width = o.ci_width;
  if ((o.min_trials >= 0 || o.max_trials >= 0) && !plan.adaptive())
    throw UserError("--min-trials and --max-trials bound --ci-width: give --ci-width W too");
  if (o.min_trials >= 0) plan.min_trials = o.min_trials;
  if (o.max_trials >= 0) plan.max_trials = o.max_trials;
  if (o.threads < 0) throw UserError("--threads must be at least 1 (or leave it out: all cores)");
  if (!o.backend.empty() && o.backend != "auto" && o.backend != "cpu" && o.backend != "cuda")
    throw UserError("unknown --backend '" + o.backend + "': use auto, cpu or cuda");
  tidy_sigmas(plan);
  validate_plan(plan);
  for (const SweepModel& model : plan.models) {
    if (!fs::exists(model.path))
      throw UserError("model file '" + model.path + "' of sweep file '" + o.spec_path +
                      "' does not exist: fix its path (relative paths are relative to the file)");
  }
  const std::string data = plan.data_path.empty() ? default_data_path() : plan.data_path;
  if (!fs::exists(data))
    throw UserError("data set '" + data +
                    "' does not exist: give --data or data = \"…\" in the sweep file");
  return plan;
}

std::string sbatch_header(const SlurmJob& job, const std::string& job_name,
                          const std::string& output_pattern, bool is_merge) {
  const SlurmOptions& o = job.options;
  std::ostringstream s;
  s << "#SBATCH --job-name=" << job_name << "\n";
  if (!is_merge)
    s << "#SBATCH --array=" << array_indexes(o.shards, o.only_tasks, o.max_parallel) << "\n";
  s << "#SBATCH --output=" << o.results_dir << "/logs/" << output_pattern << "\n";
  s << "#SBATCH --ntasks=1\n";
  if (!o.partition.empty()) s << "#SBATCH --partition=" << o.partition << "\n";
  if (!o.account.empty()) s << "#SBATCH --account=" << o.account << "\n";
  if (is_merge) {
    const std::optional<long> minutes = o.time.empty() ? std::nullopt : slurm_time_minutes(o.time);
    if (minutes)
      s << "#SBATCH --time="
        << minutes_as_slurm_time(*minutes == 0 ? kMergeMinutes : std::min(*minutes, kMergeMinutes))
        << "\n";
    s << "#SBATCH --cpus-per-task=1\n";
  } else {
    if (!o.time.empty()) s << "#SBATCH --time=" << o.time << "\n";
    if (o.cpus_per_task > 0) s << "#SBATCH --cpus-per-task=" << o.cpus_per_task << "\n";
    if (!o.mem.empty()) s << "#SBATCH --mem=" << o.mem << "\n";
    // --gres is per node, and a task is a one-node job: it is the form every Slurm version and
    // GPU set-up (gres.conf) understands; --gpus-per-task would also need an explicit task count.
    if (o.gpus_per_task > 0) s << "#SBATCH --gres=gpu:" << o.gpus_per_task << "\n";
  }
  for (const std::string& extra : o.extra_sbatch) s << "#SBATCH " << extra << "\n";
  return s.str();
}

std::string first_line(const std::string& text) {
  std::stringstream ss(text);
  for (std::string line; std::getline(ss, line);)
    if (line.find_first_not_of(" \t\r") != std::string::npos) return line;
  return "";
}

// Submits a script and returns its job id.
std::string submit(const SlurmJob& job, const std::vector<std::string>& sbatch_options,
                   const std::string& script) {
  std::vector<std::string> argv = {job.options.sbatch, "--parsable"};
  argv.insert(argv.end(), sbatch_options.begin(), sbatch_options.end());
  argv.push_back(script);
  const CommandOutput result = run_command(argv);
  if (result.exit_code != 0) {
    std::string why = first_line(result.err);
    if (why.empty()) why = first_line(result.out);
    throw UserError(
        "sbatch failed on " + script + " (exit " + std::to_string(result.exit_code) +
        "): " + (why.empty() ? "no message" : why) +
        ": check that Slurm answers here (sinfo) and the sbatch options, then run again");
  }
  return parse_sbatch_job_id(result.out);
}

std::string join_ids(const std::vector<int>& tasks) {
  std::string text;
  for (int t : tasks) text += (text.empty() ? "" : ",") + std::to_string(t);
  return text;
}

}  // namespace

bool is_slurm_time(const std::string& text) {
  return slurm_time_minutes(text).has_value();
}

std::vector<int> parse_task_list(const std::string& text, int shards) {
  std::vector<int> tasks;
  std::stringstream ss(text);
  for (std::string item; std::getline(ss, item, ',');) {
    char* end = nullptr;
    errno = 0;
    const long task = std::strtol(item.c_str(), &end, 10);
    if (item.empty() || *end != '\0' || errno != 0 || task < 0 || task >= shards) {
      throw UserError("--only-tasks '" + text + "': '" + item + "' is not an array task 0 … " +
                      std::to_string(shards - 1) +
                      ": give the 0-based task ids, e.g. --only-tasks 3,7");
    }
    tasks.push_back(int(task));
  }
  if (tasks.empty() || text.back() == ',')
    throw UserError("--only-tasks '" + text +
                    "' is incomplete: give the 0-based task ids, e.g. --only-tasks 3,7");
  std::sort(tasks.begin(), tasks.end());
  tasks.erase(std::unique(tasks.begin(), tasks.end()), tasks.end());
  return tasks;
}

std::string array_indexes(int shards, const std::vector<int>& only_tasks, int max_parallel) {
  std::string indexes =
      only_tasks.empty() ? "0-" + std::to_string(shards - 1) : join_ids(only_tasks);
  if (only_tasks.empty() && shards == 1) indexes = "0";
  if (max_parallel > 0) indexes += "%" + std::to_string(max_parallel);
  return indexes;
}

std::string parse_sbatch_job_id(const std::string& parsable_output) {
  // The id is the last line; warnings, if any, come before it.
  std::string last;
  std::stringstream ss(parsable_output);
  for (std::string line; std::getline(ss, line);) {
    while (!line.empty() && std::isspace(static_cast<unsigned char>(line.back()))) line.pop_back();
    if (!line.empty()) last = line;
  }
  const std::string id = last.substr(0, last.find(';'));
  if (id.empty() || id.find_first_not_of("0123456789") != std::string::npos) {
    throw UserError("sbatch --parsable printed '" + last +
                    "' instead of a job id (1234 or 1234;cluster): check the output of "
                    "`sbatch --parsable` on this machine");
  }
  return last;
}

SlurmJob plan_slurm_job(const SlurmOptions& options) {
  SlurmJob job;
  SlurmOptions& o = job.options;
  o = options;
  if (o.shards < 1 || o.shards > kMaxSlurmShards) {
    throw UserError("--shards " + std::to_string(o.shards) +
                    " is out of range: give 1 … 100000 array tasks");
  }
  for (int task : o.only_tasks) {
    if (task < 0 || task >= o.shards) {
      throw UserError("--only-tasks " + std::to_string(task) + " is not a task of --shards " +
                      std::to_string(o.shards) + " (tasks are 0 … " + std::to_string(o.shards - 1) +
                      "): give the same --shards as before");
    }
  }
  if (o.results_dir.empty())
    throw UserError("--results-dir is empty: give the directory for the shard results");
  if (!o.time.empty() && !is_slurm_time(o.time)) {
    throw UserError("--time '" + o.time +
                    "' is not a Slurm time limit: use HH:MM:SS, MM, D-HH or D-HH:MM:SS, e.g. "
                    "02:00:00");
  }
  static const std::regex memory(R"(\d+[KMGTkmgt]?)");
  if (!o.mem.empty() && !std::regex_match(o.mem, memory))
    throw UserError("--mem '" + o.mem + "' is not a Slurm memory size: use e.g. 16G or 4000M");
  if (o.gpus_per_task < 0)
    throw UserError("--gpus-per-task must be ≥ 0 (0 on clusters without GPUs)");
  if (o.cpus_per_task < 0) throw UserError("--cpus-per-task must be ≥ 1 (or leave it out)");
  if (o.max_parallel < 0) throw UserError("--max-parallel must be ≥ 1 (or leave it out)");
  require_one_word(o.partition, "--partition");
  require_one_word(o.account, "--account");
  for (std::string& extra : o.extra_sbatch) {
    // CLI11 takes a value that starts with "--" for an option, so "qos=high" is accepted too.
    if (!extra.empty() && extra[0] != '-') extra = "--" + extra;
    if (extra.find_first_of("\n\r") != std::string::npos)
      throw UserError(
          "--extra-sbatch holds a line break: give one sbatch option per --extra-sbatch");
    if (extra.empty() || extra[0] != '-') {
      throw UserError("--extra-sbatch '" + extra +
                      "' is not one sbatch option: give e.g. --extra-sbatch=--qos=high");
    }
  }

  o.spec_path = absolute_path(o.spec_path);
  if (!o.data.empty()) o.data = absolute_path(o.data);
  const SweepPlan plan = check_sweep(o);
  job.name = job_name_from(plan.name);
  if (plan.adaptive()) {
    job.ci_width = plan.ci_width;
    job.max_trials = plan.max_trials;
  }

  o.results_dir = absolute_path(o.results_dir);
  require_sbatch_safe_path(o.results_dir, "--results-dir");
  if (o.binary.empty()) {
    std::error_code error;
    o.binary = fs::read_symlink("/proc/self/exe", error).string();
    if (error)
      throw UserError("cannot find this program's path (/proc/self/exe): " + error.message());
  }
  o.binary = absolute_path(o.binary);

  if (o.script_path.empty()) {
    // A retry gets its own script, so the full array script stays as it was.
    o.script_path = o.results_dir + "/cimsweep-" + job.name +
                    (o.only_tasks.empty() ? "" : "-retry") + ".sbatch";
  }
  o.script_path = absolute_path(o.script_path);
  const fs::path script(o.script_path);
  job.array_script_path = o.script_path;
  job.merge_script_path =
      (script.parent_path() / (script.stem().string() + "-merge" + script.extension().string()))
          .string();

  // Shard files of a former run with more shards, or with σ values this sweep does not run,
  // would be merged into this run's table.
  if (fs::is_directory(o.results_dir)) {
    static const std::regex shard_file(R"(shard-(\d+)\.jsonl)");
    for (const auto& entry : fs::directory_iterator(o.results_dir)) {
      std::smatch m;
      const std::string file = entry.path().filename().string();
      if (!std::regex_match(file, m, shard_file)) continue;
      if (o.only_tasks.empty() && (m[1].str().size() >= 7 || std::stoi(m[1].str()) >= o.shards)) {
        throw UserError("--results-dir " + o.results_dir + " holds " + file +
                        " of a run with more than " + std::to_string(o.shards) +
                        " shards, which the merge would mix in: choose a fresh --results-dir");
      }
      if (!entry.is_regular_file()) continue;  // the task will say what is wrong with it
      for (const TrialRecord& record : read_results_file(entry.path().string())) {
        if (record.trial < 0 ||
            std::find(plan.sigmas.begin(), plan.sigmas.end(), record.sigma) != plan.sigmas.end())
          continue;
        throw UserError("--results-dir " + o.results_dir + " holds " + file +
                        " with trials at σ = " + nlohmann::json(record.sigma).dump() +
                        ", which this sweep does not run (another --sigmas?): the merge would mix "
                        "them in; choose a fresh --results-dir");
      }
    }
  }

  std::error_code error;
  fs::create_directories(o.results_dir + "/logs", error);
  if (error) {
    throw UserError("cannot create results directory " + o.results_dir +
                    "/logs: " + error.message() + ": choose a writable --results-dir");
  }
  return job;
}

namespace {

// The options every task passes on to its `cimsweep sweep` (and a resubmission to `slurm`), in
// one order: what the user gave, nothing the sweep file already says.
std::vector<std::string> sweep_arguments(const SlurmOptions& o) {
  std::vector<std::string> args;
  auto add = [&args](const std::string& name, const std::string& value) {
    if (!value.empty()) args.insert(args.end(), {name, value});
  };
  add("--data", o.data);
  add("--split", o.split);
  add("--sigmas", o.sigmas);
  if (o.limit >= 0) add("--limit", std::to_string(o.limit));
  if (o.trials >= 0) add("--trials", std::to_string(o.trials));
  if (o.first_trial >= 0) add("--first-trial", std::to_string(o.first_trial));
  if (o.ci_width > 0) add("--ci-width", round_trip_number(o.ci_width));
  if (o.min_trials >= 0) add("--min-trials", std::to_string(o.min_trials));
  if (o.max_trials >= 0) add("--max-trials", std::to_string(o.max_trials));
  if (o.no_clean) args.push_back("--no-clean");
  if (o.threads > 0) add("--threads", std::to_string(o.threads));
  add("--backend", o.backend);
  for (const auto& entry : o.cim) {
    // Named, not a structured binding: C++17 lambdas cannot capture those (clang rejects it).
    const std::string& name = entry.first;
    const std::string& value = entry.second;
    const auto& options = cim_options();
    const bool flag = std::any_of(options.begin(), options.end(), [&](const CimOption& option) {
      return option.flag && name == option.name;
    });
    if (flag) {
      args.push_back("--" + name);  // a flag's value is "true": naming it is all it takes
    } else {
      args.insert(args.end(), {"--" + name, value});
    }
  }
  return args;
}

}  // namespace

std::string array_script(const SlurmJob& job) {
  const SlurmOptions& o = job.options;
  const std::string task = "\"${SLURM_ARRAY_TASK_ID}\"";
  std::ostringstream s;
  s << "#!/bin/bash\n"
    << "# Written by `cimsweep slurm`: array task I (0-based) runs share I of " << o.shards
    << " of the sweep's\n"
    << "# work units into shard-I.jsonl. A task resumes its file, so resubmitting a failed or\n"
    << "# timed-out task repeats no finished trial.\n"
    << sbatch_header(job, "cimsweep-" + job.name, "%x_%A_%a.out", false) << "\n"
    << "set -euo pipefail\n"
    << ": \"${SLURM_ARRAY_TASK_ID:?submit this script with sbatch: it is a job array}\"\n";
  if (o.cpus_per_task > 0 && o.threads == 0) {
    // Without cgroups a task would see every core of the node; use the cores it was given.
    s << "export OMP_NUM_THREADS=\"${SLURM_CPUS_PER_TASK:-" << o.cpus_per_task << "}\"\n";
  }
  // exec: Slurm's SIGTERM at the time limit reaches cimsweep itself, whose results are already
  // on disk trial by trial.
  s << "exec " << shell_quote(o.binary) << " sweep \\\n"
    << "  --spec " << shell_quote(o.spec_path) << " \\\n"
    << "  --shard " << task << "/" << o.shards << " \\\n"
    << "  --results " << shell_quote(o.results_dir) << "/shard-" << task << ".jsonl \\\n"
    << "  --resume --quiet";
  for (const std::string& arg : sweep_arguments(o)) s << " " << shell_quote(arg);
  s << "\n";
  return s.str();
}

std::string merge_script(const SlurmJob& job) {
  const SlurmOptions& o = job.options;
  const std::string rule = job.ci_width > 0 ? " --ci-width " + round_trip_number(job.ci_width) +
                                                  " --max-trials " + std::to_string(job.max_trials)
                                            : "";
  std::ostringstream s;
  s << "#!/bin/bash\n"
    << "# Written by `cimsweep slurm`: merges the array's shard-*.jsonl into merged.jsonl and\n"
    << "# table.md, and draws figure.png. Submitted with --dependency=afterok:<array job>, it runs once every task\n"
    << "# succeeded; merging again is harmless (records are deduplicated).\n"
    << sbatch_header(job, "cimsweep-" + job.name + "-merge", "%x_%j.out", true) << "\n"
    << "set -euo pipefail\n"
    << "shopt -s nullglob\n"
    << "results_dir=" << shell_quote(o.results_dir) << "\n"
    << "shards=(\"$results_dir\"/shard-*.jsonl)\n"
    << "if [ \"${#shards[@]}\" -eq 0 ]; then\n"
    << "  echo \"cimsweep merge: no shard-*.jsonl in $results_dir: did the array job run?\" >&2\n"
    << "  exit 1\n"
    << "fi\n"
    << shell_quote(o.binary) << " merge \"${shards[@]}\" \\\n"
    << "  --results \"$results_dir/merged.jsonl\" --output \"$results_dir/table.md\"" << rule
    << "\n"
    << "# The figure needs Python with matplotlib on the node; without it the table still stands.\n"
    << shell_quote(o.binary) << " plot \"$results_dir/merged.jsonl\" -o \"$results_dir/figure.png\""
    << rule << " ||\n"
    << "  echo \"cimsweep merge: no figure.png (see the line above); table.md is complete\" >&2\n";
  return s.str();
}

std::string resubmit_command(const SlurmJob& job, const std::string& tasks) {
  const SlurmOptions& o = job.options;
  std::vector<std::string> args = {
      o.binary,        "slurm",      o.spec_path, "--shards", std::to_string(o.shards),
      "--results-dir", o.results_dir};
  auto add = [&args](const std::string& name, const std::string& value) {
    if (!value.empty()) args.insert(args.end(), {name, value});
  };
  add("--partition", o.partition);
  add("--account", o.account);
  add("--time", o.time);
  if (o.gpus_per_task != 1) add("--gpus-per-task", std::to_string(o.gpus_per_task));
  if (o.cpus_per_task > 0) add("--cpus-per-task", std::to_string(o.cpus_per_task));
  add("--mem", o.mem);
  if (o.max_parallel > 0) add("--max-parallel", std::to_string(o.max_parallel));
  for (const std::string& extra : o.extra_sbatch) args.push_back("--extra-sbatch=" + extra);
  const std::vector<std::string> sweep = sweep_arguments(o);
  args.insert(args.end(), sweep.begin(), sweep.end());
  args.insert(args.end(), {"--only-tasks", tasks, "--submit"});
  std::string command;
  for (const std::string& arg : args) command += (command.empty() ? "" : " ") + shell_quote(arg);
  return command;
}

int run_slurm(SlurmOptions options, std::ostream& out) {
  if (options.submit && !is_runnable(options.sbatch)) {
    throw UserError(options.sbatch +
                    " is not on PATH: run this on a Slurm login node, or leave out --submit and "
                    "submit the written scripts there");
  }
  const SlurmJob job = plan_slurm_job(options);
  const SlurmOptions& o = job.options;
  write_output_file(job.array_script_path, array_script(job), "Slurm script");
  write_output_file(job.merge_script_path, merge_script(job), "Slurm script");
  const std::string tasks =
      o.only_tasks.empty()
          ? (o.shards == 1 ? "task 0" : "tasks 0-" + std::to_string(o.shards - 1))
          : (o.only_tasks.size() == 1 ? "task " : "tasks ") + join_ids(o.only_tasks);
  // An example retry that names real tasks of this array.
  const std::string retry_example =
      o.only_tasks.empty() ? (o.shards == 1 ? "0" : "0," + std::to_string(o.shards - 1))
                           : join_ids(o.only_tasks);
  if (o.shards > 1001) {
    out << "note: array index " << o.shards - 1 << " needs MaxArraySize > " << o.shards - 1
        << " (Slurm's default is 1001): check `scontrol show config | grep MaxArraySize`\n";
  }

  if (!o.submit) {
    out << "cimsweep: wrote " << job.array_script_path << " (job array, " << tasks << " of "
        << o.shards << ")\n"
        << "      and " << job.merge_script_path << " (merge, after every task succeeded)\n"
        << "submit both (or run this command again with --submit):\n"
        << "  job=$(sbatch --parsable " << shell_quote(job.array_script_path) << ") && \\\n"
        << "  sbatch --dependency=afterok:${job%%;*} --kill-on-invalid-dep=yes "
        << shell_quote(job.merge_script_path) << "\n";
    return 0;
  }

  const std::string array_job = submit(job, {}, job.array_script_path);
  const std::string array_id = array_job.substr(0, array_job.find(';'));
  const std::string cluster =
      array_job.find(';') == std::string::npos ? "" : array_job.substr(array_job.find(';') + 1);
  // A failed task leaves the dependency unsatisfiable: the merge job then ends at once instead
  // of waiting forever, and a retry submits a fresh one.
  std::string merge_job;
  try {
    merge_job = submit(job, {"--dependency=afterok:" + array_id, "--kill-on-invalid-dep=yes"},
                       job.merge_script_path);
  } catch (const UserError& e) {
    throw UserError(std::string(e.what()) + " (job array " + array_id +
                    " is submitted; submit the merge with: sbatch --dependency=afterok:" +
                    array_id + " " + job.merge_script_path + ")");
  }
  const std::string merge_id = merge_job.substr(0, merge_job.find(';'));
  const std::string on_cluster = cluster.empty() ? "" : " -M " + cluster;
  out << "cimsweep: submitted job array " << array_id << " (" << tasks << " of " << o.shards
      << ") and merge job " << merge_id << " (starts after every task succeeded)\n"
      << "  follow:   squeue" << on_cluster << " -j " << array_id << "," << merge_id << "\n"
      << "  history:  sacct" << on_cluster << " -X -j " << array_id << "," << merge_id
      << " --format=JobID,JobName,State,Elapsed,ExitCode\n"
      << "  logs:     " << o.results_dir << "/logs/\n"
      << "  results:  " << o.results_dir << "/merged.jsonl and " << o.results_dir
      << "/table.md when job " << merge_id << " completed\n"
      << "if tasks fail, list them (the 0-based task id follows the '_'):\n"
      << "  sacct" << on_cluster << " -X -j " << array_id
      << " --state=FAILED,TIMEOUT,OUT_OF_MEMORY,NODE_FAIL --format=JobID,State\n"
      << "then rerun only those, with a new merge job; a rerun task resumes its shard file. For "
         "tasks "
      << retry_example << ":\n"
      << "  " << resubmit_command(job, retry_example) << "\n";
  return 0;
}

}  // namespace cimsweep
