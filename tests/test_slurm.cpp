// `cimsweep slurm`: the job-array and merge scripts it writes (run here with stand-in programs to
// see the exact command each array task would execute), --only-tasks, sbatch job-id parsing and
// submission through a fake sbatch, and one clear error per mistake. No Slurm needed.
#include "host/sweep/slurm.h"

#include <gtest/gtest.h>
#include <sys/stat.h>

#include <filesystem>
#include <functional>
#include <sstream>
#include <string>
#include <vector>

#include "common/errors.h"
#include "tests/test_util.h"

namespace {

using cimsweep::testing::split_lines;

namespace fs = std::filesystem;
using cimsweep::SlurmJob;
using cimsweep::SlurmOptions;
using cimsweep::UserError;
using cimsweep::testing::read_text;
using cimsweep::testing::TempDir;
using cimsweep::testing::write_text;

const std::string kModel = std::string(CIMSWEEP_SOURCE_DIR) +
                           "/tests/data/golden_resnet8_k5_w3_11x13_shortcutB_exits.safetensors";

using cimsweep::testing::user_error;

bool has_line(const std::string& text, const std::string& line) {
  for (const std::string& l : split_lines(text))
    if (l == line) return true;
  return false;
}

void write_executable(const std::string& path, const std::string& text) {
  write_text(path, text);
  ::chmod(path.c_str(), 0755);
}

// Runs a shell command line, returning its exit code.
int shell(const std::string& command) {
  const int status = std::system(command.c_str());
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

class Slurm : public ::testing::Test {
 protected:
  void SetUp() override {
    fs::create_directories(dir.file("data"));
    write_text(dir.file("sweep.toml"),
               "name = \"tiny sweep\"\ndata = \"data\"\nlimit = 12\n"
               "sigmas = [0.0, 0.1]\n[[models]]\npath = \"" +
                   kModel + "\"\n");
    // Prints each argument on its own line: what an array task would have run.
    write_executable(dir.file("fake-cimsweep"),
                     "#!/bin/sh\nfor a in \"$@\"; do echo \"$a\"; done\n");
    options.spec_path = dir.file("sweep.toml");
    options.shards = 3;
    options.results_dir = dir.file("results");
    options.binary = dir.file("fake-cimsweep");
  }
  TempDir dir;
  SlurmOptions options;
};

TEST(SlurmArray, IndexesCoverEveryShardOrTheListedTasksWithTheThrottle) {
  EXPECT_EQ(cimsweep::array_indexes(3, {}, 0), "0-2");
  EXPECT_EQ(cimsweep::array_indexes(1, {}, 0), "0");
  EXPECT_EQ(cimsweep::array_indexes(100000, {}, 0), "0-99999");
  EXPECT_EQ(cimsweep::array_indexes(10, {}, 4), "0-9%4");
  EXPECT_EQ(cimsweep::array_indexes(10, {3, 7}, 0), "3,7");
  EXPECT_EQ(cimsweep::array_indexes(10, {3, 7}, 2), "3,7%2");
}

TEST(SlurmArray, TaskListsAreSortedUniqueAndInRange) {
  EXPECT_EQ(cimsweep::parse_task_list("7,3,3", 10), (std::vector<int>{3, 7}));
  EXPECT_EQ(cimsweep::parse_task_list("0", 1), (std::vector<int>{0}));
  for (const std::string bad : {"", "a", "3,", ",3", "-1", "10", "1.5", "3 7", "99999999999"}) {
    const std::string error = user_error([&] { cimsweep::parse_task_list(bad, 10); });
    EXPECT_NE(error.find("--only-tasks"), std::string::npos) << "'" << bad << "': " << error;
    EXPECT_EQ(error.find('\n'), std::string::npos) << error;
  }
}

TEST(SlurmTime, AcceptsExactlySbatchsFormats) {
  for (const std::string good : {"0", "30", "30:00", "90:30", "02:00:00", "100:00:00", "1-0",
                                 "1-12", "1-12:30", "1-12:30:15", "UNLIMITED", "INFINITE"})
    EXPECT_TRUE(cimsweep::is_slurm_time(good)) << good;
  for (const std::string bad : {"", "2h", "1:60:00", "01:00:60", "1-24", "1-", ":30", "-5",
                                "1:2:3:4", "1-1:1:1:1", "1.5", " 30", "99999999999999999999"})
    EXPECT_FALSE(cimsweep::is_slurm_time(bad)) << bad;
}

TEST(SlurmSubmit, JobIdIsTheLastLineOfParsableOutputWithItsCluster) {
  EXPECT_EQ(cimsweep::parse_sbatch_job_id("1234\n"), "1234");
  EXPECT_EQ(cimsweep::parse_sbatch_job_id("1234;gpu-cluster\n"), "1234;gpu-cluster");
  EXPECT_EQ(cimsweep::parse_sbatch_job_id("sbatch: warning: no time limit\n  \n98765\r\n"),
            "98765");
  for (const std::string bad : {"", "\n", "Submitted batch job 12\n", ";cluster\n", "12a\n"}) {
    const std::string error = user_error([&] { cimsweep::parse_sbatch_job_id(bad); });
    EXPECT_NE(error.find("job id"), std::string::npos) << "'" << bad << "': " << error;
  }
}

TEST(SlurmScript, ShellQuotingKeepsPlainWordsAndQuotesTheRest) {
  EXPECT_EQ(cimsweep::shell_quote("/a/b-c_d.e:f=g,h"), "/a/b-c_d.e:f=g,h");
  EXPECT_EQ(cimsweep::shell_quote("a b"), "'a b'");
  EXPECT_EQ(cimsweep::shell_quote("it's"), "'it'\\''s'");
  EXPECT_EQ(cimsweep::shell_quote(""), "''");
  EXPECT_EQ(cimsweep::shell_quote("$HOME"), "'$HOME'");
}

TEST_F(Slurm, ArrayScriptRequestsTheResourcesAndRunsShareIOfNPerTask) {
  options.shards = 8;
  options.max_parallel = 3;
  options.gpus_per_task = 2;
  options.cpus_per_task = 4;
  options.time = "04:00:00";
  options.partition = "gpu";
  options.account = "proj42";
  options.mem = "16G";
  options.extra_sbatch = {"--qos=high", "constraint=a100"};
  options.limit = 6;
  options.trials = 5;
  // Relative paths, as a user types them, must reach the script absolute.
  options.spec_path = fs::relative(dir.file("sweep.toml")).string();
  options.results_dir = fs::relative(dir.file("results")).string();
  const SlurmJob job = cimsweep::plan_slurm_job(options);
  const std::string results = fs::canonical(dir.path()).string() + "/results";
  EXPECT_EQ(job.options.results_dir, results);
  EXPECT_TRUE(fs::is_directory(results + "/logs")) << "Slurm does not create the --output dir";
  EXPECT_EQ(job.array_script_path, results + "/cimsweep-tiny-sweep.sbatch");
  EXPECT_EQ(job.merge_script_path, results + "/cimsweep-tiny-sweep-merge.sbatch");

  const std::string script = cimsweep::array_script(job);
  write_text(job.array_script_path, script);
  for (const std::string& expected : std::vector<std::string>{
           "#!/bin/bash", "#SBATCH --job-name=cimsweep-tiny-sweep", "#SBATCH --array=0-7%3",
           "#SBATCH --output=" + results + "/logs/%x_%A_%a.out", "#SBATCH --ntasks=1",
           "#SBATCH --partition=gpu", "#SBATCH --account=proj42", "#SBATCH --time=04:00:00",
           "#SBATCH --cpus-per-task=4", "#SBATCH --mem=16G", "#SBATCH --gres=gpu:2",
           "#SBATCH --qos=high", "#SBATCH --constraint=a100"})
    EXPECT_TRUE(has_line(script, expected)) << expected << "\nnot in:\n" << script;
  // sbatch reads #SBATCH lines only up to the first command.
  bool seen_command = false;
  for (const std::string& line : split_lines(script)) {
    if (line.rfind("#SBATCH", 0) == 0) EXPECT_FALSE(seen_command) << line;
    if (!line.empty() && line[0] != '#') seen_command = true;
  }

  // What tasks 0 and 5 run, argument by argument.
  for (int task : {0, 5}) {
    const std::string out = dir.file("task.out");
    ASSERT_EQ(shell("SLURM_ARRAY_TASK_ID=" + std::to_string(task) + " SLURM_CPUS_PER_TASK=4 bash " +
                    job.array_script_path + " > " + out),
              0);
    const std::vector<std::string> expected = {
        "sweep",
        "--spec",
        fs::canonical(dir.file("sweep.toml")).string(),
        "--shard",
        std::to_string(task) + "/8",
        "--results",
        results + "/shard-" + std::to_string(task) + ".jsonl",
        "--resume",
        "--quiet",
        "--limit",
        "6",
        "--trials",
        "5"};
    EXPECT_EQ(split_lines(read_text(out)), expected);
  }
  EXPECT_NE(script.find("export OMP_NUM_THREADS=\"${SLURM_CPUS_PER_TASK:-4}\""), std::string::npos);
  // Run outside sbatch, the script says so instead of running shard "/8".
  EXPECT_NE(shell("bash " + job.array_script_path + " > /dev/null 2>&1"), 0);
}

TEST_F(Slurm, CpuOnlyClustersGetNoGpuRequestAndDefaultsStayTheClusters) {
  options.gpus_per_task = 0;
  const SlurmJob job = cimsweep::plan_slurm_job(options);
  const std::string script = cimsweep::array_script(job);
  EXPECT_EQ(script.find("gpu"), std::string::npos) << script;
  for (const std::string absent :
       {"--time", "--partition", "--account", "--mem", "--cpus-per-task", "OMP_NUM_THREADS"})
    EXPECT_EQ(script.find(absent), std::string::npos) << absent << " in\n" << script;
  EXPECT_TRUE(has_line(script, "#SBATCH --array=0-2"));
  options.gpus_per_task = 1;
  EXPECT_TRUE(
      has_line(cimsweep::array_script(cimsweep::plan_slurm_job(options)), "#SBATCH --gres=gpu:1"))
      << "one GPU per task by default";
}

TEST_F(Slurm, MergeScriptJoinsEveryShardFileIntoMergedResultsAndTable) {
  options.time = "2-00:00:00";
  options.gpus_per_task = 4;
  options.mem = "64G";
  const SlurmJob job = cimsweep::plan_slurm_job(options);
  const std::string script = cimsweep::merge_script(job);
  const std::string results = job.options.results_dir;
  EXPECT_TRUE(has_line(script, "#SBATCH --job-name=cimsweep-tiny-sweep-merge"));
  EXPECT_TRUE(has_line(script, "#SBATCH --output=" + results + "/logs/%x_%j.out"));
  EXPECT_TRUE(has_line(script, "#SBATCH --time=00:30:00")) << "a short limit backfills early";
  for (const std::string absent : {"--array", "gpu", "--mem"})
    EXPECT_EQ(script.find(absent), std::string::npos) << absent << " in\n" << script;

  write_text(job.merge_script_path, script);
  EXPECT_NE(shell("bash " + job.merge_script_path + " > /dev/null 2>&1"), 0)
      << "no shard file yet: the merge must fail, not write an empty table";
  write_text(results + "/shard-0.jsonl", "");
  write_text(results + "/shard-2.jsonl", "");
  const std::string out = dir.file("merge.out");
  ASSERT_EQ(shell("bash " + job.merge_script_path + " > " + out), 0);
  const std::vector<std::string> expected = {"merge",
                                             results + "/shard-0.jsonl",
                                             results + "/shard-2.jsonl",
                                             "--results",
                                             results + "/merged.jsonl",
                                             "--output",
                                             results + "/table.md",
                                             "plot",
                                             results + "/merged.jsonl",
                                             "-o",
                                             results + "/figure.png"};
  EXPECT_EQ(split_lines(read_text(out)), expected);

  // A stopping rule reaches every task and the merge, which marks the cells at the cap.
  options.ci_width = 0.5;
  options.max_trials = 800;
  const SlurmJob adaptive = cimsweep::plan_slurm_job(options);
  EXPECT_NE(cimsweep::array_script(adaptive).find("--ci-width 0.5 --max-trials 800"),
            std::string::npos)
      << cimsweep::array_script(adaptive);
  const std::string adaptive_merge = cimsweep::merge_script(adaptive);
  EXPECT_NE(adaptive_merge.find("table.md\" --ci-width 0.5 --max-trials 800"), std::string::npos)
      << adaptive_merge;
  EXPECT_NE(adaptive_merge.find("figure.png\" --ci-width 0.5 --max-trials 800"), std::string::npos)
      << adaptive_merge;
  options.ci_width = 0;
  options.max_trials = -1;

  options.time = "10";
  EXPECT_TRUE(has_line(cimsweep::merge_script(cimsweep::plan_slurm_job(options)),
                       "#SBATCH --time=00:10:00"))
      << "never longer than the tasks' own limit";
}

TEST_F(Slurm, OnlyTasksWritesARetryScriptForThoseTasksAndKeepsTheFullOne) {
  options.shards = 10;
  options.max_parallel = 2;
  std::ostringstream out;
  ASSERT_EQ(cimsweep::run_slurm(options, out), 0);
  const std::string full = options.results_dir + "/cimsweep-tiny-sweep.sbatch";
  const std::string full_text = read_text(full);

  options.only_tasks = {3, 7};
  std::ostringstream retry_out;
  ASSERT_EQ(cimsweep::run_slurm(options, retry_out), 0);
  const std::string retry = read_text(options.results_dir + "/cimsweep-tiny-sweep-retry.sbatch");
  EXPECT_TRUE(has_line(retry, "#SBATCH --array=3,7%2")) << retry;
  EXPECT_NE(retry.find("--shard \"${SLURM_ARRAY_TASK_ID}\"/10"), std::string::npos) << retry;
  EXPECT_TRUE(fs::exists(options.results_dir + "/cimsweep-tiny-sweep-retry-merge.sbatch"));
  EXPECT_EQ(read_text(full), full_text);
  EXPECT_NE(retry_out.str().find("tasks 3,7"), std::string::npos) << retry_out.str();

  options.only_tasks = {10};
  EXPECT_NE(user_error([&] { cimsweep::plan_slurm_job(options); }).find("--only-tasks 10"),
            std::string::npos);
}

TEST_F(Slurm, WithoutSubmitItPrintsTheScriptsAndTheSbatchCommands) {
  std::ostringstream out;
  ASSERT_EQ(cimsweep::run_slurm(options, out), 0);
  const std::string results = fs::absolute(options.results_dir).string();
  const std::string text = out.str();
  EXPECT_NE(text.find("sbatch --parsable " + results + "/cimsweep-tiny-sweep.sbatch"),
            std::string::npos)
      << text;
  EXPECT_NE(text.find("sbatch --dependency=afterok:${job%%;*} --kill-on-invalid-dep=yes " +
                      results + "/cimsweep-tiny-sweep-merge.sbatch"),
            std::string::npos)
      << text;
}

TEST_F(Slurm, SubmitChainsTheMergeAfterTheArrayAndSaysHowToFollowAndRetry) {
  // A stand-in sbatch: logs its arguments, answers like `sbatch --parsable` on a multi-cluster
  // set-up for the array and like a single cluster for the merge.
  const std::string log = dir.file("sbatch.log");
  write_executable(dir.file("sbatch"), "#!/bin/sh\necho \"$*\" >> " + log + "\nif [ $(wc -l < " +
                                           log +
                                           ") -eq 1 ]; then echo '4242;gpu-cluster'; else "
                                           "echo 4243; fi\n");
  options.sbatch = dir.file("sbatch");
  options.submit = true;
  options.gpus_per_task = 0;
  options.time = "01:00:00";
  std::ostringstream out;
  ASSERT_EQ(cimsweep::run_slurm(options, out), 0);
  const std::string results = fs::absolute(options.results_dir).string();
  const std::vector<std::string> expected = {
      "--parsable " + results + "/cimsweep-tiny-sweep.sbatch",
      "--parsable --dependency=afterok:4242 --kill-on-invalid-dep=yes " + results +
          "/cimsweep-tiny-sweep-merge.sbatch"};
  EXPECT_EQ(split_lines(read_text(log)), expected);
  const std::string text = out.str();
  for (const std::string& expected_text : std::vector<std::string>{
           "job array 4242", "merge job 4243", "squeue -M gpu-cluster -j 4242,4243",
           "sacct -M gpu-cluster -X -j 4242", results + "/logs/",
           " slurm " + fs::absolute(options.spec_path).string() + " --shards 3 --results-dir " +
               results + " --time 01:00:00 --gpus-per-task 0 --only-tasks 0,2 --submit"})
    EXPECT_NE(text.find(expected_text), std::string::npos) << expected_text << "\nnot in:\n"
                                                           << text;
}

TEST_F(Slurm, SubmitErrorsSayWhatSbatchSaid) {
  options.submit = true;
  options.sbatch = "cimsweep-test-no-such-sbatch";
  std::ostringstream out;
  std::string error = user_error([&] { cimsweep::run_slurm(options, out); });
  EXPECT_NE(error.find("cimsweep-test-no-such-sbatch is not on PATH"), std::string::npos) << error;

  write_executable(dir.file("sbatch"),
                   "#!/bin/sh\necho 'sbatch: error: Batch job submission failed: Invalid account "
                   "or account/partition combination specified' >&2\necho 'second line' >&2\n"
                   "exit 1\n");
  options.sbatch = dir.file("sbatch");
  error = user_error([&] { cimsweep::run_slurm(options, out); });
  EXPECT_NE(error.find("exit 1"), std::string::npos) << error;
  EXPECT_NE(error.find("Invalid account or account/partition"), std::string::npos) << error;
  EXPECT_EQ(error.find("second line"), std::string::npos) << error;
  EXPECT_EQ(error.find('\n'), std::string::npos) << error;
}

TEST_F(Slurm, EveryMistakeIsOneClearLine) {
  struct Case {
    std::function<void(SlurmOptions&)> mistake;
    std::string expected;
  };
  write_text(dir.file("a-file"), "");
  const std::vector<Case> cases = {
      {[](SlurmOptions& o) { o.shards = 0; }, "--shards 0 is out of range"},
      {[](SlurmOptions& o) { o.shards = 100001; }, "--shards 100001 is out of range"},
      {[](SlurmOptions& o) { o.time = "2h"; }, "--time '2h' is not a Slurm time limit"},
      {[](SlurmOptions& o) { o.mem = "lots"; }, "--mem 'lots'"},
      {[&](SlurmOptions& o) { o.spec_path = dir.file("missing.toml"); }, "does not exist"},
      {[&](SlurmOptions& o) { o.results_dir = dir.file("a-file") + "/sub"; },
       "cannot create results directory"},
      {[&](SlurmOptions& o) { o.results_dir = dir.file("with space"); }, "holds a space"},
      {[](SlurmOptions& o) { o.gpus_per_task = -1; }, "--gpus-per-task must be"},
      {[](SlurmOptions& o) { o.partition = "a b"; }, "--partition 'a b'"},
      {[](SlurmOptions& o) { o.extra_sbatch = {"--qos=high\nrm -rf /"}; }, "--extra-sbatch"},
      {[](SlurmOptions& o) { o.sigmas = "0,x"; }, "--sigmas '0,x'"},
      {[&](SlurmOptions& o) { o.data = dir.file("no-data"); }, "data set"},
  };
  for (const Case& c : cases) {
    SlurmOptions o = options;
    c.mistake(o);
    std::ostringstream out;
    const std::string error = user_error([&] { cimsweep::run_slurm(o, out); });
    EXPECT_NE(error.find(c.expected), std::string::npos) << c.expected << " vs: " << error;
    EXPECT_EQ(error.find('\n'), std::string::npos) << error;
  }
}

TEST_F(Slurm, ShardFilesOfALargerFormerRunAreRefused) {
  fs::create_directories(options.results_dir);
  write_text(options.results_dir + "/shard-5.jsonl", "");
  const std::string error = user_error([&] { cimsweep::plan_slurm_job(options); });
  EXPECT_NE(error.find("shard-5.jsonl"), std::string::npos) << error;
  options.shards = 6;
  EXPECT_EQ(user_error([&] { cimsweep::plan_slurm_job(options); }), "");
}

TEST_F(Slurm, CommandLineWritesScriptsThatRunThisVeryBinary) {
  const auto r = cimsweep::testing::run_cimsweep(
      "slurm " + dir.file("sweep.toml") + " --shards 2 --results-dir " + dir.file("cli") +
      " --gpus-per-task 0 --extra-sbatch=--qos=low --extra-sbatch reservation=r1 --only-tasks 1");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const std::string script = read_text(dir.file("cli") + "/cimsweep-tiny-sweep-retry.sbatch");
  EXPECT_NE(script.find("exec " + fs::canonical(CIMSWEEP_BINARY).string() + " sweep"),
            std::string::npos)
      << script;
  EXPECT_TRUE(has_line(script, "#SBATCH --array=1")) << script;
  EXPECT_TRUE(has_line(script, "#SBATCH --qos=low")) << script;
  EXPECT_TRUE(has_line(script, "#SBATCH --reservation=r1")) << script;

  const auto bad = cimsweep::testing::run_cimsweep("slurm " + dir.file("sweep.toml") +
                                                   " --shards 0 --results-dir " + dir.file("cli"));
  EXPECT_EQ(bad.exit_code, 2);
  EXPECT_EQ(bad.err, "cimsweep: error: --shards 0 is out of range: give 1 … 100000 array tasks\n");
}

}  // namespace
