// The command line end to end on a tiny model and data written here: tables parse, --resume after
// an interrupted results file gives the uninterrupted table, and bad input gives one clear line.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "host/safetensors.h"
#include "tests/test_util.h"

namespace {

using cimsweep::testing::split_lines;
using cimsweep::testing::write_tiny_idx_test_split;

using cimsweep::testing::run_cimsweep;
using cimsweep::testing::TempDir;

const std::string kModel = std::string(CIMSWEEP_SOURCE_DIR) +
                           "/tests/data/golden_resnet8_k5_w3_11x13_shortcutB_exits.safetensors";
const std::string kRgbModel =
    std::string(CIMSWEEP_SOURCE_DIR) + "/tests/data/golden_resnet8_k3_w4_rgb_shortcutA.safetensors";

class Cli : public ::testing::Test {
 protected:
  void SetUp() override {
    write_tiny_idx_test_split(dir.path(), cimsweep::testing::test_seed(4242));
    common = kModel + " --data " + dir.path() + " --quiet --batch 16";
  }
  TempDir dir;
  std::string common;
};

TEST_F(Cli, SweepPrintsATableThatParsesWithEveryRowAndTheCleanAccuracy) {
  const auto r =
      run_cimsweep("sweep " + common + " --format json --sigmas 0,0.1 --trials 2 --results " +
                   dir.file("r.jsonl"));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const auto table = nlohmann::json::parse(r.out);
  ASSERT_EQ(table.size(), 2u);
  for (const auto& row : table) {
    EXPECT_EQ(row.at("trials").get<int>(), 2) << row.dump();
    EXPECT_TRUE(row.at("clean_accuracy").is_number()) << row.dump();
    EXPECT_GE(row.at("mean").get<double>(), 0.0);
  }
  // The results file: one clean record + 2 σ × 2 trials, each a complete JSON object.
  const auto records = split_lines(cimsweep::testing::read_text(dir.file("r.jsonl")));
  ASSERT_EQ(records.size(), 5u);
  for (const auto& line : records) {
    const auto j = nlohmann::json::parse(line);
    for (const char* key :
         {"model", "sigma", "trial", "accuracy", "exit_accuracy", "seconds", "config_hash"})
      EXPECT_TRUE(j.contains(key)) << key << " missing in " << line;
    EXPECT_EQ(j.at("exit_accuracy").size(), 3u);
  }
  // The backend notice is the only thing on stderr when it is not a terminal.
  EXPECT_EQ(split_lines(r.err).size(), 1u) << r.err;
  EXPECT_NE(r.err.find("CPU backend"), std::string::npos) << r.err;
}

TEST_F(Cli, ResumeAfterATornResultsFileGivesTheUninterruptedTable) {
  const std::string args = "sweep " + common + " --sigmas 0.05,0.2 --trials 3 --format csv";
  const auto whole = run_cimsweep(args + " --results " + dir.file("whole.jsonl"));
  ASSERT_EQ(whole.exit_code, 0) << whole.err;
  // An interrupted run: three complete records and half of the fourth.
  const auto records = split_lines(cimsweep::testing::read_text(dir.file("whole.jsonl")));
  ASSERT_EQ(records.size(), 7u);
  std::string partial = records[0] + "\n" + records[1] + "\n" + records[2] + "\n" +
                        records[3].substr(0, records[3].size() / 2);
  cimsweep::testing::write_text(dir.file("part.jsonl"), partial);
  const auto resumed = run_cimsweep(args + " --results " + dir.file("part.jsonl") + " --resume");
  ASSERT_EQ(resumed.exit_code, 0) << resumed.err;
  EXPECT_EQ(resumed.out, whole.out);
  const auto after = split_lines(cimsweep::testing::read_text(dir.file("part.jsonl")));
  EXPECT_EQ(after.size(), 7u) << "every unit exactly once";
  // Resuming a finished file runs nothing and prints the same table again.
  const auto again = run_cimsweep(args + " --results " + dir.file("part.jsonl") + " --resume");
  EXPECT_EQ(again.out, whole.out);
  EXPECT_EQ(split_lines(cimsweep::testing::read_text(dir.file("part.jsonl"))).size(), 7u);
}

// Resuming with a changed option reruns every trial; the note says why (it used to be silent).
TEST_F(Cli, ResumeUnderOtherSettingsSaysTheTrialsAreNotReused) {
  const std::string args = "eval " + common + " --no-clean --results " + dir.file("r.jsonl");
  ASSERT_EQ(run_cimsweep(args).exit_code, 0);
  const auto changed = run_cimsweep(args + " --resume --adc-bits 6");
  ASSERT_EQ(changed.exit_code, 0) << changed.err;
  EXPECT_NE(changed.err.find("holds 1 trials of 'golden_resnet8_k5_w3_11x13_shortcutB_exits' "
                             "under other settings"),
            std::string::npos)
      << changed.err;
  EXPECT_EQ(split_lines(cimsweep::testing::read_text(dir.file("r.jsonl"))).size(), 2u);
}

// The same seed gives the same chips, whatever the thread count (the seed's effect on every
// cell is checked in test_noise).
TEST_F(Cli, SameSeedSameResultsForOneAndTwoThreads) {
  const std::string args =
      "eval " + common + " --format csv --sigma 0.15 --trials 2 --adc fixed --no-clean";
  const auto a = run_cimsweep(args + " --threads 2");
  const auto b = run_cimsweep(args + " --threads 1");
  ASSERT_EQ(a.exit_code, 0) << a.err;
  EXPECT_EQ(a.out, b.out);
}

TEST_F(Cli, SweepFileWithRelativePaths) {
  std::filesystem::create_directory(dir.file("data"));
  write_tiny_idx_test_split(dir.file("data"), 7);
  std::filesystem::copy_file(kModel, dir.file("m.safetensors"));
  cimsweep::testing::write_text(dir.file("s.toml"), R"(
name = "tiny"
data = "data"
trials = 2
sigmas = [0.0, 0.1]
[cim]
adc = "fixed"
adc-bits = 8
batch = 10
[[models]]
path = "m.safetensors"
label = "tiny-net"
)");
  const auto r = run_cimsweep("sweep --spec " + dir.file("s.toml") + " --quiet --format json");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const auto table = nlohmann::json::parse(r.out);
  ASSERT_EQ(table.size(), 2u);
  EXPECT_EQ(table[0].at("model"), "tiny-net");
  const auto bad = run_cimsweep("sweep --spec " + dir.file("nope.toml"));
  EXPECT_NE(bad.exit_code, 0);
  cimsweep::testing::write_text(dir.file("bad.toml"), "trials = 2\nsigmaz = [0.1]\n");
  const auto unknown = run_cimsweep("sweep --spec " + dir.file("bad.toml"));
  EXPECT_NE(unknown.exit_code, 0);
  EXPECT_NE(unknown.err.find("sigmaz"), std::string::npos) << unknown.err;
  // 2^32 + 1 trials used to wrap to 1 silently.
  cimsweep::testing::write_text(dir.file("huge.toml"), "trials = 4294967297\nsigmas = [0.1]\n");
  const auto huge = run_cimsweep("sweep --spec " + dir.file("huge.toml"));
  EXPECT_NE(huge.err.find("trials must be an integer"), std::string::npos) << huge.err;
}

struct BadInput {
  const char* what;
  std::string args;
  const char* expect_in_message;
};

TEST_F(Cli, BadInputGivesOneClearLineAndNoFileLeftBehind) {
  const std::string data = " --data " + dir.path() + " --quiet";
  const std::string out = " --output " + dir.file("table.md") + " --results " + dir.file("r.jsonl");
  const BadInput cases[] = {
      {"missing model", "eval /no/such/model.safetensors" + data + out,
       "/no/such/model.safetensors"},
      {"missing data", "eval " + kModel + " --data /no/such/data --quiet" + out, "/no/such/data"},
      {"negative sigma", "eval " + kModel + data + " --sigma -0.1" + out, "σ"},
      {"bits that do not divide", "eval " + kModel + data + " --cell-bits 3" + out, "divide"},
      {"unknown adc", "eval " + kModel + data + " --adc magic" + out, "magic"},
      {"unknown mapping", "eval " + kModel + data + " --mapping diagonal" + out, "diagonal"},
      {"impossible on/off ratio", "eval " + kModel + data + " --onoff 0.5" + out, "onoff"},
      {"channel mismatch", "eval " + kRgbModel + data + out, "channel"},
      {"sigma list with a typo", "sweep " + kModel + data + " --sigmas 0,0.x" + out, "0.x"},
      {"unknown digital layer", "eval " + kModel + data + " --digital-layers conv9" + out, "conv9"},
      {"resume without results", "eval " + kModel + data + " --resume", "--results"},
      {"corrupt model", "eval " + dir.file("t10k-labels-idx1-ubyte") + data + out, "t10k-labels"},
      // Negative counts used to be taken for "not given" and silently ignored.
      {"negative trials", "eval " + kModel + data + " --trials -5" + out, "--trials"},
      {"negative first trial", "eval " + kModel + data + " --first-trial -1" + out,
       "--first-trial"},
      {"negative limit", "eval " + kModel + data + " --limit -5" + out, "--limit"},
      {"trials and ci-width", "sweep " + kModel + data + " --sigmas 0.1 --trials 3 --ci-width 1" +
       out, "--ci-width"},
      {"zero ci-width", "sweep " + kModel + data + " --sigmas 0.1 --ci-width 0" + out,
       "--ci-width"},
      {"min-trials without ci-width", "sweep " + kModel + data + " --sigmas 0.1 --min-trials 5" +
       out, "--ci-width"},
      {"too few min-trials", "sweep " + kModel + data + " --sigmas 0.1 --ci-width 1 --min-trials 2" +
       out, "--min-trials"},
      {"max below min", "sweep " + kModel + data + " --sigmas 0.1 --ci-width 1 --max-trials 5" +
       out, "--max-trials"},
  };
  for (const BadInput& c : cases) {
    const auto r = run_cimsweep(c.args);
    EXPECT_NE(r.exit_code, 0) << c.what;
    EXPECT_EQ(r.out, "") << c.what;
    EXPECT_EQ(split_lines(r.err).size(), 1u) << c.what << ": " << r.err;
    EXPECT_NE(r.err.find(c.expect_in_message), std::string::npos) << c.what << ": " << r.err;
    EXPECT_FALSE(std::filesystem::exists(dir.file("table.md"))) << c.what;
    EXPECT_FALSE(std::filesystem::exists(dir.file("r.jsonl"))) << c.what;
  }
}

TEST(CliInfo, PrintsArchitectureParametersAndCrossbarUsage) {
  const auto r = run_cimsweep("info " + kModel);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("ResNet-8"), std::string::npos);
  EXPECT_NE(r.out.find("parameters:  8082"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("| 13 | fc |"), std::string::npos) << r.out;
}

TEST(CliInfo, ShowsProvenanceAsReadableLinesAndRawJsonOnRequest) {
  TempDir dir;
  cimsweep::SafetensorsFile file = cimsweep::read_safetensors(kModel);
  const nlohmann::json provenance = {
      {"trained_by", "tools/train_cifar_qat.py"},
      {"command", "python3 tools/train_cifar_qat.py --depth 8"},
      {"data", "tiny test images"},
      {"epochs", 2},
      {"exit_float_test_accuracy", {0.5, 0.625, 0.75}},
      {"exit_quantised_digital_test_accuracy", {0.5, 0.6, 0.7425}},
      {"quantised_digital", "8-bit, sigma 0"},
      {"history", {{{"epoch", 1}, {"loss", 1.25}}, {{"epoch", 2}, {"loss", 0.875}}}},
      {"wall_seconds", 3725},
      {"machine", "test CPU"},
      {"settings", {{"gamma", 0.5}}}};
  file.metadata["cimsweep.provenance"] = provenance.dump();
  const std::string path = dir.file("with-provenance.safetensors");
  cimsweep::write_safetensors(path, file.tensors, file.metadata);

  const auto text = run_cimsweep("info " + path);
  ASSERT_EQ(text.exit_code, 0) << text.err;
  for (const char* expected :
       {"provenance:\n", "  made by:             tools/train_cifar_qat.py\n",
        "  command:             python3 tools/train_cifar_qat.py --depth 8\n",
        "  float test acc:      50.00 % / 62.50 % / 75.00 % (exits, final last)\n",
        "  quantised test acc:  50.00 % / 60.00 % / 74.25 % (8-bit, sigma 0)\n",
        "  history:             2 entries; last: epoch 2, loss 0.875\n",
        "  wall time:           1 h 02 min on test CPU\n", "  settings.gamma:      0.5\n"})
    EXPECT_NE(text.out.find(expected), std::string::npos) << expected << " not in\n" << text.out;
  EXPECT_EQ(text.out.find("{\"trained_by\""), std::string::npos) << "raw JSON in the text form";

  const auto raw = run_cimsweep("info " + path + " --format json");
  ASSERT_EQ(raw.exit_code, 0) << raw.err;
  const auto metadata = nlohmann::json::parse(raw.out);
  EXPECT_EQ(nlohmann::json::parse(metadata.at("cimsweep.provenance").get<std::string>()),
            provenance);

  const auto bad = run_cimsweep("info " + path + " --format yaml");
  EXPECT_EQ(bad.exit_code, 2);
  EXPECT_EQ(split_lines(bad.err).size(), 1u) << bad.err;
}

}  // namespace
