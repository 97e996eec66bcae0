// `cimsweep train` through the binary: one-line errors for bad hyper-parameters and mismatched
// data, a model that `eval` and `info` read, and a killed-then-resumed run that ends with the
// uninterrupted run's weights bit for bit.
#include <gtest/gtest.h>

#include <filesystem>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "host/io/safetensors.h"
#include "tests/test_util.h"
#include "tests/train_test_data.h"

namespace {

using cimsweep::read_safetensors;
using cimsweep::testing::CommandResult;
using cimsweep::testing::quadrant_blobs;
using cimsweep::testing::run_cimsweep;
using cimsweep::testing::TempDir;
using cimsweep::testing::write_idx;

// An IDX directory with train and t10k splits of quadrant blobs (`classes` classes).
std::string make_data_dir(const TempDir& dir, const std::string& name, int classes = 4) {
  const std::string path = dir.file(name);
  std::filesystem::create_directories(path);
  write_idx(quadrant_blobs(256, 41, 8, classes), path, "train");
  write_idx(quadrant_blobs(64, 42, 8, classes), path, "t10k");
  return path;
}

// Small and fast: ResNet-8 of width 4 on 8×8 images.
std::string tiny(const std::string& data, const std::string& output, int width = 4) {
  return "train --data " + data + " --output " + output + " --depth 8 --width " +
         std::to_string(width) +
         " --batch 32 --lr 0.05 --crop-padding 0 --calibration-images 64 --quiet --threads 2";
}

bool one_line(const std::string& text) {
  return !text.empty() && text.find('\n') == text.size() - 1;
}

TEST(TrainCli, BadHyperParametersGiveOneLineErrors) {
  TempDir dir;
  const std::string data = make_data_dir(dir, "data");
  // Every check runs before any training; the hyper-parameters under test appear once.
  const std::string base =
      "train --quiet --data " + data + " --output " + dir.file("m.safetensors");
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"--lr 0", "--lr must be a positive number"},
      {"--lr -0.1", "--lr must be a positive number"},
      {"--epochs 0", "--epochs must be at least 1"},
      {"--batch 0", "--batch must be at least 1"},
      {"--momentum 1", "--momentum must be in [0, 1)"},
      {"--weight-decay -1", "--weight-decay must be ≥ 0"},
      {"--weight-bits 1", "--weight-bits 1 is out of range"},
      {"--input-bits 17", "--input-bits 17 is out of range"},
      {"--depth 21", "--depth 21 is not of the form 6n+2"},
      {"--kernel 4", "--kernel 4 must be 1, 3, 5 or 7"},
      {"--exits 3", "--exits may only name stages 1 and 2"},
      {"--exits 1,2 --exit-weights 1,0.5", "--exit-weights has 2 values but the network has 3"},
      {"--exit-weights 0", "--exit-weights are all 0"},
      {"--epochs 4 --schedule step --milestones 5", "--milestones 5 is not an epoch in 1..3"},
      {"--schedule linear", "unknown --schedule 'linear'"},
      {"--shortcut C", "--shortcut 'C' must be A or B"},
      {"--weight-scaling log", "log"},
      {"--ranges minmax", "--ranges 'minmax' must be calibrate or pact"},
      {"--train-sigma 1.5", "--train-sigma must be in [0, 1)"},
      {"--resume", "--resume needs --checkpoint-dir"},
      {"--stop-after-epoch 1", "--stop-after-epoch needs --checkpoint-dir"},
      {"--freeze-backbone --exits 1", "--freeze-backbone needs --init"},
      {"--crop-padding 8", "--crop-padding 8 is not smaller than the images"},
      {"--flip sideways", "--flip 'sideways' must be auto, on or off"},
      {"--precision fp16", "--precision 'fp16' must be fp32 or bf16"},
  };
  for (const auto& [args, message] : cases) {
    const CommandResult r = run_cimsweep(base + " " + args);
    EXPECT_EQ(r.exit_code, 2) << args << ": " << r.err;
    EXPECT_NE(r.err.find(message), std::string::npos) << args << ": " << r.err;
    EXPECT_TRUE(one_line(r.err)) << args << ": " << r.err;
  }
}

