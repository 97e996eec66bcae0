// The command line as a hostile, careful user drives it (issue 13): outputs that must not be
// replaced, results that must not be overwritten or mixed, numbers that used to overflow, and
// oddities that now get a note or one clear line — each before any trial runs.
#include <gtest/gtest.h>
#include <sys/stat.h>

#include <filesystem>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "host/results/results.h"
#include "host/io/safetensors.h"
#include "tests/test_util.h"

namespace {

using cimsweep::testing::read_text;
using cimsweep::testing::run_cimsweep;
using cimsweep::testing::split_lines;
using cimsweep::testing::TempDir;
using cimsweep::testing::write_text;
namespace fs = std::filesystem;

const std::string kModel = std::string(CIMSWEEP_SOURCE_DIR) +
                           "/tests/data/golden_resnet8_k5_w3_11x13_shortcutB_exits.safetensors";

bool has(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}

class CliSafety : public ::testing::Test {
 protected:
  void SetUp() override {
    cimsweep::testing::write_tiny_idx_test_split(dir.path(), cimsweep::testing::test_seed(1313));
    common = kModel + " --data " + dir.path() + " --quiet --batch 16";
  }
  // A refusal: exit 2, one line holding `part`, nothing on stdout.
  void expect_refused(const cimsweep::testing::CommandResult& r, const std::string& part) {
    EXPECT_EQ(r.exit_code, 2) << r.err;
    EXPECT_EQ(r.out, "");
    EXPECT_EQ(split_lines(r.err).size(), 1u) << r.err;
    EXPECT_TRUE(has(r.err, part)) << r.err;
  }
  TempDir dir;
  std::string common;
};

// Row 1: /dev/stdout is /proc/self/fd/1: the table reaches stdout, nothing is renamed over it.
TEST_F(CliSafety, OutputToADescriptorGoesToIt) {
  const auto r = run_cimsweep("eval " + common + " --format csv --output /proc/self/fd/1");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_TRUE(has(r.out, "model,sigma,trials")) << r.out;
}

// Row 1 with a FIFO: the reader gets the table and the FIFO stays one.
TEST_F(CliSafety, OutputToAFifoIsWrittenStraight) {
  const std::string fifo = dir.file("pipe");
  ASSERT_EQ(mkfifo(fifo.c_str(), 0644), 0);
  std::string received;
  std::thread reader([&] { received = read_text(fifo); });
  const auto r = run_cimsweep("eval " + common + " --format csv --output " + fifo);
  reader.join();
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_TRUE(has(received, "model,sigma,trials")) << received;
  struct stat status;
  ASSERT_EQ(lstat(fifo.c_str(), &status), 0);
  EXPECT_TRUE(S_ISFIFO(status.st_mode));
}

// Row 2: symlinked --output and merge --results: the links stay, their targets get the data.
TEST_F(CliSafety, SymlinkedOutputsWriteTheirTargets) {
  ASSERT_EQ(run_cimsweep("eval " + common + " --results " + dir.file("r.jsonl")).exit_code, 0);
  write_text(dir.file("target.md"), "old\n");
  fs::create_symlink("target.md", dir.file("out.md"));
  fs::create_symlink("merged-target.jsonl", dir.file("ml.jsonl"));
  const auto r = run_cimsweep("merge " + dir.file("r.jsonl") + " --output " + dir.file("out.md") +
                              " --results " + dir.file("ml.jsonl"));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_TRUE(fs::is_symlink(dir.file("out.md")));
  EXPECT_TRUE(fs::is_symlink(dir.file("ml.jsonl")));
  EXPECT_TRUE(has(read_text(dir.file("target.md")), "| model |"));
  EXPECT_EQ(cimsweep::read_results_file(dir.file("merged-target.jsonl")).size(), 2u);
}

// Row 3: the table never overwrites the results or a merge input, however spelled.
TEST_F(CliSafety, OutputEqualToResultsOrAnInputIsRefusedBeforeWork) {
  expect_refused(run_cimsweep("eval " + common + " --trials 2 --results " + dir.file("same.jsonl") +
                              " --output " + dir.path() + "/./same.jsonl"),
                 "is the same file as --results");
  EXPECT_FALSE(fs::exists(dir.file("same.jsonl")));
  expect_refused(run_cimsweep("eval " + common + " --output " + kModel), "model file");
  ASSERT_EQ(run_cimsweep("eval " + common + " --results " + dir.file("m2.jsonl")).exit_code, 0);
  const std::string before = read_text(dir.file("m2.jsonl"));
  fs::create_hard_link(dir.file("m2.jsonl"), dir.file("m2-link.jsonl"));
  expect_refused(run_cimsweep("merge " + dir.file("m2.jsonl") + " --output " +
                              dir.file("m2-link.jsonl")),
                 "is the same file as the merge input");
  EXPECT_EQ(read_text(dir.file("m2.jsonl")), before);
}

// Row 6: an absurd thread count is capped with a note instead of crashing libgomp.
TEST_F(CliSafety, ThreadCountIsCapped) {
  const auto r = run_cimsweep("eval " + common + " --no-clean --threads 100000");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_TRUE(has(r.err, "note: --threads 100000 is more than 4 ×")) << r.err;
}

// Row 7: trial numbers that overflow or reach the calibration chips (2^30) are refused.
TEST_F(CliSafety, TrialNumbersStayBelowTheCalibrationRange) {
  for (const char* range : {"--first-trial 2147483647 --trials 2",
                            "--first-trial 1073741823 --trials 2", "--trials 2147483647"})
    expect_refused(run_cimsweep("eval " + common + " --no-clean " + range + " --results " +
                                dir.file("ft.jsonl")),
                   "2^30");
  EXPECT_FALSE(fs::exists(dir.file("ft.jsonl")));
  // The last two trials below 2^30 still run, and --no-clean means no clean record (at σ > 0:
  // a σ = 0 cell runs one chip whatever the trial count).
  const auto r = run_cimsweep("eval " + common + " --sigma 0.05 --no-clean --first-trial 1073741822 --trials 2 "
                              "--results " + dir.file("ok.jsonl"));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const auto records = cimsweep::read_results_file(dir.file("ok.jsonl"));
  ASSERT_EQ(records.size(), 2u);
  EXPECT_EQ(records[1].trial, 1073741823);
  for (const auto& record : records) EXPECT_GE(record.trial, 0);
}

// Row 8: an unwritable --output stops the sweep before its first trial.
TEST_F(CliSafety, UnwritableOutputIsFoundBeforeAnyTrial) {
  expect_refused(run_cimsweep("sweep " + common + " --sigmas 0.1 --output " +
                              dir.file("nodir/t.md") + " --results " + dir.file("r.jsonl")),
                 "does not exist");
  EXPECT_FALSE(fs::exists(dir.file("r.jsonl"))) << "trials ran before the check";
}

// Row 9: planning visits only the shard's units: a 10^9-trial sweep's two-unit shard runs at
// once (it used to materialise every unit of the sweep first); too many units for one run is
// a line saying how many shards.
TEST_F(CliSafety, PlanningCostsTheShardNotTheSweep) {
  write_text(dir.file("big.toml"), "trials = 1000000000\nsigmas = [0.1]\nclean = false\n");
  const std::string spec = "sweep --spec " + dir.file("big.toml") + " " + common;
  const auto shard = run_cimsweep(spec + " --shard 0/500000000 --results " + dir.file("s.jsonl"));
  ASSERT_EQ(shard.exit_code, 0) << shard.err;
  const auto records = cimsweep::read_results_file(dir.file("s.jsonl"));
  ASSERT_EQ(records.size(), 2u);
  EXPECT_EQ(records[0].trial, 0);
  EXPECT_EQ(records[1].trial, 500000000);
  expect_refused(run_cimsweep(spec), "--shard I/N, N ≥ 477");
}

// Row 10: a sweep with other σ values never resumes or merges the old shards' trials.
TEST_F(CliSafety, ChangedSigmasNeverMixWithOldShards) {
  const std::string args = "sweep " + common + " --no-clean --results " + dir.file("s.jsonl");
  ASSERT_EQ(run_cimsweep(args + " --sigmas 0.05").exit_code, 0);
  const auto changed = run_cimsweep(args + " --sigmas 0.2 --resume");
  ASSERT_EQ(changed.exit_code, 0) << changed.err;
  EXPECT_TRUE(has(changed.err, "under other settings")) << changed.err;
  EXPECT_EQ(split_lines(changed.out).size(), 3u) << "only σ = 0.2 in the table:\n" << changed.out;
  expect_refused(run_cimsweep("merge " + dir.file("s.jsonl")), "two configurations");
  // `slurm` says so before submitting anything.
  fs::create_directory(dir.file("results"));
  fs::copy_file(dir.file("s.jsonl"), dir.file("results/shard-0.jsonl"));
  fs::copy_file(kModel, dir.file("m.safetensors"));
  write_text(dir.file("spec.toml"), "sigmas = [0.2]\n[[models]]\npath = \"m.safetensors\"\n");
  expect_refused(run_cimsweep("slurm " + dir.file("spec.toml") + " --shards 1 --data " +
                              dir.path() + " --results-dir " + dir.file("results")),
                 "with trials at σ = 0.05");
}

// Row 11: a σ listed twice runs once.
TEST_F(CliSafety, DuplicateSigmasRunOnce) {
  const auto r = run_cimsweep("sweep " + common + " --sigmas 0.05,0.05,0.050 --results " +
                              dir.file("d.jsonl"));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_TRUE(has(r.err, "note: σ = 0.05 is listed 3 times; it runs once")) << r.err;
  EXPECT_EQ(cimsweep::read_results_file(dir.file("d.jsonl")).size(), 2u);  // clean + 1 trial
}

// Row 12: merge notes a torn line, refuses an empty result, and refuses models run on different
// data unless forced.
TEST_F(CliSafety, MergeSaysWhatItDropsAndRefusesMixedSettings) {
  ASSERT_EQ(run_cimsweep("eval " + common + " --sigma 0.1 --trials 2 --results " +
                         dir.file("a.jsonl")).exit_code, 0);
  const auto lines = split_lines(read_text(dir.file("a.jsonl")));
  write_text(dir.file("torn.jsonl"), lines[0] + "\n" + lines[1] + "\n" + lines[2].substr(0, 20));
  const auto torn = run_cimsweep("merge " + dir.file("torn.jsonl"));
  ASSERT_EQ(torn.exit_code, 0) << torn.err;
  EXPECT_TRUE(has(torn.err, "'" + dir.file("torn.jsonl") + "' ends in a torn line")) << torn.err;

  write_text(dir.file("empty.jsonl"), "");
  expect_refused(run_cimsweep("merge " + dir.file("empty.jsonl")), "no trial records");

  fs::copy_file(kModel, dir.file("other.safetensors"));
  ASSERT_EQ(run_cimsweep("eval " + dir.file("other.safetensors") + " --data " + dir.path() +
                         " --quiet --batch 16 --sigma 0.1 --limit 21 --results " +
                         dir.file("b.jsonl")).exit_code, 0);
  expect_refused(run_cimsweep("merge " + dir.file("a.jsonl") + " " + dir.file("b.jsonl")),
                 "were run on different data or CIM settings (data:");
  const auto forced =
      run_cimsweep("merge " + dir.file("a.jsonl") + " " + dir.file("b.jsonl") + " --force");
  ASSERT_EQ(forced.exit_code, 0) << forced.err;
  EXPECT_EQ(split_lines(forced.out).size(), 4u) << forced.out;
}

// Row 14: oddities get a note, or one line naming the file at fault.
TEST_F(CliSafety, OdditiesGetANoteOrOneLine) {
  const auto limit = run_cimsweep("eval " + common + " --no-clean --limit 20000 --policy-on-cim");
  ASSERT_EQ(limit.exit_code, 0) << limit.err;
  EXPECT_TRUE(has(limit.err, "note: --limit 20000 is more than the 42 images")) << limit.err;
  EXPECT_TRUE(has(limit.err, "note: --policy-on-cim has no effect")) << limit.err;
  expect_refused(run_cimsweep("eval " + common + " --sigma 1e308"), "σ = 1e+308 is beyond 100");
  expect_refused(run_cimsweep("eval " + common + " --sigma nan"), "σ must be a finite number");
  const auto big = run_cimsweep("eval " + common + " --no-clean --sigma 2");
  ASSERT_EQ(big.exit_code, 0) << big.err;
  EXPECT_TRUE(has(big.err, "note: σ = 2.0 is above 1")) << big.err;

  // A BlockDrop policy whose backbone is gone: `info` stops as eval would.
  cimsweep::SafetensorsFile file = cimsweep::read_safetensors(kModel);
  file.metadata["cimsweep.blockdrop"] =
      nlohmann::json{{"backbone", "gone.safetensors"}, {"backbone_hash", "0"}}.dump();
  cimsweep::write_safetensors(dir.file("policy.safetensors"), file.tensors, file.metadata);
  expect_refused(run_cimsweep("info " + dir.file("policy.safetensors")), "gone.safetensors");

  // A dangling --results symlink: its target is created, the link stays.
  fs::create_symlink("real.jsonl", dir.file("link.jsonl"));
  ASSERT_EQ(run_cimsweep("eval " + common + " --results " + dir.file("link.jsonl")).exit_code, 0);
  EXPECT_TRUE(fs::is_symlink(dir.file("link.jsonl")));
  EXPECT_EQ(cimsweep::read_results_file(dir.file("real.jsonl")).size(), 2u);

  // Negative σ in a sweep file: the message names the file.
  write_text(dir.file("neg.toml"), "sigmas = [0.1, -0.1]\n");
  expect_refused(run_cimsweep("sweep --spec " + dir.file("neg.toml") + " " + common),
                 "sweep file '" + dir.file("neg.toml") + "': sigmas: σ = -0.1 is impossible");
}

}  // namespace
