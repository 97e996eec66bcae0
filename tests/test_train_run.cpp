// Training runs end to end on generated data: a tiny ResNet learns which quadrant holds a blob;
// a stopped and resumed run reproduces the uninterrupted one bit for bit (on another thread
// count); multi-exit, PACT, noise-aware and frozen-backbone training; the saved model loads and
// evaluates as the trainer measured.
#include <gtest/gtest.h>
#include <omp.h>

#include <cmath>
#include <functional>
#include <iostream>
#include <string>
#include <vector>

#include "common/errors.h"
#include "host/sweep/evaluate.h"
#include "host/io/model_file.h"
#include "tests/test_util.h"
#include "tests/train_test_data.h"
#include "train/layers.h"
#include "train/trainer.h"

namespace {

using namespace cimsweep;
using namespace cimsweep::train;
using cimsweep::testing::quadrant_blobs;
using cimsweep::testing::TempDir;

TrainSettings tiny_settings(uint64_t seed) {
  TrainSettings s;
  s.depth = 8;
  s.width = 4;
  s.epochs = 6;
  s.batch = 32;
  s.lr = 0.05;
  s.seed = seed;
  s.crop_padding = 0;  // a shifted crop could move the blob into another quadrant
  s.calibration_images = 200;
  s.quiet = true;
  return s;
}

struct Data {
  Dataset train, test;
};

Data make_data(uint32_t seed, int classes = 4) {
  return {quadrant_blobs(640, seed, 8, classes), quadrant_blobs(200, seed + 1000, 8, classes)};
}

TEST(Training, TinyResNetLearnsWhichQuadrantHoldsTheBlob) {
  const uint32_t seed = cimsweep::testing::test_seed(31);
  const Data d = make_data(seed);
  const TrainResult r = train_network(tiny_settings(seed), d.train, d.test);
  ASSERT_EQ(r.epochs.size(), 6u);
  EXPECT_LT(r.epochs.back().loss, r.epochs.front().loss);
  // Measured: 100 % quantised, float and last-epoch over the default seed and
  // CIMSWEEP_TEST_SEED=1…10; 95 % allows 10 of the 200 test images to slip.
  EXPECT_GE(r.quantised_test_accuracy, 95.0);
  EXPECT_GE(r.float_test_accuracy, 95.0);
  EXPECT_GE(r.epochs.back().test_accuracy, 95.0);
  EXPECT_EQ(r.input_ranges.at("conv1"), 1.0f);
  for (const auto& [layer, a_max] : r.input_ranges) EXPECT_GT(a_max, 0.0f) << layer;
}

// bf16 convolutions (where the CPU has AVX-512 BF16) learn the same small problem as fp32, to
// within noise; elsewhere the settings are refused with one line before any work.
TEST(Training, Bf16ConvolutionsReachTheAccuracyOfFp32) {
  const uint32_t seed = cimsweep::testing::test_seed(31);
  const Data d = make_data(seed);
  TrainSettings bf16 = tiny_settings(seed);
  bf16.precision = ConvPrecision::kBf16;
  if (!cpu_has_bf16_convolutions()) {
    try {
      train_network(bf16, d.train, d.test);
      FAIL() << "bf16 accepted on a CPU without AVX-512 BF16";
    } catch (const UserError& e) {
      EXPECT_NE(std::string(e.what()).find("--precision bf16 needs a CPU with AVX-512 BF16"),
                std::string::npos)
          << e.what();
    }
    GTEST_SKIP() << "this CPU has no AVX-512 BF16 (oneDNN: " << convolution_isa() << ")";
  }
  const TrainResult fp32_run = train_network(tiny_settings(seed), d.train, d.test);
  const TrainResult bf16_run = train_network(bf16, d.train, d.test);
  // Measured: both 100 % over the default seed and CIMSWEEP_TEST_SEED=1…10 (AVX-512 BF16 Xeon).
  EXPECT_GE(bf16_run.quantised_test_accuracy, 95.0);
  EXPECT_NEAR(bf16_run.quantised_test_accuracy, fp32_run.quantised_test_accuracy, 3.0);
  EXPECT_LT(bf16_run.epochs.back().loss, bf16_run.epochs.front().loss);
  // bf16 changes the rounding, so the two runs are not the same bits.
  EXPECT_NE(bf16_run.epochs.back().loss, fp32_run.epochs.back().loss);
}

TEST(Training, SavedModelLoadsAndEvaluatesAsTheTrainerMeasured) {
  const uint32_t seed = cimsweep::testing::test_seed(32);
  const Data d = make_data(seed);
  TrainSettings s = tiny_settings(seed);
  s.epochs = 2;
  s.command_line = "cimsweep train --test";
  const TrainResult r = train_network(s, d.train, d.test);
  TempDir dir;
  const std::string path = dir.file("m.safetensors");
  save_trained_model(path, r, {"a", "b", "c", "d"});
  const LoadedModel model = load_model(path);
  EXPECT_EQ(model.network->arch().to_json(), r.arch.to_json());
  const auto provenance = nlohmann::json::parse(model.metadata.at("cimsweep.provenance"));
  EXPECT_EQ(provenance.at("command"), "cimsweep train --test");
  EXPECT_EQ(provenance.at("seed"), seed);
  EXPECT_EQ(provenance.at("epochs"), 2);
  // The same count of images as a fraction: only the /100 and the JSON round trip differ (measured
  // equal); 1e-12 is far below one image (0.005).
  EXPECT_NEAR(provenance.at("quantised_digital_test_accuracy").get<double>(),
              r.quantised_test_accuracy / 100.0, 1e-12);
  EXPECT_TRUE(provenance.contains("float_test_accuracy"));
  EXPECT_TRUE(provenance.at("data").get<std::string>().find("quadrant blobs") != std::string::npos);
  EXPECT_EQ(model.metadata.at("cimsweep.class_names"), R"(["a","b","c","d"])");
  // `cimsweep eval`'s clean reference (σ = 0, ideal ADC) is the number the trainer reported.
  CimConfig config;
  TrialRunner runner(model, d.test, config, "m");
  EXPECT_DOUBLE_EQ(runner.run_clean().accuracy, r.quantised_test_accuracy);
}

// Every tensor, every range: the trained model in full.
void expect_identical(const TrainResult& a, const TrainResult& b) {
  ASSERT_EQ(a.tensors.size(), b.tensors.size());
  for (const auto& [name, tensor] : a.tensors) {
    ASSERT_TRUE(b.tensors.count(name)) << name;
    EXPECT_EQ(tensor.data, b.tensors.at(name).data) << name;
  }
  EXPECT_EQ(a.input_ranges, b.input_ranges);
}

TEST(Training, StoppedAndResumedRunEqualsTheUninterruptedOneBitForBit) {
  const uint32_t seed = cimsweep::testing::test_seed(33);
  const Data d = make_data(seed);
  TrainSettings s = tiny_settings(seed);
  s.epochs = 3;
  s.train_sigma = 0.05f;  // the noise stream must resume too
  s.schedule = Schedule::kOneCycle;
  TempDir whole_dir, parts_dir;
  s.checkpoint_dir = whole_dir.path();
  omp_set_num_threads(2);
  const TrainResult whole = train_network(s, d.train, d.test);

  s.checkpoint_dir = parts_dir.path();
  s.stop_after_epoch = 1;
  omp_set_num_threads(1);
  const TrainResult first = train_network(s, d.train, d.test);
  EXPECT_TRUE(first.stopped_early);
  EXPECT_EQ(first.epochs.size(), 1u);
  // Running again without --resume must not overwrite the checkpoint.
  EXPECT_THROW(train_network(s, d.train, d.test), UserError);
  s.stop_after_epoch = 0;
  s.resume = true;
  omp_set_num_threads(2);
  const TrainResult rest = train_network(s, d.train, d.test);
  omp_set_num_threads(omp_get_num_procs());
  ASSERT_FALSE(rest.stopped_early);
  ASSERT_EQ(rest.epochs.size(), 3u);
  for (int e = 0; e < 3; ++e) {
    EXPECT_EQ(rest.epochs[e].loss, whole.epochs[e].loss) << "epoch " << e + 1;
    EXPECT_EQ(rest.epochs[e].test_accuracy, whole.epochs[e].test_accuracy);
  }
  expect_identical(whole, rest);

  // A checkpoint of other settings is refused with the setting that differs.
  s.lr = 0.07;
  try {
    train_network(s, d.train, d.test);
    FAIL() << "a checkpoint of another run was accepted";
  } catch (const UserError& e) {
    EXPECT_NE(std::string(e.what()).find("lr (checkpoint: 0.05, now: 0.07)"), std::string::npos)
        << e.what();
  }
}

TEST(Training, MultiExitNetworkTrainsEveryHead) {
  const uint32_t seed = cimsweep::testing::test_seed(34);
  const Data d = make_data(seed);
  TrainSettings s = tiny_settings(seed);
  s.exits = {1, 2};
  const TrainResult r = train_network(s, d.train, d.test);
  ASSERT_EQ(r.exit_quantised_test_accuracy.size(), 3u);
  // Chance is 25 %. After stage 1 the features have seen 7×7 pixels, too few to place the blob
  // relative to the image border reliably, so the first exit learns less than the others.
  // Measured over the default seed and CIMSWEEP_TEST_SEED=1…10: the first exit 56–99 %, the
  // others 100 %; the first bound is about half the least excess over chance.
  EXPECT_GE(r.exit_quantised_test_accuracy[0], 45.0);
  EXPECT_GE(r.exit_quantised_test_accuracy[1], 90.0);
  EXPECT_GE(r.exit_quantised_test_accuracy[2], 95.0);
  EXPECT_EQ(r.provenance.at("exit_weights"), (std::vector<float>{1.0f, 0.75f, 0.5f}));
  ASSERT_EQ(r.epochs.back().exit_test_accuracy.size(), 3u);
}

TEST(Training, FrozenBackboneKeepsItsTensorsAndTrainsTheExits) {
  const uint32_t seed = cimsweep::testing::test_seed(35);
  const Data d = make_data(seed);
  TrainSettings s = tiny_settings(seed);
  s.epochs = 3;
  const TrainResult backbone = train_network(s, d.train, d.test);
  TempDir dir;
  save_trained_model(dir.file("backbone.safetensors"), backbone, {});

  s.init_path = dir.file("backbone.safetensors");
  s.exits = {1, 2};
  s.exit_head.type = "pool";
  s.freeze_backbone = true;
  s.exit_weights = {1.0f, 1.0f, 0.0f};
  const TrainResult heads = train_network(s, d.train, d.test);
  for (const auto& [name, tensor] : backbone.tensors)
    EXPECT_EQ(tensor.data, heads.tensors.at(name).data) << name;
  EXPECT_TRUE(heads.tensors.count("exit1.fc.weight"));
  EXPECT_LT(heads.epochs.back().loss, heads.epochs.front().loss);
  // Chance: 25 %. Measured 52–90 % over the default seed and CIMSWEEP_TEST_SEED=1…10 (3 epochs).
  EXPECT_GE(heads.exit_quantised_test_accuracy[1], 35.0);

  // A model of another architecture is refused.
  s.width = 5;
  EXPECT_THROW(train_network(s, d.train, d.test), UserError);
}

TEST(Training, PactLearnsTheRangesAndWageScalingTrains) {
  const uint32_t seed = cimsweep::testing::test_seed(36);
  const Data d = make_data(seed);
  TrainSettings s = tiny_settings(seed);
  s.ranges = RangeMode::kPact;
  s.scaling = WeightScaling::kWage;
  s.weight_bits = 6;
  s.input_bits = 6;
  const TrainResult r = train_network(s, d.train, d.test);
  EXPECT_EQ(r.input_ranges.at("conv1"), 1.0f);
  EXPECT_GE(r.quantised_test_accuracy, 95.0);
  // Two independent computations of the quantised network's accuracy: the trainer's own
  // fake-quantised float forward on its last epoch (train/quantise.h; PACT ranges are not
  // recalibrated after it) and the evaluator's integer digital layers on the saved tensors. They
  // differ only where float rounding flips an argmax. (Measured at the default seed and
  // CIMSWEEP_TEST_SEED=1…10: 100 % both;
  // at that ceiling this catches a broken WAGE or PACT path in either, not a one-image slip.)
  std::cout << "[ accuracy ] trainer (fake-quantised) " << r.epochs.back().test_accuracy
            << " %, evaluator (digital) " << r.quantised_test_accuracy << " %" << std::endl;
  EXPECT_NEAR(r.epochs.back().test_accuracy, r.quantised_test_accuracy, 100.0 / 200 + 1e-9)
      << "more than one of the 200 test images classified differently";
  // The same run with calibrated ranges ends with other ranges: PACT moved them.
  s.ranges = RangeMode::kCalibrate;
  const TrainResult calibrated = train_network(s, d.train, d.test);
  EXPECT_NE(r.input_ranges, calibrated.input_ranges);
}

TEST(Training, BadSettingsAndMismatchedDataAreUserErrors) {
  const Data d = make_data(37);
  auto fails = [&](const std::function<void(TrainSettings&)>& change, const std::string& text) {
    TrainSettings s = tiny_settings(1);
    change(s);
    try {
      train_network(s, d.train, d.test);
      ADD_FAILURE() << "no error, expected one about " << text;
    } catch (const UserError& e) {
      EXPECT_NE(std::string(e.what()).find(text), std::string::npos) << e.what();
    }
  };
  fails([](TrainSettings& s) { s.lr = 0; }, "--lr must be a positive number");
  fails([](TrainSettings& s) { s.depth = 10; }, "--depth 10 is not of the form 6n+2");
  fails([](TrainSettings& s) { s.exit_weights = {1, 1}; }, "--exit-weights has 2 values");
  fails([](TrainSettings& s) { s.crop_padding = 8; }, "--crop-padding 8");
  const Dataset three = quadrant_blobs(50, 3, 8, 3);
  EXPECT_THROW(train_network(tiny_settings(1), d.train, three), UserError);
}

}  // namespace
