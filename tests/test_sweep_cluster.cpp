// Sweeps split for a cluster: shards and devices together do exactly the unsharded sweep, `merge`
// is idempotent and refuses results that disagree, and a sweep killed with SIGKILL again and
// again, then resumed, ends with the uninterrupted table and no trial counted twice.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <optional>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/errors.h"
#include "host/results/results.h"
#include "host/sweep/runner.h"
#include "host/sweep/sweep_spec.h"
#include "tests/test_util.h"

extern char** environ;

namespace {

using cimsweep::testing::split_lines;
using cimsweep::testing::write_tiny_idx_test_split;

using cimsweep::testing::read_text;
using cimsweep::testing::run_cimsweep;
using cimsweep::testing::TempDir;

const std::string kModel = std::string(CIMSWEEP_SOURCE_DIR) +
                           "/tests/data/golden_resnet8_k5_w3_11x13_shortcutB_exits.safetensors";

// (model, σ, trial) → correct, for comparing what two runs computed regardless of file order.
std::map<std::string, uint64_t> results_by_unit(const std::vector<cimsweep::TrialRecord>& records) {
  std::map<std::string, uint64_t> out;
  for (const auto& r : records) out[cimsweep::unit_key(r)] = r.correct;
  return out;
}

class Cluster : public ::testing::Test {
 protected:
  void SetUp() override {
    write_tiny_idx_test_split(dir.path(), cimsweep::testing::test_seed(777));
    common = kModel + " --data " + dir.path() + " --quiet --batch 16 --format csv";
  }
  TempDir dir;
  std::string common;
};

TEST_F(Cluster, EveryShardCountUnionEqualsTheUnshardedSweep) {
  const std::string sweep = "sweep " + common + " --sigmas 0,0.05,0.1 --trials 3";
  const auto whole = run_cimsweep(sweep + " --results " + dir.file("whole.jsonl"));
  ASSERT_EQ(whole.exit_code, 0) << whole.err;
  const auto expected = results_by_unit(cimsweep::read_results_file(dir.file("whole.jsonl")));
  ASSERT_EQ(expected.size(), 8u);  // clean + σ = 0's one chip (all are the same) + 2 σ × 3 trials

  for (int shards : {2, 3, 11}) {
    std::string files;
    size_t units = 0;
    for (int i = 0; i < shards; ++i) {
      const std::string file = dir.file("n" + std::to_string(shards) + "_" + std::to_string(i));
      const auto r = run_cimsweep(sweep + " --shard " + std::to_string(i) + "/" +
                                  std::to_string(shards) + " --results " + file);
      ASSERT_EQ(r.exit_code, 0) << r.err;
      // A shard without units (11 shards of 8 units) runs nothing and leaves no file.
      const size_t in_shard =
          std::filesystem::exists(file) ? cimsweep::read_results_file(file).size() : 0;
      // Round-robin shares: sizes differ by at most one unit.
      EXPECT_LE(in_shard, (expected.size() + shards - 1) / shards);
      EXPECT_GE(in_shard, expected.size() / shards);
      units += in_shard;
      if (in_shard > 0) files += " " + file;
    }
    EXPECT_EQ(units, expected.size()) << shards << " shards: a unit ran twice or not at all";
    const auto merged = run_cimsweep("merge" + files + " --format csv --results " +
                                     dir.file("merged" + std::to_string(shards)));
    ASSERT_EQ(merged.exit_code, 0) << merged.err;
    EXPECT_EQ(merged.out, whole.out) << shards << " shards";
    EXPECT_EQ(
        results_by_unit(cimsweep::read_results_file(dir.file("merged" + std::to_string(shards)))),
        expected);
  }
}

// --ci-width: whole rounds per cell, each cell decided on its own chips, so shards (which take
// whole cells) and a resumed run stop where the single run stops, with the same chips.
TEST_F(Cluster, StoppingRuleIsTheSameWithShardsAndResume) {
  const std::string sweep =
      "sweep " + common + " --sigmas 0,0.6 --ci-width 2 --min-trials 3 --max-trials 8";
  const auto whole = run_cimsweep(sweep + " --results " + dir.file("whole.jsonl"));
  ASSERT_EQ(whole.exit_code, 0) << whole.err;
  const auto records = cimsweep::read_results_file(dir.file("whole.jsonl"));
  std::map<double, int> chips;
  for (const auto& r : records)
    if (r.trial >= 0) ++chips[r.sigma];
  // σ = 0 has no chip variation: one chip settles it; a noisy cell needs more rounds.
  EXPECT_EQ(chips[0.0], 1);
  EXPECT_GT(chips[0.6], 3) << whole.out;
  for (const auto& [sigma, n] : chips) {
    EXPECT_LE(n, 8);
    std::vector<cimsweep::TrialRecord> cell;
    for (const auto& r : records)
      if (r.trial >= 0 && r.sigma == sigma) cell.push_back(r);
    // The stopping point is the rule's: settled (next_round_size is the count) and never past it.
    if (sigma != 0) EXPECT_EQ(cimsweep::next_round_size(cell, 2, 3, 8), n) << sigma;
    // The table marks the cell iff it stopped at the cap with its interval still too wide.
    const bool capped = n == 8 && cimsweep::next_round_size(cell, 2, 3, 1000) > 8;
    const std::string row = "golden_resnet8_k5_w3_11x13_shortcutB_exits," +
                            nlohmann::json(sigma).dump() + ",";
    for (const std::string& line : split_lines(whole.out))
      if (line.rfind(row, 0) == 0)
        EXPECT_EQ(line.substr(line.rfind(",2.0,")), capped ? ",2.0,true" : ",2.0,false") << line;
  }
  EXPECT_NE(whole.out.find("ci_target,hit_cap"), std::string::npos) << whole.out;

  {  // two shards, each taking whole cells
    const int shards = 2;
    std::string files;
    for (int i = 0; i < shards; ++i) {
      const std::string file = dir.file("c" + std::to_string(shards) + "_" + std::to_string(i));
      const auto r = run_cimsweep(sweep + " --shard " + std::to_string(i) + "/" +
                                  std::to_string(shards) + " --results " + file);
      ASSERT_EQ(r.exit_code, 0) << r.err;
      if (std::filesystem::exists(file)) files += " " + file;
    }
    const auto merged =
        run_cimsweep("merge" + files + " --format csv --ci-width 2 --max-trials 8 --results " +
                     dir.file("cm" + std::to_string(shards)));
    ASSERT_EQ(merged.exit_code, 0) << merged.err;
    EXPECT_EQ(merged.out, whole.out) << shards << " shards";
    EXPECT_EQ(
        results_by_unit(cimsweep::read_results_file(dir.file("cm" + std::to_string(shards)))),
        results_by_unit(records));
  }

  // Killed after a few chips: the resumed run ends where the whole one did, with the same chips.
  const std::vector<std::string> lines = split_lines(read_text(dir.file("whole.jsonl")));
  std::string head;
  for (size_t i = 0; i < 5; ++i) head += lines[i] + "\n";
  cimsweep::testing::write_text(dir.file("part.jsonl"), head);
  const auto resumed = run_cimsweep(sweep + " --resume --results " + dir.file("part.jsonl"));
  ASSERT_EQ(resumed.exit_code, 0) << resumed.err;
  EXPECT_EQ(resumed.out, whole.out);
  EXPECT_EQ(results_by_unit(cimsweep::read_results_file(dir.file("part.jsonl"))),
            results_by_unit(records));
}

TEST(StoppingRule, RoundsGrowTowardsTheTargetAndStopAtTheCap) {
  auto chips = [](const std::vector<double>& accuracies) {
    std::vector<cimsweep::TrialRecord> records;
    for (double a : accuracies) {
      cimsweep::TrialRecord r;
      r.accuracy = a;
      records.push_back(r);
    }
    return records;
  };
  EXPECT_EQ(cimsweep::next_round_size(chips({}), 1, 10, 100), 10);
  EXPECT_EQ(cimsweep::next_round_size(chips({80, 80, 80}), 1, 3, 100), 3);  // settled
  // 10 chips, std 9.5: half-width 6.8; n·(7.15/1)²·1.1 ≫ 2n, so the round doubles n.
  std::vector<double> spread;
  for (int i = 0; i < 10; ++i) spread.push_back(i % 2 ? 60 : 40 + 0.5 * i);
  EXPECT_EQ(cimsweep::next_round_size(chips(spread), 1, 10, 5000), 20);
  EXPECT_EQ(cimsweep::next_round_size(chips(spread), 1, 10, 15), 15);   // the cap
  EXPECT_EQ(cimsweep::next_round_size(chips(spread), 1, 10, 10), 10);   // at the cap: stop
  // Close to the target: aim 10 % beyond the predicted n, at least min_trials more.
  const double half = cimsweep::interval_half_width(cimsweep::summarize(spread));
  EXPECT_EQ(cimsweep::next_round_size(chips(spread), half * 0.99, 10, 5000), 20);
  EXPECT_EQ(cimsweep::next_round_size(chips(spread), half * 0.8, 3, 5000),
            int(std::ceil(1.1 * 10 / 0.64)));
}

TEST(StoppingRule, SweepFileKeysAndTheirErrors) {
  cimsweep::testing::TempDir dir;
  const std::string head = "sigmas = [0.1]\n";
  cimsweep::testing::write_text(dir.file("ok.toml"),
                                head + "ci_width = 1.5\nmin_trials = 4\nmax_trials = 40\n");
  const cimsweep::SweepPlan plan = cimsweep::read_sweep_spec(dir.file("ok.toml"));
  EXPECT_EQ(plan.ci_width, 1.5);
  EXPECT_EQ(plan.min_trials, 4);
  EXPECT_EQ(plan.max_trials, 40);
  EXPECT_TRUE(plan.adaptive());
  for (const std::string bad : {"ci_width = -1\n", "ci_width = \"wide\"\n", "min_trials = 2.5\n"}) {
    cimsweep::testing::write_text(dir.file("bad.toml"), head + bad);
    EXPECT_THROW(cimsweep::read_sweep_spec(dir.file("bad.toml")), cimsweep::UserError) << bad;
  }
  cimsweep::SweepPlan few = plan;
  few.models.push_back({"m", "m.safetensors"});
  few.min_trials = 2;  // no interval to stop on
  EXPECT_THROW(cimsweep::validate_plan(few), cimsweep::UserError);
  few.min_trials = 50;  // above max_trials
  EXPECT_THROW(cimsweep::validate_plan(few), cimsweep::UserError);
}

TEST_F(Cluster, DevicesSplitTheTrialsWithoutChangingThem) {
  const std::string sweep = "sweep " + common + " --sigmas 0.05,0.1 --trials 4";
  const auto one = run_cimsweep(sweep + " --results " + dir.file("one.jsonl"));
  ASSERT_EQ(one.exit_code, 0) << one.err;
  for (const std::string devices : {"0,1", "3,1,2"}) {
    const std::string file = dir.file("dev" + devices + ".jsonl");
    const auto many =
        run_cimsweep(sweep + " --backend cpu --devices " + devices + " --results " + file);
    ASSERT_EQ(many.exit_code, 0) << many.err;
    EXPECT_EQ(many.out, one.out) << devices;
    const auto records = cimsweep::read_results_file(file);
    EXPECT_EQ(results_by_unit(records),
              results_by_unit(cimsweep::read_results_file(dir.file("one.jsonl"))));
    std::set<int> workers;
    for (const auto& r : records)
      if (r.extra.contains("worker")) workers.insert(r.extra["worker"].get<int>());
    EXPECT_GE(workers.size(), 2u) << "the trials did not spread over the workers";
  }
}

TEST_F(Cluster, MergeIsIdempotentAndKeepsAShardThatRanTwiceOnce) {
  const std::string sweep = "sweep " + common + " --sigmas 0.1 --trials 3";
  for (int i = 0; i < 2; ++i)
    ASSERT_EQ(run_cimsweep(sweep + " --shard " + std::to_string(i) + "/2 --results " +
                           dir.file("s" + std::to_string(i)))
                  .exit_code,
              0);
  const std::string shards = dir.file("s0") + " " + dir.file("s1");
  const auto first = run_cimsweep("merge " + shards + " --results " + dir.file("m.jsonl"));
  ASSERT_EQ(first.exit_code, 0) << first.err;
  const std::string merged_once = read_text(dir.file("m.jsonl"));
  EXPECT_EQ(split_lines(merged_once).size(), 4u);
  // Again, with shard 0 listed twice and the merged file among the inputs.
  const auto second = run_cimsweep("merge " + shards + " " + dir.file("s0") + " " +
                                   dir.file("m.jsonl") + " --results " + dir.file("m.jsonl"));
  ASSERT_EQ(second.exit_code, 0) << second.err;
  EXPECT_EQ(read_text(dir.file("m.jsonl")), merged_once);
  EXPECT_EQ(second.out, first.out);
}

TEST_F(Cluster, MergeRefusesResultsThatDisagree) {
  ASSERT_EQ(run_cimsweep("sweep " + common + " --sigmas 0.1 --trials 2 --no-clean --results " +
                         dir.file("a"))
                .exit_code,
            0);
  // The same units with one result changed, as a shard from another build would have them.
  std::string text = read_text(dir.file("a"));
  auto record = nlohmann::json::parse(split_lines(text)[0]);
  record["correct"] = record["correct"].get<int>() + 1;
  cimsweep::testing::write_text(dir.file("b"), record.dump() + "\n");
  const auto r = run_cimsweep("merge " + dir.file("a") + " " + dir.file("b"));
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.err.find("disagree"), std::string::npos) << r.err;
  EXPECT_EQ(split_lines(r.err).size(), 1u) << r.err;
  // Another configuration under the same model label.
  ASSERT_EQ(run_cimsweep("sweep " + common +
                         " --sigmas 0.1 --trials 1 --no-clean --rows 16 "
                         "--results " +
                         dir.file("c"))
                .exit_code,
            0);
  const auto mixed = run_cimsweep("merge " + dir.file("a") + " " + dir.file("c"));
  EXPECT_EQ(mixed.exit_code, 2);
  EXPECT_NE(mixed.err.find("two configurations"), std::string::npos) << mixed.err;
}

