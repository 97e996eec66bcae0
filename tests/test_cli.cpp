// The command line end to end on a tiny model and data written here: tables parse, --resume after
// an interrupted results file gives the uninterrupted table, and bad input gives one clear line.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <set>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "host/io/safetensors.h"
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
  // The results file: one clean record + σ = 0's one chip (every chip is the same there) +
  // σ = 0.1's 2 trials, each a complete JSON object.
  const auto records = split_lines(cimsweep::testing::read_text(dir.file("r.jsonl")));
  ASSERT_EQ(records.size(), 4u);
  std::map<double, std::vector<double>> trial_accuracy;  // σ → the trials' accuracies
  double clean = NAN;
  for (const auto& line : records) {
    const auto j = nlohmann::json::parse(line);
    for (const char* key :
         {"model", "sigma", "trial", "accuracy", "exit_accuracy", "seconds", "config_hash"})
      EXPECT_TRUE(j.contains(key)) << key << " missing in " << line;
    EXPECT_EQ(j.at("exit_accuracy").size(), 3u);
    // 42 images: an accuracy is k/42 of 100 %.
    const double accuracy = j.at("accuracy").get<double>(), k = accuracy * 42 / 100;
    EXPECT_NEAR(k, std::nearbyint(k), 1e-9) << line;
    if (j.at("trial").get<int>() < 0)
      clean = accuracy;
    else
      trial_accuracy[j.at("sigma").get<double>()].push_back(accuracy);
  }
  ASSERT_FALSE(std::isnan(clean)) << "no clean record";
  ASSERT_EQ(trial_accuracy.at(0.0).size(), 1u);
  ASSERT_EQ(trial_accuracy.at(0.1).size(), 2u);
  for (const auto& row : table) {
    const double sigma = row.at("sigma").get<double>();
    const auto& trials = trial_accuracy.at(sigma);
    EXPECT_EQ(row.at("trials").get<int>(), static_cast<int>(trials.size())) << row.dump();
    EXPECT_EQ(row.at("clean_accuracy").get<double>(), clean) << row.dump();
    // The table's mean, min and max are those of the file's trials at that σ.
    const double lo = *std::min_element(trials.begin(), trials.end());
    const double hi = *std::max_element(trials.begin(), trials.end());
    double sum = 0;
    for (double t : trials) sum += t;
    EXPECT_NEAR(row.at("mean").get<double>(), sum / trials.size(), 1e-12) << row.dump();
    EXPECT_EQ(row.at("min").get<double>(), lo) << row.dump();
    EXPECT_EQ(row.at("max").get<double>(), hi) << row.dump();
    if (sigma == 0) {
      // One noise-free chip: its interval has zero width.
      EXPECT_EQ(row.at("std").get<double>(), 0.0) << row.dump();
      EXPECT_EQ(row.at("ci_low").get<double>(), row.at("mean").get<double>()) << row.dump();
      EXPECT_EQ(row.at("ci_high").get<double>(), row.at("mean").get<double>()) << row.dump();
    } else {
      EXPECT_TRUE(row.at("ci_low").is_null()) << "2 chips give no interval: " << row.dump();
    }
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

// --predictions: one line per image and run (clean, then trial by trial) whose hits give the
// table's accuracies; at σ = 0 with the ideal ADC the CIM trial gives the clean (digital) run's
// logits bit for bit (cim-model.md §7).
TEST_F(Cli, PredictionsFileHoldsEveryImageOfEveryRunAndAgreesWithTheTable) {
  const std::string predictions = dir.file("p.jsonl");
  const auto noisy = run_cimsweep("eval " + common + " --format json --sigma 0.1 --trials 2 "
                                  "--limit 35 --predictions " + predictions);
  ASSERT_EQ(noisy.exit_code, 0) << noisy.err;
  const auto table = nlohmann::json::parse(noisy.out);
  ASSERT_EQ(table.size(), 1u);
  const auto lines = split_lines(cimsweep::testing::read_text(predictions));
  ASSERT_EQ(lines.size(), 3u * 35u) << "clean + 2 trials, 35 images each";
  std::map<int, int> hits;  // by trial
  std::set<size_t> indices;
  bool any_nonzero_logit = false;
  for (size_t k = 0; k < lines.size(); ++k) {
    const auto line = nlohmann::json::parse(lines[k]);
    const int trial = line.at("trial").get<int>();
    EXPECT_EQ(trial, int(k / 35) - 1) << lines[k];
    EXPECT_EQ(line.at("sigma").get<double>(), trial < 0 ? 0.0 : 0.1) << lines[k];
    const size_t index = line.at("index").get<size_t>();
    EXPECT_LT(index, 42u);
    EXPECT_EQ(line.at("label").get<int>(), int(index % 7)) << "the reader's index " << lines[k];
    EXPECT_FALSE(line.contains("file")) << "IDX images have no file names: " << lines[k];
    if (trial < 0) indices.insert(index);
    const auto logits = line.at("logits").get<std::vector<double>>();
    ASSERT_EQ(logits.size(), 7u);
    const int argmax = int(std::max_element(logits.begin(), logits.end()) - logits.begin());
    EXPECT_EQ(line.at("predicted").get<int>(), argmax) << lines[k];
    const auto exits = line.at("exit_predicted").get<std::vector<int>>();
    ASSERT_EQ(exits.size(), 3u);
    EXPECT_EQ(exits.back(), argmax);
    for (double v : logits) any_nonzero_logit |= v != 0.0;
    hits[trial] += argmax == line.at("label").get<int>();
  }
  EXPECT_TRUE(any_nonzero_logit);
  EXPECT_EQ(indices.size(), 35u) << "35 distinct images of the class-balanced subset";
  EXPECT_DOUBLE_EQ(table[0].at("clean_accuracy").get<double>(), 100.0 * hits[-1] / 35);
  EXPECT_DOUBLE_EQ(table[0].at("mean").get<double>(), 100.0 * (hits[0] + hits[1]) / 70);

  const auto ideal = run_cimsweep("eval " + common + " --sigma 0 --adc ideal --predictions " +
                                  predictions);
  ASSERT_EQ(ideal.exit_code, 0) << ideal.err;
  const auto runs = split_lines(cimsweep::testing::read_text(predictions));
  ASSERT_EQ(runs.size(), 2u * 42u);
  for (size_t i = 0; i < 42; ++i) {
    const auto clean = nlohmann::json::parse(runs[i]), chip = nlohmann::json::parse(runs[42 + i]);
    EXPECT_EQ(chip.at("trial").get<int>(), 0);
    EXPECT_EQ(clean.at("index"), chip.at("index"));
    EXPECT_EQ(clean.at("logits"), chip.at("logits")) << "image " << i;
  }
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
  EXPECT_EQ(bad.exit_code, 2) << bad.err;  // README: bad input exits 2
  cimsweep::testing::write_text(dir.file("bad.toml"), "trials = 2\nsigmaz = [0.1]\n");
  const auto unknown = run_cimsweep("sweep --spec " + dir.file("bad.toml"));
  EXPECT_EQ(unknown.exit_code, 2) << unknown.err;
  EXPECT_NE(unknown.err.find("sigmaz"), std::string::npos) << unknown.err;
  // 2^32 + 1 trials used to wrap to 1 silently.
  cimsweep::testing::write_text(dir.file("huge.toml"), "trials = 4294967297\nsigmas = [0.1]\n");
  const auto huge = run_cimsweep("sweep --spec " + dir.file("huge.toml"));
  EXPECT_EQ(huge.exit_code, 2) << huge.err;
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
      {"predictions onto the model", "eval " + kModel + data + " --predictions " + kModel + out,
       "--predictions"},
      {"predictions onto the table", "eval " + kModel + data + out + " --predictions " +
       dir.file("table.md"), "--predictions"},
      {"predictions of resumed trials", "eval " + kModel + data + out + " --resume --predictions " +
       dir.file("p.jsonl"), "--resume"},
      {"predictions into a directory", "eval " + kModel + data + out + " --predictions " +
       dir.path(), "--predictions"},
      {"predictions with an exit policy", "eval " + kModel + data + out +
       " --exit-policy fixed:1 --predictions " + dir.file("p.jsonl"), "--exit-policy"},
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
    EXPECT_EQ(r.exit_code, 2) << c.what << ": " << r.err;  // README: every bad input exits 2
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

  // One head (the CIFAR trainer writes one-entry exit lists for every model) is no exits.
  file.metadata["cimsweep.provenance"] =
      nlohmann::json{{"float_test_accuracy", 0.8738}, {"exit_float_test_accuracy", {0.8738}}}
          .dump();
  const std::string single = dir.file("single-head.safetensors");
  cimsweep::write_safetensors(single, file.tensors, file.metadata);
  const auto one_head = run_cimsweep("info " + single);
  ASSERT_EQ(one_head.exit_code, 0) << one_head.err;
  EXPECT_NE(one_head.out.find("  float test acc:      87.38 %\n"), std::string::npos)
      << one_head.out;

  const auto bad = run_cimsweep("info " + path + " --format yaml");
  EXPECT_EQ(bad.exit_code, 2);
  EXPECT_EQ(split_lines(bad.err).size(), 1u) << bad.err;
}


// ---------------------------------------------------------------------------------------------
// The README's bad-input table is the expectation: for each row below, the fixture the README
// describes is made in a scratch directory (the test runs there, so the paths in the messages are
// the README's), the row's command is run with `…` = `tiny.safetensors --data images_ok`, and
// stderr must be the row's line exactly, the exit code the row's. `tiny.safetensors` is the
// 11×13 golden model and `images_ok` its 42 IDX images, as in the README's † rows; rows whose
// line names the 1×4×4 model (missing tensor, shape, truncation, 4×4 data) or a pid are not here.

struct ReadmeRow {
  std::string command, message;
  int exit_code = -1;
};

// The rows of README.md's "Bad input" table, keyed by their command cell (backticks included).
std::map<std::string, ReadmeRow> readme_bad_input_rows() {
  std::ifstream in(std::string(CIMSWEEP_SOURCE_DIR) + "/README.md");
  std::map<std::string, ReadmeRow> rows;
  std::string line;
  bool in_table = false;
  while (std::getline(in, line)) {
    if (line.rfind("| bad input | command |", 0) == 0) in_table = true;
    if (!in_table) continue;
    if (line.rfind("| ", 0) != 0) break;  // the table's end
    std::vector<std::string> cells;
    size_t start = 2;
    for (size_t bar; (bar = line.find(" | ", start)) != std::string::npos; start = bar + 3)
      cells.push_back(line.substr(start, bar - start));
    cells.push_back(line.substr(start, line.size() - start - 2));
    if (cells.size() != 4 || cells[3].empty() || !std::isdigit(cells[3][0])) continue;
    ReadmeRow row;
    row.command = cells[1];
    row.message = cells[2];
    row.exit_code = std::stoi(cells[3]);
    rows[cells[1]] = row;
  }
  return rows;
}

// `a` then `b` → "a\nb\n": the cell's lines as stderr holds them.
std::string expected_stderr(const std::string& cell) {
  std::string text;
  size_t start = 0;
  while (start < cell.size()) {
    if (cell[start] != '`') {
      ++start;
      continue;
    }
    const size_t end = cell.find('`', start + 1);
    text += cell.substr(start + 1, end - start - 1) + "\n";
    start = end + 1;
  }
  return text;
}

// The runnable command of a command cell: its first backticked part, `…` filled in.
std::string runnable(const std::string& cell) {
  const size_t open = cell.find('`'), close = cell.find('`', open + 1);
  std::string command = cell.substr(open + 1, close - open - 1);
  const std::string ellipsis = "…";
  for (size_t at; (at = command.find(ellipsis)) != std::string::npos;)
    command.replace(at, ellipsis.size(), "tiny.safetensors --data images_ok");
  return command;
}

void put_be32(std::ofstream& out, uint32_t v) {
  for (int shift = 24; shift >= 0; shift -= 8) out.put(char((v >> shift) & 0xff));
}

// An IDX test split in `dir`: an images file of `magic`, `count` images of h×w declared and
// `pixel_bytes` present, and a matching labels file (so that the images file is what is wrong).
void write_idx(const std::string& dir, uint32_t magic, uint32_t count, uint32_t h, uint32_t w,
               size_t pixel_bytes) {
  std::filesystem::create_directory(dir);
  std::ofstream images(dir + "/t10k-images-idx3-ubyte", std::ios::binary);
  put_be32(images, magic);
  put_be32(images, count);
  put_be32(images, h);
  put_be32(images, w);
  images << std::string(pixel_bytes, '\x7f');
  std::ofstream labels(dir + "/t10k-labels-idx1-ubyte", std::ios::binary);
  put_be32(labels, 0x801);
  put_be32(labels, count);
  labels << std::string(count, '\0');
}

class ReadmeBadInput : public ::testing::Test {
 protected:
  void SetUp() override {
    previous = std::filesystem::current_path();
    std::filesystem::current_path(dir.path());
    std::filesystem::copy_file(kModel, "tiny.safetensors");
    std::filesystem::create_directory("images_ok");
    write_tiny_idx_test_split("images_ok", cimsweep::testing::test_seed(1407));
  }
  void TearDown() override { std::filesystem::current_path(previous); }

  // Runs the README row of `command_cell` after `make_fixture` and checks its line and exit code.
  void check_row(const std::string& command_cell, const std::function<void()>& make_fixture = {}) {
    static const auto rows = readme_bad_input_rows();
    const auto row = rows.find(command_cell);
    ASSERT_NE(row, rows.end()) << "no README bad-input row with command " << command_cell;
    if (make_fixture) make_fixture();
    const auto r = run_cimsweep(runnable(command_cell));
    EXPECT_EQ(r.exit_code, row->second.exit_code) << command_cell << "\n" << r.err;
    EXPECT_EQ(r.err, expected_stderr(row->second.message)) << command_cell;
    EXPECT_EQ(r.out, "") << command_cell;
    ++checked;
  }
  void model_with(const std::string& path,
                  const std::function<void(cimsweep::SafetensorsFile&)>& change) {
    cimsweep::SafetensorsFile file = cimsweep::read_safetensors(kModel);
    change(file);
    cimsweep::write_safetensors(path, file.tensors, file.metadata);
  }
  TempDir dir;
  std::filesystem::path previous;
  int checked = 0;
};

TEST_F(ReadmeBadInput, ModelFileRowsPrintTheirLineAndExit2) {
  using cimsweep::testing::write_text;
  check_row("`info nope.safetensors`");
  check_row("`info images_ok`");
  check_row("`info empty.safetensors`", [] { write_text("empty.safetensors", ""); });
  check_row("`info header_beyond.safetensors`", [] {
    // header length 1000000, then 2 bytes
    write_text("header_beyond.safetensors", std::string("\x40\x42\x0f\0\0\0\0\0{}", 10));
  });
  check_row("`info idx_magic/t10k-images-idx3-ubyte`", [] {
    // An IDX labels magic (0x801) and 2 images: little-endian, the first 8 bytes read
    // 0x0200000001080000 = 144115188093157376.
    write_idx("idx_magic", 0x801, 2, 11, 13, 2 * 11 * 13);
  });
  check_row("`info nan_weights.safetensors`", [this] {
    // The writer refuses NaN, so a marker value is written and its bytes turned into a NaN's.
    const float marker = 1234.5678f, nan = NAN;
    model_with("nan_weights.safetensors", [&](cimsweep::SafetensorsFile& f) {
      f.tensors.at("layer2.0.conv1.weight").data[1] = marker;
    });
    std::string bytes = cimsweep::testing::read_text("nan_weights.safetensors");
    const std::string marker_bytes(reinterpret_cast<const char*>(&marker), sizeof marker);
    const size_t at = bytes.find(marker_bytes);
    ASSERT_NE(at, std::string::npos);
    ASSERT_EQ(bytes.find(marker_bytes, at + 1), std::string::npos) << "the marker is not unique";
    bytes.replace(at, sizeof nan, reinterpret_cast<const char*>(&nan), sizeof nan);
    write_text("nan_weights.safetensors", bytes);
  });
  check_row("`info no_arch.safetensors`", [this] {
    model_with("no_arch.safetensors",
               [](cimsweep::SafetensorsFile& f) { f.metadata.erase("cimsweep.arch"); });
  });
  check_row("`info bad_depth.safetensors`", [this] {
    model_with("bad_depth.safetensors", [](cimsweep::SafetensorsFile& f) {
      auto arch = nlohmann::json::parse(f.metadata.at("cimsweep.arch"));
      arch["depth"] = 21;
      f.metadata["cimsweep.arch"] = arch.dump();
    });
  });
  EXPECT_EQ(checked, 8);
}

TEST_F(ReadmeBadInput, DataRowsPrintTheirLineAndExit2) {
  using cimsweep::testing::write_text;
  namespace fs = std::filesystem;
  check_row("`eval tiny.safetensors --data nope`");
  check_row("`eval tiny.safetensors --data images_empty`", [] {
    fs::create_directory("images_empty");
    write_text("images_empty/notes.txt", "not a data set\n");
  });
  check_row("`eval tiny.safetensors --data tiny.safetensors`");
  check_row("`eval tiny.safetensors --data idx_magic`", [] {
    write_idx("idx_magic", 0x801, 2, 11, 13, 2 * 11 * 13);
  });
  check_row("`eval tiny.safetensors --data idx_count`", [] {
    // 60000 images of 28×28 declared (47040000 bytes), 10 present (7840 bytes).
    write_idx("idx_count", 0x803, 60000, 28, 28, 7840);
  });
  check_row("`eval tiny.safetensors --data cifar_wrong_size.bin`",
            [] { write_text("cifar_wrong_size.bin", std::string(5000, '\x01')); });
  check_row("`eval tiny.safetensors --data images_bad`", [] {
    for (const char* c : {"dog", "fish"}) {  // two classes; dog's file is read first
      fs::create_directories(std::string("images_bad/") + c);
      write_text(std::string("images_bad/") + c + "/0.png", "this is text, not a PNG\n");
    }
  });
  check_row("`eval tiny.safetensors --data images_gif`", [] {
    for (const char* c : {"a", "b"}) {
      fs::create_directories(std::string("images_gif/") + c);
      write_text(std::string("images_gif/") + c + "/0.png",
                 std::string("GIF89a\x01\0\x01\0\0\0\0;", 14));
    }
  });
  check_row("`eval tiny.safetensors --data images_noimg`", [] {
    fs::create_directories("images_noimg/a");
    fs::create_directories("images_noimg/b");
  });
  EXPECT_EQ(checked, 9);
}

TEST_F(ReadmeBadInput, ResultsOutputAndSweepFileRowsPrintTheirLineAndExit2) {
  using cimsweep::testing::write_text;
  // Three trial records (the clean one and two chips), as a run writes them.
  const auto three_records = [](const std::string& path) {
    const auto r = run_cimsweep(
        "eval tiny.safetensors --data images_ok --quiet --sigma 0.1 --trials 2 --results " + path);
    ASSERT_EQ(r.exit_code, 0) << r.err;
  };
  check_row("`eval … --results r_corrupt.jsonl --resume`", [&] {
    three_records("r_corrupt.jsonl");
    auto lines = split_lines(cimsweep::testing::read_text("r_corrupt.jsonl"));
    ASSERT_EQ(lines.size(), 3u);
    write_text("r_corrupt.jsonl", lines[0] + "\n" + lines[1].substr(0, 20) + "\n" + lines[2] + "\n");
  });
  check_row("`eval … --results deep.jsonl --resume`",
            [] { write_text("deep.jsonl", std::string(200000, '[') + "\n"); });
  check_row("`eval … --results r_exists.jsonl`", [&] { three_records("r_exists.jsonl"); });
  check_row("`eval … --resume`");
  check_row("`eval … --results same.jsonl --output same.jsonl`");
  check_row("`eval … --output tiny.safetensors`");
  check_row("`merge m2.jsonl --output m2.jsonl`", [] { write_text("m2.jsonl", ""); });
  check_row("`sweep … --sigmas 0.1 --output nodir/t.md`");
  check_row("`merge empty.jsonl`", [] { write_text("empty.jsonl", ""); });
  check_row("`sweep --spec nope.toml`");
  check_row("`sweep --spec bad_toml.toml --data images_ok`",
            [] { write_text("bad_toml.toml", "sigmas = ["); });
  check_row("`sweep --spec unknown_key.toml --data images_ok`",
            [] { write_text("unknown_key.toml", "trails = 2\n"); });
  check_row("`sweep --spec bad_type.toml --data images_ok`",
            [] { write_text("bad_type.toml", "trials = \"two\"\n"); });
  check_row("`sweep --spec huge_trials.toml --data images_ok`",
            [] { write_text("huge_trials.toml", "trials = 4294967297\n"); });
  check_row("`sweep --spec bad_cim.toml --data images_ok`",
            [] { write_text("bad_cim.toml", "[cim]\nadc-bitz = 6\n"); });
  check_row("`sweep --spec negative_sigma.toml …`",
            [] { write_text("negative_sigma.toml", "sigmas = [-0.1]\n"); });
  check_row("`sweep --spec big_trials.toml …` (`trials = 1000000000`)",
            [] { write_text("big_trials.toml", "trials = 1000000000\nsigmas = [0.1]\n"); });
  EXPECT_EQ(checked, 17);
}

TEST_F(ReadmeBadInput, ParameterRowsPrintTheirLineAndExitCode) {
  for (const char* command :
       {"`eval … --cell-bits 3 --weight-bits 8`", "`eval … --rows 0`", "`eval … --adc-bits 0`",
        "`eval … --onoff 1`", "`eval … --weight-bits eight`", "`eval … --sigma -0.1`",
        "`eval … --sigma 1e308`", "`eval … --first-trial 2147483647 --trials 2 --no-clean`",
        "`eval … --first-trial 1073741823 --trials 2`", "`sweep … --sigmas 0,0.1x`",
        "`eval … --trials 0`", "`eval … --trials -5`", "`eval … --first-trial -1`",
        "`eval … --limit -5`", "`eval … --batch 0`", "`eval … --threads -1`",
        "`eval … --split validation`", "`eval … --format xml`", "`eval … --trials three`"})
    check_row(command);
  EXPECT_EQ(checked, 19);
}

}  // namespace