TEST(TrainCli, DataMismatchesGiveOneLineErrors) {
  TempDir dir;
  const std::string four = make_data_dir(dir, "four", 4), three = make_data_dir(dir, "three", 3);
  const std::string model = dir.file("four.safetensors");
  ASSERT_EQ(run_cimsweep(tiny(four, model) + " --epochs 1").exit_code, 0);

  CommandResult r =
      run_cimsweep(tiny(three, dir.file("x.safetensors")) + " --epochs 1 --init " + model);
  EXPECT_EQ(r.exit_code, 2) << r.err;
  EXPECT_NE(r.err.find("images of 4 classes, the data has 1×8×8 images of 3"), std::string::npos)
      << r.err;
  EXPECT_TRUE(one_line(r.err)) << r.err;

  r = run_cimsweep(tiny(four, dir.file("x.safetensors"), 5) + " --epochs 1 --init " + model);
  EXPECT_EQ(r.exit_code, 2) << r.err;
  EXPECT_NE(r.err.find("pass the same --depth, --kernel, --width"), std::string::npos) << r.err;

  r = run_cimsweep(tiny(dir.file("nowhere"), dir.file("x.safetensors")) + " --epochs 1");
  EXPECT_EQ(r.exit_code, 2) << r.err;
  EXPECT_TRUE(one_line(r.err)) << r.err;

  r = run_cimsweep(tiny(four, dir.file("no/such/dir/x.safetensors")) + " --epochs 1");
  EXPECT_EQ(r.exit_code, 2) << r.err;
  EXPECT_NE(r.err.find("does not exist: create it or choose another path"), std::string::npos) << r.err;
}

TEST(TrainCli, WritesAModelThatEvalAndInfoRead) {
  TempDir dir;
  const std::string data = make_data_dir(dir, "data");
  const std::string model = dir.file("m.safetensors");
  const CommandResult trained = run_cimsweep(tiny(data, model) + " --epochs 2 --exits 2");
  ASSERT_EQ(trained.exit_code, 0) << trained.err;
  EXPECT_NE(trained.err.find("epoch 1/2: loss"), std::string::npos) << trained.err;
  EXPECT_NE(trained.err.find("images/s"), std::string::npos) << trained.err;
  EXPECT_NE(trained.err.find("wrote " + model), std::string::npos) << trained.err;

  const auto file = read_safetensors(model);
  const auto provenance = nlohmann::json::parse(file.metadata.at("cimsweep.provenance"));
  EXPECT_NE(provenance.at("command").get<std::string>().find("train --data"), std::string::npos);
  EXPECT_EQ(provenance.at("epochs"), 2);
  const double quantised = provenance.at("quantised_digital_test_accuracy").get<double>();

  const CommandResult eval =
      run_cimsweep("eval " + model + " --data " + data + " --adc ideal --format json");
  ASSERT_EQ(eval.exit_code, 0) << eval.err;
  const auto table = nlohmann::json::parse(eval.out);
  ASSERT_FALSE(table.empty()) << eval.out;
  // The same count of images; only the ×100 and the JSON round trips differ (a few ulps of 100),
  // far below one image (1.6).
  EXPECT_NEAR(table.at(0).at("clean_accuracy").get<double>(), 100.0 * quantised, 1e-9) << eval.out;

  const CommandResult info = run_cimsweep("info " + model);
  EXPECT_EQ(info.exit_code, 0) << info.err;
  EXPECT_NE(info.out.find("exit2.fc"), std::string::npos) << info.out;
}

TEST(TrainCli, KilledAndResumedRunEndsWithTheSameWeights) {
  TempDir dir;
  const std::string data = make_data_dir(dir, "data");
  const std::string args = " --epochs 3 --train-sigma 0.05 --exits 1";
  const CommandResult whole = run_cimsweep(tiny(data, dir.file("whole.safetensors")) + args +
                                           " --checkpoint-dir " + dir.file("ck-whole"));
  ASSERT_EQ(whole.exit_code, 0) << whole.err;

  // The "kill": stop after epoch 1; the same command with --resume then finishes the run.
  const std::string resumable =
      tiny(data, dir.file("resumed.safetensors")) + args + " --checkpoint-dir " + dir.file("ck");
  const CommandResult first = run_cimsweep(resumable + " --stop-after-epoch 1");
  ASSERT_EQ(first.exit_code, 0) << first.err;
  EXPECT_FALSE(std::filesystem::exists(dir.file("resumed.safetensors")));
  const CommandResult again = run_cimsweep(resumable);
  EXPECT_EQ(again.exit_code, 2) << again.err;
  EXPECT_NE(again.err.find("add --resume"), std::string::npos) << again.err;
  const CommandResult rest = run_cimsweep(resumable + " --resume");
  ASSERT_EQ(rest.exit_code, 0) << rest.err;
  EXPECT_NE(rest.err.find("after epoch 1"), std::string::npos) << rest.err;
  EXPECT_EQ(rest.err.find("epoch 1/3"), std::string::npos) << rest.err;

  const auto a = read_safetensors(dir.file("whole.safetensors"));
  const auto b = read_safetensors(dir.file("resumed.safetensors"));
  ASSERT_EQ(a.tensors.size(), b.tensors.size());
  for (const auto& [name, tensor] : a.tensors)
    EXPECT_EQ(tensor.data, b.tensors.at(name).data) << name;
  EXPECT_EQ(a.metadata.at("cimsweep.input_ranges"), b.metadata.at("cimsweep.input_ranges"));
}

}  // namespace
