// BlockDrop: the REINFORCE estimator's sign, baseline and gradient on tiny bandits, the
// curriculum's masks, the rewards, a tiny policy that learns to skip blocks that do not matter
// on generated data, joint fine-tuning of policy and backbone, and the same policy from the same
// seed.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "host/backends.h"
#include "host/policies/blockdrop_eval.h"
#include "common/errors.h"
#include "host/io/model_file.h"
#include "host/io/safetensors.h"
#include "tests/test_util.h"
#include "tests/train_test_data.h"
#include "train/blockdrop.h"
#include "train/trainer.h"

namespace {

using namespace cimsweep;
using namespace cimsweep::train;
using cimsweep::testing::quadrant_blobs;
using cimsweep::testing::TempDir;

TEST(BlockDropCurriculum, EpochTFreesTheLastTBlocks) {
  EXPECT_EQ(curriculum_free_blocks(6, 1), (std::vector<uint8_t>{0, 0, 0, 0, 0, 1}));
  EXPECT_EQ(curriculum_free_blocks(6, 3), (std::vector<uint8_t>{0, 0, 0, 1, 1, 1}));
  EXPECT_EQ(curriculum_free_blocks(6, 6), (std::vector<uint8_t>{1, 1, 1, 1, 1, 1}));
  EXPECT_EQ(curriculum_free_blocks(6, 40), (std::vector<uint8_t>{1, 1, 1, 1, 1, 1}));
  EXPECT_EQ(curriculum_free_blocks(3, 0), (std::vector<uint8_t>{0, 0, 0}));
}

TEST(BlockDropReward, SparsityWhenCorrectPenaltyWhenWrong) {
  RewardSettings blockdrop;
  EXPECT_DOUBLE_EQ(blockdrop_reward(true, 3, 6, blockdrop), 0.75);
  EXPECT_DOUBLE_EQ(blockdrop_reward(true, 6, 6, blockdrop), 0.0);
  EXPECT_DOUBLE_EQ(blockdrop_reward(false, 1, 6, blockdrop), -5.0);
  RewardSettings accuracy;
  accuracy.accuracy_objective = true;
  EXPECT_DOUBLE_EQ(blockdrop_reward(true, 6, 6, accuracy), 1.0);
  EXPECT_DOUBLE_EQ(blockdrop_reward(true, 0, 6, accuracy), 1.0);
  accuracy.compute_weight = 0.5;
  EXPECT_DOUBLE_EQ(blockdrop_reward(true, 3, 6, accuracy), 1.375);
  EXPECT_DOUBLE_EQ(blockdrop_reward(false, 3, 6, accuracy), -5.0);
}

TEST(BlockDropEstimator, PositiveAdvantageRaisesTheSampledActionsProbability) {
  std::vector<float> dlogits;
  const std::vector<uint8_t> free{1};
  // A kept block with a positive advantage: descending the gradient raises p (dL/dz < 0).
  reinforce_loss_and_gradient({0.3f}, {1}, {1.0}, free, 0.8, 0.0, dlogits);
  EXPECT_LT(dlogits[0], 0.0f);
  // The same kept block with a negative advantage lowers p; a dropped one the other way round.
  reinforce_loss_and_gradient({0.3f}, {1}, {-1.0}, free, 0.8, 0.0, dlogits);
  EXPECT_GT(dlogits[0], 0.0f);
  reinforce_loss_and_gradient({0.3f}, {0}, {1.0}, free, 0.8, 0.0, dlogits);
  EXPECT_GT(dlogits[0], 0.0f);
  // The self-critical baseline: a sample as good as the thresholded policy teaches nothing.
  reinforce_loss_and_gradient({0.3f}, {1}, {0.0}, free, 0.8, 0.0, dlogits);
  EXPECT_EQ(dlogits[0], 0.0f);
  // The entropy bonus alone pulls p' towards 1/2.
  reinforce_loss_and_gradient({0.9f}, {1}, {0.0}, free, 0.8, 0.1, dlogits);
  EXPECT_GT(dlogits[0], 0.0f);
  // A block that the curriculum forces on gets no gradient.
  reinforce_loss_and_gradient({0.3f, 0.6f}, {1, 0}, {1.0}, {0, 1}, 0.8, 0.1, dlogits);
  EXPECT_EQ(dlogits[0], 0.0f);
  EXPECT_NE(dlogits[1], 0.0f);
}

TEST(BlockDropEstimator, GradientMatchesFiniteDifferences) {
  const std::vector<double> logits{-0.7, 0.2, 1.3, 0.4, -1.1, 0.05};
  const std::vector<uint8_t> sampled{1, 0, 1, 0, 0, 1}, free{1, 1, 1};
  const std::vector<double> advantages{0.8, -2.5};
  auto probs_of = [](const std::vector<double>& z) {
    std::vector<float> p;
    for (double v : z) p.push_back(float(1 / (1 + std::exp(-v))));
    return p;
  };
  std::vector<float> dlogits, unused;
  reinforce_loss_and_gradient(probs_of(logits), sampled, advantages, free, 0.8, 0.1, dlogits);
  for (size_t j = 0; j < logits.size(); ++j) {
    std::vector<double> up = logits, down = logits;
    up[j] += 1e-3;
    down[j] -= 1e-3;
    const double numeric =
        (reinforce_loss_and_gradient(probs_of(up), sampled, advantages, free, 0.8, 0.1, unused) -
         reinforce_loss_and_gradient(probs_of(down), sampled, advantages, free, 0.8, 0.1, unused)) /
        2e-3;
    // Measured: at most 1.6e-5 apart (float probabilities, steps of 1e-3); the bound is three
    // times that.
    EXPECT_NEAR(dlogits[j], numeric, 5e-5) << "logit " << j;
  }
}

// A one-block bandit: keeping the block earns `keep_reward`, dropping it `drop_reward`. With the
// self-critical baseline the policy moves to the better arm whichever side it starts on.
double train_bandit(double keep_reward, double drop_reward, double start_logit, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<double> uniform(0, 1);
  double z = start_logit;
  std::vector<float> dlogits;
  for (int step = 0; step < 400; ++step) {
    std::vector<float> probs;
    std::vector<uint8_t> sampled;
    std::vector<double> advantages;
    for (int i = 0; i < 16; ++i) {
      const float p = float(1 / (1 + std::exp(-z)));
      const bool keep = uniform(rng) < explore(p, 0.8);
      const bool greedy = p >= 0.5f;
      probs.push_back(p);
      sampled.push_back(keep);
      advantages.push_back((keep ? keep_reward : drop_reward) -
                           (greedy ? keep_reward : drop_reward));
    }
    reinforce_loss_and_gradient(probs, sampled, advantages, {1}, 0.8, 0.0, dlogits);
    double g = 0;
    for (float d : dlogits) g += d;
    z -= 2.0 * g;
  }
  return 1 / (1 + std::exp(-z));
}

TEST(BlockDropEstimator, BanditLearnsTheBetterArm) {
  const uint32_t seed = cimsweep::testing::test_seed(41);
  // Over the default seed and CIMSWEEP_TEST_SEED=1…50 the final keep probability was at least
  // 0.99963 and at most 0.0031; the bounds leave about three times those distances from 1 and 0.
  EXPECT_GT(train_bandit(1.0, -5.0, -1.0, seed), 0.999);  // starts dropping, learns to keep
  EXPECT_LT(train_bandit(0.0, 0.75, 1.0, seed), 0.01);    // starts keeping, learns to drop
}

TEST(BlockDropAdam, FirstStepMovesEachWeightByTheLearningRate) {
  std::vector<Parameter> parameters(1);
  parameters[0].value = {1.0f, -2.0f, 0.5f};
  parameters[0].grad = {0.3f, -4.0f, 0.0f};
  AdamState state;
  adam_step(parameters, state, 0.01);
  // Measured: exactly these floats; 1e-6 is about 8 float ulps at 2.
  EXPECT_NEAR(parameters[0].value[0], 0.99f, 1e-6);
  EXPECT_NEAR(parameters[0].value[1], -1.99f, 1e-6);
  EXPECT_NEAR(parameters[0].value[2], 0.5f, 1e-6);
  EXPECT_EQ(state.step, 1);
}

// A ResNet-8 backbone (3 blocks) trained briefly on quadrant blobs: a task so easy that some of
// its blocks do not matter.
std::string make_backbone(const TempDir& dir, uint32_t seed, const Dataset& train,
                          const Dataset& test) {
  TrainSettings s;
  s.depth = 8;
  s.width = 4;
  s.epochs = 4;
  s.batch = 32;
  s.lr = 0.05;
  s.seed = seed;
  s.crop_padding = 0;
  s.calibration_images = 200;
  s.quiet = true;
  const TrainResult r = train_network(s, train, test);
  const std::string path = dir.file("backbone.safetensors");
  save_model(path, r.arch, r.tensors, r.input_ranges);
  return path;
}

// The final head's logits [n × classes] of the quantised digital network (σ = 0, what eval runs
// the policy on unless --policy-on-cim), with every block or under the keep masks `keep`.
std::vector<float> digital_logits(const LoadedModel& model, const Dataset& data,
                                  const uint8_t* keep = nullptr) {
  auto backend = make_backend({}, model.network->cim_layers(), CimConfig{});
  backend->program_chip(0, 0.0);
  backend->set_all_digital(true);
  backend->begin_batch(0);
  std::vector<float> images(data.pixels.size());
  for (size_t i = 0; i < images.size(); ++i) images[i] = data.pixels[i] / 255.0f;
  return model.network->forward(images.data(), int(data.size()), *backend, keep).back();
}

// Top-1 accuracy (%) of the digital backbone, with every block or under the masks `keep`.
double digital_accuracy(const LoadedModel& model, const Dataset& data,
                        const uint8_t* keep = nullptr) {
  const std::vector<float> logits = digital_logits(model, data, keep);
  const int classes = model.network->arch().num_classes;
  size_t correct = 0;
  for (size_t i = 0; i < data.size(); ++i) {
    const float* row = logits.data() + i * size_t(classes);
    correct += int(std::max_element(row, row + classes) - row) == data.labels[i];
  }
  return 100.0 * double(correct) / double(data.size());
}
double full_depth_accuracy(const LoadedModel& model, const Dataset& data) {
  return digital_accuracy(model, data);
}

// The keep masks [n × blocks] the policy's documented rule gives: block k runs when its digital
// logit, plus w_k·σ/sigma_scale for a σ-aware policy, is ≥ 0 (p = sigmoid ≥ 1/2).
std::vector<uint8_t> expected_masks(const LoadedModel& policy, const Dataset& data,
                                    const std::vector<float>& sigma_weight = {},
                                    double sigma_input = 0) {
  const std::vector<float> logits = digital_logits(policy, data);
  const size_t blocks = size_t(policy.network->arch().num_classes);
  std::vector<uint8_t> keep(logits.size());
  for (size_t at = 0; at < keep.size(); ++at) {
    const double w = sigma_weight.empty() ? 0.0 : sigma_weight[at % blocks];
    keep[at] = double(logits[at]) + w * sigma_input >= 0 ? 1 : 0;
  }
  return keep;
}

// Mean blocks kept per image and the number of distinct patterns of masks [n × blocks].
std::pair<double, size_t> kept_and_patterns(const std::vector<uint8_t>& keep, size_t blocks) {
  std::set<std::vector<uint8_t>> patterns;
  size_t kept = 0;
  for (size_t i = 0; i < keep.size(); i += blocks) {
    patterns.emplace(keep.begin() + long(i), keep.begin() + long(i + blocks));
    for (size_t k = 0; k < blocks; ++k) kept += keep[i + k];
  }
  return {double(kept) / double(keep.size() / blocks), patterns.size()};
}

BlockDropSettings tiny_policy_settings(uint64_t seed) {
  BlockDropSettings s;
  s.policy_width = 4;
  s.lr = 5e-3;
  s.batch = 32;
  s.epochs = 20;
  s.finetune_epochs = 0;  // the policy for the frozen backbone alone
  s.seed = seed;
  return s;
}

TEST(BlockDropTraining, TinyPolicyLearnsToSkipBlocksThatDoNotMatter) {
  const uint32_t seed = cimsweep::testing::test_seed(42);
  TempDir dir;
  const Dataset train = quadrant_blobs(640, seed, 8), test = quadrant_blobs(200, seed + 1000, 8);
  const LoadedModel backbone = load_model(make_backbone(dir, seed, train, test));
  const BlockDropResult r = train_blockdrop(tiny_policy_settings(seed), backbone, train, test);
  ASSERT_EQ(r.epochs.size(), 20u);
  EXPECT_EQ(r.policy_arch.num_classes, 3);
  EXPECT_EQ(r.epochs.front().free_blocks, 1);
  EXPECT_EQ(r.epochs.back().free_blocks, 3);
  // Blocks are skipped (3 = every block kept): measured 2.33 kept at the default seed and up to
  // 2.75 over CIMSWEEP_TEST_SEED=4…10, so the bound 2.9 says "skips" with room; and at most half a
  // point of accuracy lost over those seeds.
  EXPECT_LE(r.epochs.back().blocks_kept, 2.9);
  // Accuracy kept: within 2 points of the backbone with every block.
  const double full = full_depth_accuracy(backbone, test);
  EXPECT_GE(r.epochs.back().test_accuracy, full - 2.0);

  // The policy file: an ordinary model file naming its backbone by relative path and hash.
  const std::string path = dir.file("policy.safetensors");
  save_blockdrop_policy(path, r, backbone);
  const LoadedModel policy = load_model(path);
  const auto meta = nlohmann::json::parse(policy.metadata.at("cimsweep.blockdrop"));
  EXPECT_EQ(meta.at("backbone"), "backbone.safetensors");
  EXPECT_EQ(meta.at("backbone_hash"), backbone.content_hash);
  EXPECT_EQ(meta.at("sigma_input"), false);
}

TEST(BlockDropTraining, SameSeedSamePolicy) {
  const uint32_t seed = cimsweep::testing::test_seed(43);
  TempDir dir;
  const Dataset train = quadrant_blobs(256, seed, 8), test = quadrant_blobs(64, seed + 1000, 8);
  const LoadedModel backbone = load_model(make_backbone(dir, seed, train, test));
  BlockDropSettings s = tiny_policy_settings(seed);
  s.epochs = 3;
  s.sigma_aware = true;  // the noisy chips too are a pure function of the seed
  s.reward.accuracy_objective = true;
  const BlockDropResult a = train_blockdrop(s, backbone, train, test);
  const BlockDropResult b = train_blockdrop(s, backbone, train, test);
  ASSERT_EQ(a.tensors.size(), b.tensors.size());
  for (const auto& [name, tensor] : a.tensors)
    EXPECT_EQ(tensor.data, b.tensors.at(name).data) << name;
  EXPECT_EQ(a.input_ranges, b.input_ranges);
  EXPECT_EQ(a.sigma_weight, b.sigma_weight);
  EXPECT_EQ(a.sigma_weight.size(), 3u);
  s.seed += 1;
  const BlockDropResult c = train_blockdrop(s, backbone, train, test);
  EXPECT_NE(a.tensors.at("fc.weight").data, c.tensors.at("fc.weight").data);
}

TEST(BlockDropTraining, JointFineTuningKeepsAccuracyAndWritesBothFiles) {
  const uint32_t seed = cimsweep::testing::test_seed(48);
  TempDir dir;
  const Dataset train = quadrant_blobs(640, seed, 8), test = quadrant_blobs(200, seed + 1000, 8);
  const LoadedModel backbone = load_model(make_backbone(dir, seed, train, test));
  BlockDropSettings s = tiny_policy_settings(seed);
  s.epochs = 8;
  s.finetune_epochs = 3;
  s.backbone_lr = 1e-3;
  const BlockDropResult r = train_blockdrop(s, backbone, train, test);
  ASSERT_EQ(r.epochs.size(), 11u);
  EXPECT_FALSE(r.epochs[7].joint);
  EXPECT_TRUE(r.epochs.back().joint);
  EXPECT_EQ(r.epochs.back().free_blocks, 3);
  ASSERT_TRUE(r.finetuned());
  // Accuracy kept: the fine-tuned backbone under the policy within 2 points of the original with
  // every block. (Measured: at most 1 point lost, the default seed and CIMSWEEP_TEST_SEED=4…10.)
  EXPECT_GE(r.epochs.back().test_accuracy, full_depth_accuracy(backbone, test) - 2.0);

  const std::string path = dir.file("policy.safetensors");
  save_blockdrop_policy(path, r, backbone);
  EXPECT_EQ(finetuned_backbone_path(path), dir.file("policy-backbone.safetensors"));
  const LoadedModel tuned = load_model(finetuned_backbone_path(path));
  const LoadedModel policy = load_model(path);
  const auto meta = nlohmann::json::parse(policy.metadata.at("cimsweep.blockdrop"));
  EXPECT_EQ(meta.at("backbone"), "policy-backbone.safetensors");
  EXPECT_EQ(meta.at("backbone_hash"), tuned.content_hash);
  EXPECT_NE(tuned.content_hash, backbone.content_hash);
  // The fine-tuned backbone trained, and its ranges were measured again, not copied.
  const auto original = read_safetensors(backbone.path);
  EXPECT_NE(original.tensors.at("layer1.0.conv1.weight").data,
            r.backbone_tensors.at("layer1.0.conv1.weight").data);
  bool ranges_changed = false;
  for (const CimLayerSpec& layer : backbone.network->cim_layers())
    ranges_changed |= r.backbone_input_ranges.at(layer.name) != layer.input_range;
  EXPECT_TRUE(ranges_changed);
  EXPECT_EQ(r.backbone_input_ranges.at("conv1"), 1.0f);
  const auto provenance = nlohmann::json::parse(tuned.metadata.at("cimsweep.provenance"));
  EXPECT_EQ(provenance.at("finetuned_from_hash"), backbone.content_hash);
  // The two files reproduce the last joint epoch's test accuracy: the fine-tuned backbone read
  // back, digital, under the masks of the policy read back.
  const std::vector<uint8_t> masks = expected_masks(policy, test);
  std::cout << "last joint epoch: " << r.epochs.back().test_accuracy << " %, "
            << r.epochs.back().blocks_kept << " blocks kept\n";
  EXPECT_DOUBLE_EQ(digital_accuracy(tuned, test, masks.data()), r.epochs.back().test_accuracy);
  // The trainer counts blocks kept with its own float engine, the evaluator with the digital
  // integer path: a decision whose policy logit lies within the two engines' rounding of 0 may go
  // either way (seen at CIMSWEEP_TEST_SEED=5 and 6: one decision of 600). Each such decision moves
  // the mean by 1/images; the logits agree to 2.1e-7 of the largest (test_train_network), so a
  // decision counts as ambiguous within 1e-5 of it.
  const std::vector<float> logits = digital_logits(policy, test);
  float largest = 0;
  for (float z : logits) largest = std::max(largest, std::fabs(z));
  size_t ambiguous = 0;
  for (float z : logits) ambiguous += std::fabs(z) <= 1e-5f * largest;
  EXPECT_LE(std::fabs(kept_and_patterns(masks, 3).first - r.epochs.back().blocks_kept) *
                double(test.size()),
            double(ambiguous) + 1e-9)
      << ambiguous << " ambiguous decisions";
}

TEST(BlockDropTraining, JointFineTuningSameSeedSameResult) {
  const uint32_t seed = cimsweep::testing::test_seed(49);
  TempDir dir;
  const Dataset train = quadrant_blobs(192, seed, 8), test = quadrant_blobs(64, seed + 1000, 8);
  const LoadedModel backbone = load_model(make_backbone(dir, seed, train, test));
  BlockDropSettings s = tiny_policy_settings(seed);
  s.epochs = 3;
  s.finetune_epochs = 2;
  const BlockDropResult a = train_blockdrop(s, backbone, train, test);
  const BlockDropResult b = train_blockdrop(s, backbone, train, test);
  for (const auto& [name, tensor] : a.tensors)
    EXPECT_EQ(tensor.data, b.tensors.at(name).data) << name;
  ASSERT_EQ(a.backbone_tensors.size(), b.backbone_tensors.size());
  for (const auto& [name, tensor] : a.backbone_tensors)
    EXPECT_EQ(tensor.data, b.backbone_tensors.at(name).data) << name;
  EXPECT_EQ(a.backbone_input_ranges, b.backbone_input_ranges);
  EXPECT_EQ(a.epochs.back().test_accuracy, b.epochs.back().test_accuracy);
}

TEST(BlockDropTraining, BadSettingsAreOneLineUserErrors) {
  BlockDropSettings s;
  s.alpha = 0.3;
  EXPECT_THROW(validate_blockdrop_settings(s), UserError);
  s = {};
  s.sigma_aware = true;
  s.sigma_min = 0.2;
  s.sigma_max = 0.1;
  EXPECT_THROW(validate_blockdrop_settings(s), UserError);
  s = {};
  s.policy_blocks = 0;
  EXPECT_THROW(validate_blockdrop_settings(s), UserError);
  s = {};
  s.backbone_lr = 0;
  EXPECT_THROW(validate_blockdrop_settings(s), UserError);
  s = {};
  s.sigma_aware = true;
  EXPECT_EQ(finetune_epochs(s), 0);  // the default leaves σ-aware policies alone
  s.finetune_epochs = 2;
  EXPECT_THROW(validate_blockdrop_settings(s), UserError);
}

TEST(BlockDropEval, KeepStatisticsCountBlocksPatternsAndMacs) {
  const uint32_t seed = cimsweep::testing::test_seed(47);
  TempDir dir;
  const Dataset train = quadrant_blobs(64, seed, 8), test = quadrant_blobs(16, seed + 1000, 8);
  const LoadedModel backbone = load_model(make_backbone(dir, seed, train, test));
  const BlockMacs macs = block_macs(*backbone.network);
  // By hand, ResNet-8 of width 4 on 8×8 grey images, 4 classes, shortcut A (no shortcut convs):
  // a 3×3 conv makes out·in·9 MACs per output pixel.
  const int64_t stem = 4 * 1 * 9 * 64, fc = 16 * 4;
  const std::vector<int64_t> blocks{2 * 4 * 4 * 9 * 64,                 // stage 1, 8×8
                                    8 * 4 * 9 * 16 + 8 * 8 * 9 * 16,    // stage 2, 4×4
                                    16 * 8 * 9 * 4 + 16 * 16 * 9 * 4};  // stage 3, 2×2
  EXPECT_EQ(macs.block, blocks);
  EXPECT_EQ(macs.total, stem + blocks[0] + blocks[1] + blocks[2] + fc);
  KeepStatistics stats(macs);
  const std::vector<uint8_t> masks{1, 1, 1, 0, 1, 1, 0, 1, 1, 0, 0, 1};
  stats.add(masks.data(), 4, 3);
  BlockDropModel model;
  model.policy.path = "p.safetensors";
  const auto j = stats.to_json(model);
  EXPECT_DOUBLE_EQ(j.at("mean_blocks_kept").get<double>(), 2.0);
  EXPECT_DOUBLE_EQ(j.at("std_blocks_kept").get<double>(), std::sqrt(0.5));
  EXPECT_EQ(j.at("patterns"), 3);
  EXPECT_DOUBLE_EQ(j.at("macs_per_image").get<double>(),
                   double(macs.total) - (3.0 * macs.block[0] + macs.block[1]) / 4.0);
}

TEST(BlockDropTraining, EpochsShorterThanTheCurriculumAreRefused) {
  const uint32_t seed = cimsweep::testing::test_seed(46);
  TempDir dir;
  const Dataset train = quadrant_blobs(64, seed, 8), test = quadrant_blobs(16, seed + 1000, 8);
  const LoadedModel backbone = load_model(make_backbone(dir, seed, train, test));
  BlockDropSettings s = tiny_policy_settings(seed);
  s.epochs = 2;  // 3 blocks
  try {
    train_blockdrop(s, backbone, train, test);
    FAIL() << "no UserError";
  } catch (const UserError& e) {
    EXPECT_NE(std::string(e.what()).find("use at least 3"), std::string::npos) << e.what();
  }
}

// ---------------------------------------------------------------------------------------------
// The command line: train-blockdrop writes a policy file that eval and sweep run as a model.

struct CliFiles {
  TempDir dir;
  std::string data, backbone, policy;
};

// Generated IDX data, a tiny backbone from `cimsweep train` and a policy from train-blockdrop
// with `finetune_epochs` of joint fine-tuning.
void make_cli_files(CliFiles& f, uint32_t seed, int finetune_epochs = 0) {
  using cimsweep::testing::run_cimsweep;
  f.data = f.dir.path();
  cimsweep::testing::write_idx(quadrant_blobs(320, seed, 8), f.data, "train");
  cimsweep::testing::write_idx(quadrant_blobs(100, seed + 1000, 8), f.data, "t10k");
  f.backbone = f.dir.file("backbone.safetensors");
  f.policy = f.dir.file("policy.safetensors");
  const auto train = run_cimsweep(
      "train --data " + f.data + " --depth 8 --width 4 --epochs 3 " +
      "--batch 32 --lr 0.05 --crop-padding 0 --calibration-images 100 " +
      "--quiet --threads 1 --seed " + std::to_string(seed) + " --output " + f.backbone);
  ASSERT_EQ(train.exit_code, 0) << train.err;
  const auto policy =
      run_cimsweep("train-blockdrop --backbone " + f.backbone + " --data " + f.data +
                   " --policy-width 4 --lr 5e-3 --batch 32 --epochs 5 " + "--threads 1 --seed " +
                   std::to_string(seed) + " --finetune-epochs " + std::to_string(finetune_epochs) +
                   " --output " + f.policy);
  ASSERT_EQ(policy.exit_code, 0) << policy.err;
  EXPECT_NE(policy.err.find("epoch 5/5: 3 of 3 blocks free"), std::string::npos) << policy.err;
}

TEST(BlockDropCli, SweepRunsThePolicyBesideItsFixedDepthBackbone) {
  using cimsweep::testing::run_cimsweep;
  const uint32_t seed = cimsweep::testing::test_seed(44);
  CliFiles f;
  make_cli_files(f, seed);
  if (HasFatalFailure()) return;
  const std::string results = f.dir.file("r.jsonl");
  const auto sweep = run_cimsweep("sweep " + f.backbone + " " + f.policy + " --data " + f.data +
                                  " --sigmas 0.05,0.2 --trials 2 --backend cpu --threads 1 " +
                                  "--quiet --format json --results " + results);
  ASSERT_EQ(sweep.exit_code, 0) << sweep.err;
  const auto rows = nlohmann::json::parse(sweep.out);
  ASSERT_EQ(rows.size(), 4u);
  // What the policy must choose on the 100 test images, from its digital logits and the
  // documented threshold; the digital policy ignores σ, so every chip gets the same masks.
  const Dataset test = quadrant_blobs(100, seed + 1000, 8);
  const LoadedModel policy = load_model(f.policy), backbone = load_model(f.backbone);
  const std::vector<uint8_t> masks = expected_masks(policy, test);
  const auto [kept, patterns] = kept_and_patterns(masks, 3);
  double kept_square = 0;  // E[k²] over the images
  for (size_t i = 0; i < masks.size(); i += 3) {
    const int k = masks[i] + masks[i + 1] + masks[i + 2];
    kept_square += double(k * k) / double(masks.size() / 3);
  }
  const double kept_std = std::sqrt(std::max(0.0, kept_square - kept * kept));
  std::cout << "policy keeps " << kept << " ± " << kept_std << " blocks per image, " << patterns
            << " patterns\n";
  for (const auto& row : rows) {
    const bool is_policy = row.at("model") == "policy";
    EXPECT_EQ(row.contains("blocks_kept"), is_policy) << row.dump();
    if (!is_policy) {
      EXPECT_DOUBLE_EQ(row.at("clean_accuracy").get<double>(), digital_accuracy(backbone, test));
      continue;
    }
    EXPECT_DOUBLE_EQ(row.at("blocks_kept").get<double>(), kept);
    EXPECT_EQ(row.at("keep_patterns").get<double>(), double(patterns));
    // blocks_kept_std is the spread of blocks kept over the images (every chip has the same
    // masks, so the chips add none): that of the expected masks, up to the rounding of
    // sqrt(E[k²] − E[k]²) (1e-6; at the default seed every image keeps as many, so it is 0).
    EXPECT_NEAR(row.at("blocks_kept_std").get<double>(), kept_std, 1e-6) << "same masks every chip";
    // The clean row: the digital backbone under those masks.
    EXPECT_DOUBLE_EQ(row.at("clean_accuracy").get<double>(),
                     digital_accuracy(backbone, test, masks.data()));
  }
  // The policy's records carry their keep statistics and a configuration of their own.
  std::string backbone_hash, policy_hash;
  std::istringstream lines(cimsweep::testing::read_text(results));
  for (std::string line; std::getline(lines, line);) {
    const auto record = nlohmann::json::parse(line);
    if (record.at("model") == "policy") {
      policy_hash = record.at("config_hash");
      EXPECT_EQ(record.at("extra").at("blockdrop").at("blocks"), 3);
    } else {
      backbone_hash = record.at("config_hash");
      EXPECT_FALSE(record.at("extra").contains("blockdrop"));
    }
  }
  EXPECT_NE(policy_hash, backbone_hash);

  const auto on_cim =
      run_cimsweep("eval " + f.policy + " --data " + f.data +
                   " --sigma 0.1 --backend cpu --threads 1 --quiet " + "--policy-on-cim");
  ASSERT_EQ(on_cim.exit_code, 0) << on_cim.err;
  EXPECT_NE(on_cim.out.find("| blocks kept | std | patterns |"), std::string::npos) << on_cim.out;
}

TEST(BlockDropCli, SweepRunsThePolicyWithItsFineTunedBackbone) {
  using cimsweep::testing::run_cimsweep;
  const uint32_t seed = cimsweep::testing::test_seed(50);
  CliFiles f;
  make_cli_files(f, seed, 2);
  if (HasFatalFailure()) return;
  const std::string tuned = f.dir.file("policy-backbone.safetensors");
  const auto meta = nlohmann::json::parse(load_model(f.policy).metadata.at("cimsweep.blockdrop"));
  EXPECT_EQ(meta.at("backbone"), "policy-backbone.safetensors");
  EXPECT_EQ(meta.at("backbone_hash"), load_model(tuned).content_hash);
  const auto sweep = run_cimsweep("sweep " + f.policy + " --data " + f.data +
                                  " --sigmas 0.05 --trials 2 --backend cpu --threads 1 " +
                                  "--quiet --format json");
  ASSERT_EQ(sweep.exit_code, 0) << sweep.err;
  const auto rows = nlohmann::json::parse(sweep.out);
  ASSERT_EQ(rows.size(), 1u);
  EXPECT_TRUE(rows[0].contains("blocks_kept")) << rows[0].dump();
  // The policy names the fine-tuned backbone, not the original: retraining that one is harmless.
  const auto retrain = run_cimsweep("train --data " + f.data + " --depth 8 --width 4 --epochs 1 " +
                                    "--crop-padding 0 --calibration-images 100 --quiet " +
                                    "--threads 1 --seed 999 --output " + f.backbone);
  ASSERT_EQ(retrain.exit_code, 0) << retrain.err;
  const auto eval = run_cimsweep("eval " + f.policy + " --data " + f.data +
                                 " --sigma 0.1 --backend cpu --quiet --format json");
  ASSERT_EQ(eval.exit_code, 0) << eval.err;
  // It runs the fine-tuned backbone under the policy's masks: the clean accuracy is that of the
  // digital fine-tuned backbone under the masks the policy's logits give.
  const Dataset test = quadrant_blobs(100, seed + 1000, 8);
  const std::vector<uint8_t> masks = expected_masks(load_model(f.policy), test);
  const auto row = nlohmann::json::parse(eval.out).at(0);
  std::cout << "eval: clean " << row.at("clean_accuracy") << " %, " << row.at("blocks_kept")
            << " blocks kept\n";
  EXPECT_DOUBLE_EQ(row.at("clean_accuracy").get<double>(),
                   digital_accuracy(load_model(tuned), test, masks.data()));
  EXPECT_DOUBLE_EQ(row.at("blocks_kept").get<double>(), kept_and_patterns(masks, 3).first);
}

// σ reaches the σ-aware policy: a policy file whose σ weights flip every block's decision at
// σ > 0 (w_k = ∓1000 against the side its logits take at σ = 0) keeps what its logits say at
// σ = 0 and the opposite at σ = 0.1, in the sweep's own keep statistics.
TEST(BlockDropCli, SigmaAwarePolicyDecisionFlipsWithTheChipsSigma) {
  using cimsweep::testing::run_cimsweep;
  const uint32_t seed = cimsweep::testing::test_seed(51);
  TempDir dir;
  const Dataset train = quadrant_blobs(64, seed, 8), test = quadrant_blobs(40, seed + 1000, 8);
  cimsweep::testing::write_idx(train, dir.path(), "train");
  cimsweep::testing::write_idx(test, dir.path(), "t10k");
  const LoadedModel backbone = load_model(make_backbone(dir, seed, train, test));
  // The policy network: a briefly trained 3-class ResNet-8, one output per block.
  TrainSettings settings;
  settings.depth = 8;
  settings.width = 4;
  settings.epochs = 1;
  settings.batch = 32;
  settings.seed = seed + 1;
  settings.crop_padding = 0;
  settings.calibration_images = 64;
  settings.quiet = true;
  const TrainResult net = train_network(settings, quadrant_blobs(64, seed + 2, 8, 3),
                                        quadrant_blobs(12, seed + 3, 8, 3));
  save_model(dir.file("net.safetensors"), net.arch, net.tensors, net.input_ranges);
  const std::vector<uint8_t> clean_masks =
      expected_masks(load_model(dir.file("net.safetensors")), test);
  BlockDropResult r;
  r.policy_arch = net.arch;
  r.tensors = net.tensors;
  r.input_ranges = net.input_ranges;
  r.sigma_scale = 0.2;
  for (size_t k = 0; k < 3; ++k) {
    size_t kept = 0;
    for (size_t i = k; i < clean_masks.size(); i += 3) kept += clean_masks[i];
    r.sigma_weight.push_back(2 * kept >= test.size() ? -1000.0f : 1000.0f);
  }
  const std::string path = dir.file("policy.safetensors");
  save_blockdrop_policy(path, r, backbone);
  const LoadedModel policy = load_model(path);
  const double kept_clean = kept_and_patterns(expected_masks(policy, test), 3).first;
  const double kept_noisy =
      kept_and_patterns(expected_masks(policy, test, r.sigma_weight, 0.1 / 0.2), 3).first;
  std::cout << "blocks kept: " << kept_clean << " at σ = 0, " << kept_noisy << " at σ = 0.1\n";
  ASSERT_NE(kept_clean, kept_noisy) << "the σ weights must change the decision";

  const auto sweep = run_cimsweep("sweep " + path + " --data " + dir.path() +
                                  " --sigmas 0,0.1 --trials 1 --backend cpu --threads 1 --quiet " +
                                  "--format json");
  ASSERT_EQ(sweep.exit_code, 0) << sweep.err;
  const auto rows = nlohmann::json::parse(sweep.out);
  ASSERT_EQ(rows.size(), 2u) << sweep.out;
  EXPECT_EQ(rows[0].at("sigma"), 0.0);
  EXPECT_DOUBLE_EQ(rows[0].at("blocks_kept").get<double>(), kept_clean);
  EXPECT_EQ(rows[1].at("sigma"), 0.1);
  EXPECT_DOUBLE_EQ(rows[1].at("blocks_kept").get<double>(), kept_noisy);
}

TEST(BlockDropCli, BadInputIsAOneLineError) {
  using cimsweep::testing::run_cimsweep;
  const uint32_t seed = cimsweep::testing::test_seed(45);
  CliFiles f;
  make_cli_files(f, seed);
  if (HasFatalFailure()) return;
  const std::string base = "train-blockdrop --backbone " + f.backbone + " --data " + f.data +
                           " --output " + f.dir.file("p2.safetensors") + " ";
  auto expect_one_line_error = [](const cimsweep::testing::CommandResult& r, const char* what) {
    EXPECT_EQ(r.exit_code, 2) << r.err;
    EXPECT_EQ(r.err.rfind("cimsweep: error: ", 0), 0u) << r.err;
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
    EXPECT_NE(r.err.find(what), std::string::npos) << r.err;
  };
  expect_one_line_error(run_cimsweep(base + "--alpha 0.3"), "--alpha");
  expect_one_line_error(run_cimsweep(base + "--sigma-aware --sigma-range 0.2"), "--sigma-range");
  expect_one_line_error(run_cimsweep(base + "--sigma-range 0,0.2"), "--sigma-aware");
  expect_one_line_error(run_cimsweep(base + "--sigma-aware --cim adc-bits"), "NAME=VALUE");
  expect_one_line_error(
      run_cimsweep("train-blockdrop --backbone " + f.dir.file("none.safetensors") + " --data " +
                   f.data + " --output " + f.dir.file("p3.safetensors")),
      "none.safetensors");

  // A policy whose backbone changed since it was trained is refused, not run on the wrong blocks.
  const auto retrain = run_cimsweep("train --data " + f.data + " --depth 8 --width 4 --epochs 1 " +
                                    "--crop-padding 0 --calibration-images 100 --quiet " +
                                    "--threads 1 --seed 999 --output " + f.backbone);
  ASSERT_EQ(retrain.exit_code, 0) << retrain.err;
  expect_one_line_error(
      run_cimsweep("eval " + f.policy + " --data " + f.data + " --sigma 0.1 --backend cpu --quiet"),
      "content hash differs");
}

}  // namespace