TEST_F(Cluster, BadShardsAndDeviceListsGetOneLine) {
  for (const std::string shard : {"3/3", "1", "a/b", "-1/2", "0/0", "1/2/3", "0/ 2"}) {
    const auto r = run_cimsweep("sweep " + common + " --sigmas 0.1 --shard '" + shard + "'");
    EXPECT_EQ(r.exit_code, 2) << shard << ": " << r.err;
    EXPECT_NE(r.err.find("--shard"), std::string::npos) << r.err;
    EXPECT_EQ(split_lines(r.err).size(), 1u) << r.err;
  }
  for (const std::string devices : {"0,0", "a", "0,,1", "-1"}) {
    const auto r = run_cimsweep("sweep " + common + " --sigmas 0.1 --devices '" + devices + "'");
    EXPECT_EQ(r.exit_code, 2) << devices << ": " << r.err;
    EXPECT_NE(r.err.find("--devices"), std::string::npos) << r.err;
  }
  const auto none = run_cimsweep("merge " + dir.file("missing.jsonl"));
  EXPECT_EQ(none.exit_code, 2);
  EXPECT_NE(none.err.find("missing.jsonl"), std::string::npos) << none.err;
}

TEST(ShardParsing, AcceptsIOverNAndRejectsTheRest) {
  EXPECT_EQ(cimsweep::parse_shard("0/1"), std::make_pair(0, 1));
  EXPECT_EQ(cimsweep::parse_shard("7/8"), std::make_pair(7, 8));
  EXPECT_THROW(cimsweep::parse_shard("8/8"), cimsweep::UserError);
  EXPECT_THROW(cimsweep::parse_shard("99999999999/2"), cimsweep::UserError);
  EXPECT_EQ(cimsweep::parse_device_list("2,0"), (std::vector<int>{2, 0}));
  EXPECT_THROW(cimsweep::parse_device_list(""), cimsweep::UserError);
}

// Starts cimsweep with stdout and stderr into files (none given: thrown away); returns the pid.
pid_t spawn_cimsweep(const std::vector<std::string>& args, const std::string& out = "",
                     const std::string& err = "") {
  std::vector<std::string> argv_text = {CIMSWEEP_BINARY};
  argv_text.insert(argv_text.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (auto& a : argv_text) argv.push_back(a.data());
  argv.push_back(nullptr);
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  const int file_flags = O_WRONLY | O_CREAT | O_TRUNC;
  posix_spawn_file_actions_addopen(&actions, 1, out.empty() ? "/dev/null" : out.c_str(),
                                   out.empty() ? O_WRONLY : file_flags, 0644);
  posix_spawn_file_actions_addopen(&actions, 2, err.empty() ? "/dev/null" : err.c_str(),
                                   err.empty() ? O_WRONLY : file_flags, 0644);
  pid_t pid = -1;
  const int rc = posix_spawn(&pid, argv[0], &actions, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  if (rc != 0) return -1;
  return pid;
}

TEST_F(Cluster, KilledAgainAndAgainThenResumedLosesAndRepeatsNothing) {
  const uint32_t seed = cimsweep::testing::test_seed(2718);
  std::mt19937 rng(seed);
  const std::vector<std::string> sweep = {
      "sweep", kModel,     "--data",   dir.path(), "--quiet", "--batch",  "16", "--threads",
      "1",     "--sigmas", "0.05,0.1", "--trials", "25",      "--format", "csv"};
  const auto whole = run_cimsweep("sweep " + common + " --threads 1 --sigmas 0.05,0.1 --trials 25");
  ASSERT_EQ(whole.exit_code, 0) << whole.err;

  std::vector<std::string> resumed = sweep;
  for (const char* a : {"--results", "", "--resume", "--output", ""}) resumed.push_back(a);
  resumed[resumed.size() - 4] = dir.file("r.jsonl");
  resumed.back() = dir.file("table.csv");
  // Counts the complete lines of the results file (what a resumed run will reuse).
  auto complete_lines = [&] {
    const std::string text = read_text(dir.file("r.jsonl"));
    return size_t(std::count(text.begin(), text.end(), '\n'));
  };
  int kills = 0, finished = 0;
  size_t previous_lines = 0;
  for (int attempt = 0; attempt < 200 && !finished; ++attempt) {
    const pid_t pid = spawn_cimsweep(resumed);
    ASSERT_GT(pid, 0);
    // Kill at a random moment: a quarter of the runs at any time from start-up on, the others
    // a random 0–80 ms after they appended a record (mid-trial or mid-append), so that each of
    // those runs makes progress however slow the machine; after 40 kills, let it finish.
    const bool early = rng() % 4 == 0;
    const auto early_deadline =
        std::chrono::steady_clock::now() + std::chrono::milliseconds(rng() % 300);
    const auto extra = std::chrono::milliseconds(rng() % 80);
    std::optional<std::chrono::steady_clock::time_point> deadline;
    if (early) deadline = early_deadline;
    int status = 0;
    pid_t done = 0;
    while ((done = waitpid(pid, &status, WNOHANG)) == 0) {
      const auto now = std::chrono::steady_clock::now();
      if (kills < 40) {
        if (!deadline && complete_lines() > previous_lines) deadline = now + extra;
        if (deadline && now >= *deadline) break;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
    if (done == 0) {
      kill(pid, SIGKILL);
      waitpid(pid, &status, 0);
      ++kills;
      // The table is written atomically at the end: a killed run leaves none or a whole one.
      EXPECT_FALSE(std::filesystem::exists(dir.file("table.csv")) &&
                   read_text(dir.file("table.csv")) != whole.out);
    } else {
      ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "status " << status;
      finished = 1;
    }
    // Whatever the kill left, every complete line is a record and the records only grow.
    if (std::filesystem::exists(dir.file("r.jsonl"))) {
      const auto records = cimsweep::read_results_file(dir.file("r.jsonl"));
      EXPECT_GE(records.size(), previous_lines);
      previous_lines = records.size();
    }
  }
  ASSERT_TRUE(finished) << "the sweep never finished between kills";
  EXPECT_GE(kills, 3) << "too few kills landed mid-sweep for this test to mean anything";
  std::printf("[ kills    ] %d kills survived\n", kills);
  EXPECT_EQ(read_text(dir.file("table.csv")), whole.out);

  // No unit twice in the file, and every line a complete record.
  std::set<std::string> keys;
  const auto raw = split_lines(read_text(dir.file("r.jsonl")));
  for (const auto& line : raw) {
    const auto record = cimsweep::trial_from_json(nlohmann::json::parse(line));
    EXPECT_TRUE(keys.insert(cimsweep::unit_key(record)).second) << "twice: " << line;
  }
  EXPECT_EQ(raw.size(), 51u);  // clean + 2 σ × 25 trials
  // Runs killed while writing the table left temporaries; the finishing run removed them.
  for (const auto& entry : std::filesystem::directory_iterator(dir.path()))
    EXPECT_EQ(entry.path().filename().string().find("table.csv.tmp-"), std::string::npos)
        << entry.path();
}

// Two writers started together on one results file (issue 13, rows 4 and 5): with
// --wait-for-lock both finish, the second resuming what the first wrote; without it the second
// stops at once naming the first's pid. Either way every unit is in the file exactly once and
// every finished run prints the same table.
TEST_F(Cluster, TwoConcurrentWritersOnOneFileNeitherDuplicateNorLose) {
  std::string table;  // the first finished run's; every other must print the same
  for (int round = 0; round < 2; ++round) {
    const bool wait = round % 2 == 0;
    const std::string file = dir.file("shared" + std::to_string(round) + ".jsonl");
    std::vector<std::string> args = {"sweep",     kModel,  "--data",   dir.path(), "--quiet",
                                     "--batch",   "16",    "--format", "csv",      "--threads",
                                     "1",         "--sigmas", "0.05,0.1", "--trials", "2",
                                     "--results", file,    "--resume"};
    if (wait) args.push_back("--wait-for-lock");
    pid_t pids[2];
    for (int w = 0; w < 2; ++w) {
      pids[w] = spawn_cimsweep(args, dir.file("out" + std::to_string(w)),
                                    dir.file("err" + std::to_string(w)));
      ASSERT_GT(pids[w], 0);
    }
    int succeeded = 0;
    for (int w = 0; w < 2; ++w) {
      int status = 0;
      waitpid(pids[w], &status, 0);
      ASSERT_TRUE(WIFEXITED(status));
      const std::string err = read_text(dir.file("err" + std::to_string(w)));
      if (WEXITSTATUS(status) == 0) {
        ++succeeded;
        const std::string out = read_text(dir.file("out" + std::to_string(w)));
        if (table.empty()) table = out;
        EXPECT_EQ(out, table) << "round " << round;
      } else {
        EXPECT_FALSE(wait) << err;
        EXPECT_EQ(WEXITSTATUS(status), 2) << err;
        EXPECT_NE(err.find("is being written by another cimsweep (pid " +
                           std::to_string(pids[1 - w]) + ")"),
                  std::string::npos)
            << err;
      }
    }
    EXPECT_GE(succeeded, wait ? 2 : 1);
    std::set<std::string> keys;
    const auto lines = split_lines(read_text(file));
    for (const auto& line : lines) {
      const auto record = cimsweep::trial_from_json(nlohmann::json::parse(line));
      EXPECT_TRUE(keys.insert(cimsweep::unit_key(record)).second) << "twice: " << line;
    }
    EXPECT_EQ(lines.size(), 5u) << "round " << round;  // clean + 2 σ × 2 trials
  }
  EXPECT_EQ(split_lines(table).size(), 3u) << table;  // csv header and one row per σ
}

}  // namespace

namespace {

// --print-config: the plan as a sweep file that runs the same. Every CIM option moved off its
// default, the command line over the sweep file's values; printed, read back, printed again.
TEST(PrintConfig, CimOptionValuesRoundTripEveryOption) {
  cimsweep::CimConfig c;
  for (const auto& [name, value] :
       cimsweep::CimOptionValues{{"weight-bits", "6"}, {"cell-bits", "2"}, {"input-bits", "5"},
                                 {"rows", "33"}, {"onoff", "17.5"}, {"weight-scaling", "wage"},
                                 {"variation", "cycle"}, {"clamp-at-zero", "true"},
                                 {"reference-variation", "true"}, {"mapping", "dense"},
                                 {"adc-bits", "7"}, {"adc", "calibrated"}, {"batch", "13"},
                                 {"digital-layers", "conv1,fc"}, {"neurosim-scale", "true"},
                                 {"seed", "4000000000"}})
    cimsweep::set_cim_option(c, name, value);
  const cimsweep::CimOptionValues values = cimsweep::cim_option_values(c);
  ASSERT_EQ(values.size(), cimsweep::cim_options().size());
  for (size_t i = 0; i < values.size(); ++i)
    EXPECT_EQ(values[i].first, cimsweep::cim_options()[i].name) << "in cim_options()'s order";
  cimsweep::CimConfig back;
  cimsweep::set_cim_options(back, values);
  EXPECT_EQ(back.to_json(), c.to_json());
  EXPECT_NE(back.to_json(), cimsweep::CimConfig{}.to_json()) << "the options were moved";
  cimsweep::CimConfig infinite;
  cimsweep::set_cim_option(infinite, "onoff", "inf");
  cimsweep::CimConfig infinite_back;
  cimsweep::set_cim_options(infinite_back, cimsweep::cim_option_values(infinite));
  EXPECT_EQ(infinite_back.to_json(), infinite.to_json());
}

TEST(PrintConfig, PrintsASweepFileThatPlansTheSameRun) {
  TempDir dir;
  write_tiny_idx_test_split(dir.path(), cimsweep::testing::test_seed(778));
  cimsweep::testing::write_text(
      dir.file("spec.toml"),
      "name = \"mine\"\nsigmas = [0.1, 0.05]\ntrials = 4\n[cim]\nadc = \"fixed\"\nrows = 64\n"
      "[[models]]\npath = \"" + kModel + "\"\nlabel = \"tiny\"\n");
  const std::string spec = dir.file("spec.toml"), results = dir.file("r.jsonl");
  const std::string options = " --data " + dir.path() +
                              " --trials 3 --adc-bits 6 --clamp-at-zero --limit 40 --batch 16 --quiet";
  const auto printed =
      run_cimsweep("sweep --spec " + spec + options + " --print-config --results " + results);
  ASSERT_EQ(printed.exit_code, 0) << printed.err;
  EXPECT_FALSE(std::filesystem::exists(results)) << "nothing ran";
  std::cout << printed.out;
  const std::string file = dir.file("printed.toml");
  cimsweep::testing::write_text(file, printed.out);
  const cimsweep::SweepPlan plan = cimsweep::read_sweep_spec(file);
  EXPECT_EQ(plan.name, "mine");
  EXPECT_EQ(plan.trials, 3) << "the command line over the sweep file";
  EXPECT_EQ(plan.limit, 40u);
  EXPECT_EQ(std::set<double>(plan.sigmas.begin(), plan.sigmas.end()), (std::set<double>{0.05, 0.1}));
  EXPECT_EQ(plan.data_path, std::filesystem::absolute(dir.path()).lexically_normal().string());
  ASSERT_EQ(plan.models.size(), 1u);
  EXPECT_EQ(plan.models[0].path, kModel);
  EXPECT_EQ(plan.models[0].label, "tiny");
  EXPECT_EQ(plan.cim.adc, cimsweep::AdcMode::kFixed);
  EXPECT_EQ(plan.cim.subarray_rows, 64);
  EXPECT_EQ(plan.cim.adc_bits, 6);
  EXPECT_EQ(plan.cim.batch_size, 16);
  EXPECT_TRUE(plan.cim.clamp_at_zero);
  // The printed file prints itself, and runs the table of the command line it came from.
  const auto again = run_cimsweep("sweep --spec " + file + " --print-config");
  ASSERT_EQ(again.exit_code, 0) << again.err;
  EXPECT_EQ(again.out, printed.out);
  const auto original = run_cimsweep("sweep --spec " + spec + options + " --format csv");
  const auto from_file = run_cimsweep("sweep --spec " + file + " --quiet --format csv");
  ASSERT_EQ(original.exit_code, 0) << original.err;
  ASSERT_EQ(from_file.exit_code, 0) << from_file.err;
  EXPECT_EQ(from_file.out, original.out);
  EXPECT_GT(std::count(original.out.begin(), original.out.end(), '\n'), 2) << original.out;
}

}  // namespace
