#include "train/blockdrop.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>

#include "common/errors.h"
#include "host/io/model_file.h"
#include "host/io/safetensors.h"
#include "host/splitmix64.h"
#include "train/layers.h"
#include "train/trainer.h"

namespace cimsweep::train {
namespace {

constexpr int kEvaluationBatch = 500;

double sigmoid(double z) {
  return 1.0 / (1.0 + std::exp(-z));
}

// Images of data set positions order[first … first+count−1] as floats in [0, 1], and their labels.
void gather_batch(const Dataset& data, const std::vector<uint32_t>& order, size_t first, int count,
                  std::vector<float>& images, std::vector<int32_t>& labels) {
  const size_t per_image = data.image_elements();
  images.resize(size_t(count) * per_image);
  labels.resize(size_t(count));
  for (int i = 0; i < count; ++i) {
    const uint8_t* src = data.image(order[first + size_t(i)]);
    for (size_t p = 0; p < per_image; ++p) images[size_t(i) * per_image + p] = src[p] / 255.0f;
    labels[size_t(i)] = data.labels[order[first + size_t(i)]];
  }
}

// Keep probabilities [n × K] from the policy's channel-major logits; the σ-aware policy adds
// w_k·σ/sigma_scale to logit k (σ concatenated to the pooled features before the linear FC).
std::vector<float> keep_probabilities(const FeatureMap& logits,
                                      const std::vector<float>& sigma_weight, double sigma_input) {
  std::vector<float> probs = logits_row_major(logits);
  const size_t blocks = size_t(logits.channels);
  for (size_t at = 0; at < probs.size(); ++at) {
    const double z =
        probs[at] + (sigma_weight.empty() ? 0.0 : sigma_weight[at % blocks] * sigma_input);
    probs[at] = float(sigmoid(z));
  }
  return probs;
}

// The backbone's top-1 prediction (final head) of each image under its keep mask.
std::vector<int> backbone_predictions(const ResNet& net, CimBackend& backend,
                                      const std::vector<float>& images, int n,
                                      const std::vector<uint8_t>& keep) {
  backend.begin_batch(0);
  const auto logits = net.forward(images.data(), n, backend, keep.data());
  const int classes = net.arch().num_classes;
  std::vector<int> predicted(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) {
    const float* row = logits.back().data() + size_t(i) * classes;
    predicted[size_t(i)] = int(std::max_element(row, row + classes) - row);
  }
  return predicted;
}

// The thresholded policy's masks (p ≥ 0.5) with the blocks that are not free forced on.
std::vector<uint8_t> thresholded_masks(const std::vector<float>& probs, int n,
                                       const std::vector<uint8_t>& free) {
  const size_t blocks = free.size();
  std::vector<uint8_t> keep(size_t(n) * blocks);
  for (size_t i = 0; i < keep.size(); ++i) keep[i] = !free[i % blocks] || probs[i] >= 0.5f ? 1 : 0;
  return keep;
}

int count_kept(const uint8_t* mask, size_t blocks) {
  int kept = 0;
  for (size_t k = 0; k < blocks; ++k) kept += mask[k];
  return kept;
}

// Puts the backend on the chip that the policy is trained or tested against.
void use_chip(CimBackend& backend, bool noisy, uint32_t trial, double sigma) {
  if (noisy) {
    backend.set_all_digital(false);
    backend.program_chip(trial, sigma);
  } else {
    backend.program_chip(0, 0.0);
    backend.set_all_digital(true);
  }
}

// Joint fine-tuning's default epochs where BlockDropSettings::finetune_epochs is -1.
constexpr int kDefaultFinetuneEpochs = 10;
// The fine-tuned backbone's input ranges: as `cimsweep train` calibrates (trainer.h), the
// percentile over class-balanced training images, network in evaluation mode, every block run.
constexpr double kRangePercentile = 99.99;
constexpr size_t kCalibrationImages = 2000;

}  // namespace

int finetune_epochs(const BlockDropSettings& settings) {
  if (settings.finetune_epochs >= 0) return settings.finetune_epochs;
  return settings.sigma_aware ? 0 : kDefaultFinetuneEpochs;
}

// ---------------------------------------------------------------------------------------------
// The estimator.

std::vector<uint8_t> curriculum_free_blocks(int blocks, int epoch) {
  std::vector<uint8_t> free(size_t(std::max(blocks, 0)), 0);
  const int freed = std::clamp(epoch, 0, blocks);
  for (int k = blocks - freed; k < blocks; ++k) free[size_t(k)] = 1;
  return free;
}

double blockdrop_reward(bool correct, int kept, int blocks, const RewardSettings& s) {
  if (!correct) return -s.gamma;
  const double used = blocks > 0 ? double(kept) / blocks : 0.0;
  const double sparsity = 1 - used * used;
  return s.accuracy_objective ? 1 + s.compute_weight * sparsity : sparsity;
}

namespace {

// The self-critical advantage of every image: reward of its sampled mask − reward of its
// thresholded mask (the baseline); the thresholded rewards are added to reward_sum.
std::vector<double> self_critical_advantages(const std::vector<int>& sampled_pred,
                                             const std::vector<int>& greedy_pred,
                                             const std::vector<int32_t>& labels,
                                             const std::vector<uint8_t>& sampled,
                                             const std::vector<uint8_t>& greedy, int blocks,
                                             const RewardSettings& reward, double& reward_sum) {
  std::vector<double> advantages(labels.size());
  for (size_t i = 0; i < labels.size(); ++i) {
    const size_t row = i * size_t(blocks);
    const double r_sample = blockdrop_reward(
        sampled_pred[i] == labels[i], count_kept(&sampled[row], size_t(blocks)), blocks, reward);
    const double r_greedy = blockdrop_reward(
        greedy_pred[i] == labels[i], count_kept(&greedy[row], size_t(blocks)), blocks, reward);
    advantages[i] = r_sample - r_greedy;
    reward_sum += r_greedy;
  }
  return advantages;
}

}  // namespace

double reinforce_loss_and_gradient(const std::vector<float>& probs,
                                   const std::vector<uint8_t>& sampled,
                                   const std::vector<double>& advantages,
                                   const std::vector<uint8_t>& free, double alpha, double beta,
                                   std::vector<float>& dlogits) {
  const size_t blocks = free.size(), n = advantages.size();
  dlogits.assign(n * blocks, 0.0f);
  // Probabilities stay away from 0 and 1 so that the logarithms stay finite (as BlockDrop clamps).
  constexpr double kTiny = 1e-15;
  double loss = 0;
  for (size_t i = 0; i < n; ++i) {
    for (size_t k = 0; k < blocks; ++k) {
      if (!free[k]) continue;
      const size_t at = i * blocks + k;
      const double p = probs[at];
      const double q = std::clamp(explore(p, alpha), kTiny, 1 - kTiny);
      const bool kept = sampled[at] != 0;
      const double log_prob = kept ? std::log(q) : std::log(1 - q);
      const double entropy = -q * std::log(q) - (1 - q) * std::log(1 - q);
      loss += -advantages[i] * log_prob - beta * entropy;
      // d/dq of the two terms, then dq/dz = (2α − 1)·p(1 − p).
      const double dlog_prob = kept ? 1 / q : -1 / (1 - q);
      const double dentropy = std::log((1 - q) / q);
      const double dq = -advantages[i] * dlog_prob - beta * dentropy;
      dlogits[at] = float(dq * (2 * alpha - 1) * p * (1 - p) / double(n));
    }
  }
  return loss / double(std::max<size_t>(n, 1));
}

void adam_step(std::vector<Parameter>& parameters, AdamState& state, double lr, double beta1,
               double beta2, double eps) {
  if (state.m.size() != parameters.size()) {
    state.m.assign(parameters.size(), {});
    state.v.assign(parameters.size(), {});
    for (size_t i = 0; i < parameters.size(); ++i) {
      state.m[i].assign(parameters[i].value.size(), 0.0f);
      state.v[i].assign(parameters[i].value.size(), 0.0f);
    }
  }
  ++state.step;
  const double correction1 = 1 - std::pow(beta1, double(state.step));
  const double correction2 = 1 - std::pow(beta2, double(state.step));
  for (size_t i = 0; i < parameters.size(); ++i) {
    Parameter& p = parameters[i];
    if (!p.trainable) continue;
    std::vector<float>&m = state.m[i], &v = state.v[i];
    for (size_t j = 0; j < p.value.size(); ++j) {
      const double g = p.grad[j];
      m[j] = float(beta1 * m[j] + (1 - beta1) * g);
      v[j] = float(beta2 * v[j] + (1 - beta2) * g * g);
      const double m_hat = m[j] / correction1, v_hat = v[j] / correction2;
      p.value[j] -= float(lr * m_hat / (std::sqrt(v_hat) + eps));
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Training.

void validate_blockdrop_settings(const BlockDropSettings& s) {
  if (s.policy_blocks < 1)
    throw UserError("--policy-blocks must be at least 1: the policy needs one block per stage");
  if (s.policy_width < 1) throw UserError("--policy-width must be at least 1");
  if (!(s.reward.gamma >= 0)) throw UserError("--gamma must be ≥ 0 (the penalty is −γ)");
  if (!(s.lr > 0)) throw UserError("--lr must be positive");
  if (!(s.alpha > 0.5 && s.alpha <= 1))
    throw UserError("--alpha must lie in (0.5, 1]: p' = αp + (1 − α)(1 − p) must follow p");
  if (!(s.beta >= 0)) throw UserError("--beta (the entropy bonus) must be ≥ 0");
  if (s.batch < 1) throw UserError("--batch must be at least 1");
  if (s.epochs < 0) throw UserError("--epochs must be ≥ 0 (0: the curriculum plus 10)");
  if (!(s.reward.compute_weight >= 0)) throw UserError("--compute-weight must be ≥ 0");
  if (s.finetune_epochs < -1) throw UserError("--finetune-epochs must be ≥ 0 (0: no fine-tuning)");
  if (!(s.backbone_lr > 0)) throw UserError("--backbone-lr must be positive");
  if (s.sigma_aware && s.finetune_epochs > 0)
    throw UserError(
        "--finetune-epochs is not supported with --sigma-aware (its rewards come from simulated "
        "chips): leave it out or pass 0");
  if (s.sigma_aware && !(s.sigma_min >= 0 && s.sigma_max > s.sigma_min))
    throw UserError("--sigma-range must be MIN,MAX with 0 ≤ MIN < MAX, e.g. 0,0.2");
  if (s.sigma_aware && s.cim.adc == AdcMode::kCalibrated)
    throw UserError(
        "--adc calibrated is not supported for σ-aware BlockDrop training: use dynamic, "
        "fixed or ideal");
}

BlockDropResult train_blockdrop(const BlockDropSettings& settings, const LoadedModel& backbone,
                                const Dataset& train_data, const Dataset& test_data,
                                const std::function<void(const std::string&)>& log) {
  validate_blockdrop_settings(settings);
  const ResNet& net = *backbone.network;
  const ResNetArch& backbone_arch = net.arch();
  const int blocks = backbone_arch.num_blocks();
  if (blocks < 1) throw UserError("model '" + backbone.path + "' has no residual block to drop");
  for (const Dataset* data : {&train_data, &test_data}) {
    if (data->size() == 0) throw UserError("the data set " + data->description + " is empty");
    if (data->channels != backbone_arch.in_channels || data->height != backbone_arch.input_height ||
        data->width != backbone_arch.input_width || data->num_classes != backbone_arch.num_classes)
      throw UserError("data (" + data->description + ") does not fit the backbone '" +
                      backbone.path + "': use the data set it was trained on");
  }
  const bool sigma_aware = settings.sigma_aware;
  const int epochs = settings.epochs > 0 ? settings.epochs : blocks + 10;
  if (epochs < blocks)
    throw UserError("--epochs " + std::to_string(epochs) +
                    " ends before the curriculum has freed all " + std::to_string(blocks) +
                    " blocks of '" + backbone.path + "': use at least " + std::to_string(blocks));

  BlockDropResult result;
  ResNetArch& arch = result.policy_arch;
  arch.depth = 6 * settings.policy_blocks + 2;
  arch.width = settings.policy_width;
  arch.in_channels = backbone_arch.in_channels;
  arch.input_height = backbone_arch.input_height;
  arch.input_width = backbone_arch.input_width;
  arch.num_classes = blocks;
  arch.validate();
  result.sigma_scale = sigma_aware ? settings.sigma_max : 1.0;

  TrainableResNet policy(arch);
  policy.initialise(settings.seed);
  AdamState adam, sigma_adam;
  // σ-aware: the FC's weights of the σ feature, one per block, starting at 0 (σ ignored).
  std::vector<float> sigma_weight;
  std::vector<Parameter> sigma_parameter(1);
  if (sigma_aware) {
    sigma_weight.assign(size_t(blocks), 0.0f);
    sigma_parameter[0].name = "sigma_weight";
    sigma_parameter[0].shape = {blocks};
    sigma_parameter[0].value = sigma_weight;
    sigma_parameter[0].grad = sigma_weight;
  }
  SplitMix64 rng{settings.seed ^ 0x426c6f636b44726full};  // "BlockDro"

  const CimConfig chip_config = sigma_aware ? settings.cim : CimConfig{};
  const BackendChoice choice = sigma_aware ? settings.backend : BackendChoice{};
  std::unique_ptr<CimBackend> backend = make_backend(choice, net.cim_layers(), chip_config);

  ForwardOptions train_options;
  train_options.training = true;
  train_options.quant.enabled = false;
  ForwardOptions eval_options;
  eval_options.quant.enabled = false;

  const double test_sigma = sigma_aware ? (settings.sigma_min + settings.sigma_max) / 2 : 0.0;
  // The thresholded policy's accuracy and mean blocks kept over `data` with the backbone `model`
  // on the test chip of `chip`. Blocks that the curriculum has not freed yet stay on, as in
  // training.
  auto test = [&](const ResNet& model, CimBackend& chip, const Dataset& data,
                  const std::vector<uint8_t>& free, double& accuracy, double& kept_mean) {
    use_chip(chip, sigma_aware, kBlockDropTrainingFirstTrial - 1, test_sigma);
    std::vector<uint32_t> order(data.size());
    for (size_t i = 0; i < order.size(); ++i) order[i] = uint32_t(i);
    std::vector<float> images;
    std::vector<int32_t> labels;
    uint64_t correct = 0, kept = 0;
    for (size_t first = 0; first < data.size(); first += kEvaluationBatch) {
      const int n = int(std::min<size_t>(kEvaluationBatch, data.size() - first));
      gather_batch(data, order, first, n, images, labels);
      const auto probs = keep_probabilities(policy.forward(images.data(), n, eval_options).back(),
                                            sigma_weight, test_sigma / result.sigma_scale);
      const auto keep = thresholded_masks(probs, n, free);
      const auto predicted = backbone_predictions(model, chip, images, n, keep);
      for (int i = 0; i < n; ++i) {
        correct += predicted[size_t(i)] == labels[size_t(i)];
        kept += uint64_t(count_kept(keep.data() + size_t(i) * blocks, size_t(blocks)));
      }
    }
    accuracy = 100.0 * double(correct) / double(data.size());
    kept_mean = double(kept) / double(data.size());
  };

  std::vector<uint32_t> order(train_data.size());
  std::vector<float> images;
  std::vector<int32_t> labels;
  uint64_t step = 0;
  for (int epoch = 1; epoch <= epochs; ++epoch) {
    const auto start = std::chrono::steady_clock::now();
    const std::vector<uint8_t> free = curriculum_free_blocks(blocks, epoch);
    for (size_t i = 0; i < order.size(); ++i) order[i] = uint32_t(i);
    for (size_t i = order.size(); i > 1; --i) std::swap(order[i - 1], order[rng.below(i)]);
    double reward_sum = 0;
    for (size_t first = 0; first < order.size(); first += size_t(settings.batch), ++step) {
      const int n = int(std::min<size_t>(size_t(settings.batch), order.size() - first));
      gather_batch(train_data, order, first, n, images, labels);
      double sigma = 0;
      if (sigma_aware)
        sigma = settings.sigma_min + (settings.sigma_max - settings.sigma_min) * rng.uniform();
      // A fresh chip per batch: the policy must serve every chip of the σ range.
      use_chip(*backend, sigma_aware, kBlockDropTrainingFirstTrial + uint32_t(step), sigma);
      const double sigma_input = sigma / result.sigma_scale;
      const auto probs = keep_probabilities(policy.forward(images.data(), n, train_options).back(),
                                            sigma_weight, sigma_input);
      std::vector<uint8_t> sampled(probs.size());
      for (size_t at = 0; at < probs.size(); ++at)
        sampled[at] =
            !free[at % size_t(blocks)] || rng.uniform() < explore(probs[at], settings.alpha);
      const std::vector<uint8_t> greedy = thresholded_masks(probs, n, free);
      const auto sampled_pred = backbone_predictions(net, *backend, images, n, sampled);
      const auto greedy_pred = backbone_predictions(net, *backend, images, n, greedy);
      const std::vector<double> advantages = self_critical_advantages(
          sampled_pred, greedy_pred, labels, sampled, greedy, blocks, settings.reward, reward_sum);
      std::vector<float> dlogits;
      reinforce_loss_and_gradient(probs, sampled, advantages, free, settings.alpha, settings.beta,
                                  dlogits);
      FeatureMap dl(blocks, n, 1, 1);  // channel-major: (block, image)
      for (int i = 0; i < n; ++i)
        for (int k = 0; k < blocks; ++k)
          dl.data[size_t(k) * n + i] = dlogits[size_t(i) * blocks + k];
      policy.backward({dl});
      adam_step(policy.parameters(), adam, settings.lr);
      if (sigma_aware) {
        Parameter& w = sigma_parameter[0];
        std::fill(w.grad.begin(), w.grad.end(), 0.0f);
        for (size_t at = 0; at < dlogits.size(); ++at)
          w.grad[at % size_t(blocks)] += float(dlogits[at] * sigma_input);
        adam_step(sigma_parameter, sigma_adam, settings.lr);
        sigma_weight = w.value;
      }
    }
    BlockDropEpoch summary;
    summary.epoch = epoch;
    summary.free_blocks = int(std::count(free.begin(), free.end(), 1));
    summary.reward = reward_sum / double(train_data.size());
    summary.seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    test(net, *backend, test_data, free, summary.test_accuracy, summary.blocks_kept);
    result.epochs.push_back(summary);
    if (log) {
      char line[256];
      std::snprintf(line, sizeof line,
                    "epoch %d/%d: %d of %d blocks free, reward %.3f, test accuracy %.2f %% with "
                    "%.2f blocks kept%s (%.1f s)",
                    epoch, epochs, summary.free_blocks, blocks, summary.reward,
                    summary.test_accuracy, summary.blocks_kept,
                    sigma_aware ? (" at σ " + std::to_string(test_sigma).substr(0, 5)).c_str() : "",
                    summary.seconds);
      log(line);
    }
  }

  // Joint fine-tuning (BlockDrop's finetune.py): every block free, the backbone trained on the
  // sampled masks' cross-entropy while the policy goes on with REINFORCE, both rewarded by the
  // backbone being trained, in training mode for both masks as finetune.py does.
  const int joint_epochs = finetune_epochs(settings);
  if (joint_epochs > 0) {
    TrainableResNet tuned(backbone_arch);
    tuned.initialise(settings.seed);
    const std::vector<std::string> missing =
        tuned.import_tensors(read_safetensors(backbone.path).tensors);
    if (!missing.empty())
      throw UserError("backbone '" + backbone.path + "' lacks tensor '" + missing.front() +
                      "': it cannot be fine-tuned");
    for (const CimLayerSpec& layer : net.cim_layers())
      tuned.set_input_range(layer.name, layer.input_range);
    // Quantisation-aware, as `cimsweep train` trains by default (8-bit weights and inputs).
    QuantSettings quant;
    quant.enabled = true;
    const std::vector<float> exit_weights = default_exit_weights(backbone_arch.num_exits());
    const Dataset calibration_set =
        balanced_subset(train_data, std::min(kCalibrationImages, train_data.size()));
    std::vector<uint32_t> calibration_order(calibration_set.size());
    for (size_t i = 0; i < calibration_order.size(); ++i) calibration_order[i] = uint32_t(i);
    std::vector<float> calibration_images;
    gather_batch(calibration_set, calibration_order, 0, int(calibration_set.size()),
                 calibration_images, labels);
    auto calibrate = [&] {
      for (const auto& [layer, a_max] : calibrate_ranges(
               tuned, calibration_images, int(calibration_set.size()), kRangePercentile, false))
        tuned.set_input_range(layer, a_max);
    };
    const std::vector<uint8_t> free(size_t(blocks), 1);
    AdamState backbone_adam;
    for (int epoch = epochs + 1; epoch <= epochs + joint_epochs; ++epoch) {
      const auto start = std::chrono::steady_clock::now();
      calibrate();  // before every epoch, as `cimsweep train` does
      for (size_t i = 0; i < order.size(); ++i) order[i] = uint32_t(i);
      for (size_t i = order.size(); i > 1; --i) std::swap(order[i - 1], order[rng.below(i)]);
      double reward_sum = 0;
      for (size_t first = 0; first < order.size(); first += size_t(settings.batch), ++step) {
        const int n = int(std::min<size_t>(size_t(settings.batch), order.size() - first));
        gather_batch(train_data, order, first, n, images, labels);
        const auto probs =
            keep_probabilities(policy.forward(images.data(), n, train_options).back(), {}, 0.0);
        std::vector<uint8_t> sampled(probs.size());
        for (size_t at = 0; at < probs.size(); ++at)
          sampled[at] = rng.uniform() < explore(probs[at], settings.alpha);
        const std::vector<uint8_t> greedy = thresholded_masks(probs, n, free);
        auto predictions = [&](const FeatureMap& logits) {
          const std::vector<float> rows = logits_row_major(logits);
          const int classes = backbone_arch.num_classes;
          std::vector<int> predicted(static_cast<size_t>(n));
          for (int i = 0; i < n; ++i) {
            const float* row = rows.data() + size_t(i) * classes;
            predicted[size_t(i)] = int(std::max_element(row, row + classes) - row);
          }
          return predicted;
        };
        ForwardOptions backbone_options;
        backbone_options.training = true;
        backbone_options.quant = quant;
        backbone_options.update_running_stats = false;
        backbone_options.keep = greedy.data();
        const auto greedy_pred =
            predictions(tuned.forward(images.data(), n, backbone_options).back());
        // The sampled masks' forward last: backward() reads its caches.
        backbone_options.update_running_stats = true;
        backbone_options.keep = sampled.data();
        const std::vector<FeatureMap> logits = tuned.forward(images.data(), n, backbone_options);
        const auto sampled_pred = predictions(logits.back());
        std::vector<FeatureMap> dlogits(logits.size());
        double loss = 0;
        for (size_t e = 0; e < logits.size(); ++e)
          loss += exit_weights[e] * softmax_cross_entropy(logits[e], labels.data(), exit_weights[e],
                                                          dlogits[e], nullptr);
        if (!std::isfinite(loss))
          throw UserError("joint fine-tuning diverged at epoch " + std::to_string(epoch) +
                          ": lower --backbone-lr");
        const std::vector<double> advantages =
            self_critical_advantages(sampled_pred, greedy_pred, labels, sampled, greedy, blocks,
                                     settings.reward, reward_sum);
        std::vector<float> dprobs;
        // No entropy bonus: finetune.py has none.
        reinforce_loss_and_gradient(probs, sampled, advantages, free, settings.alpha, 0.0, dprobs);
        FeatureMap dl(blocks, n, 1, 1);  // channel-major: (block, image)
        for (int i = 0; i < n; ++i)
          for (int k = 0; k < blocks; ++k)
            dl.data[size_t(k) * n + i] = dprobs[size_t(i) * blocks + k];
        policy.backward({dl});
        adam_step(policy.parameters(), adam, settings.lr);
        tuned.backward(dlogits);
        adam_step(tuned.parameters(), backbone_adam, settings.backbone_lr);
      }
      calibrate();  // the test runs the evaluator on this epoch's final weights
      const ResNet tuned_net(backbone_arch, tuned.export_tensors(), tuned.input_ranges());
      const std::unique_ptr<CimBackend> tuned_chip =
          make_backend(BackendChoice{}, tuned_net.cim_layers(), CimConfig{});
      BlockDropEpoch summary;
      summary.epoch = epoch;
      summary.joint = true;
      summary.free_blocks = blocks;
      summary.reward = reward_sum / double(train_data.size());
      summary.seconds =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      test(tuned_net, *tuned_chip, test_data, free, summary.test_accuracy, summary.blocks_kept);
      result.epochs.push_back(summary);
      if (log) {
        char line[256];
        std::snprintf(line, sizeof line,
                      "joint fine-tuning epoch %d/%d: reward %.3f, test accuracy %.2f %% with "
                      "%.2f blocks kept (%.1f s)",
                      epoch - epochs, joint_epochs, summary.reward, summary.test_accuracy,
                      summary.blocks_kept, summary.seconds);
        log(line);
      }
    }
    result.backbone_arch = backbone_arch;
    result.backbone_tensors = tuned.export_tensors();
    result.backbone_input_ranges = tuned.input_ranges();
  }

  // Input ranges for running the policy on the (digital or simulated) chip: each layer's largest
  // float input over up to 512 training images (conv1 reads [0, 1] and keeps 1).
  std::map<std::string, float> largest;
  ForwardOptions observe = eval_options;
  const auto& names = policy.cim_layer_names();
  observe.observe_input = [&](int layer, const float* values, size_t count) {
    float& top = largest[names[size_t(layer)]];
    for (size_t i = 0; i < count; ++i) top = std::max(top, values[i]);
  };
  {
    const int n = int(std::min<size_t>(512, train_data.size()));
    for (size_t i = 0; i < order.size(); ++i) order[i] = uint32_t(i);
    gather_batch(train_data, order, 0, n, images, labels);
    policy.forward(images.data(), n, observe);
  }
  for (const std::string& name : names)
    policy.set_input_range(name, name == "conv1" ? 1.0f : std::max(largest[name], 1e-3f));
  result.tensors = policy.export_tensors();
  result.sigma_weight = sigma_weight;
  result.input_ranges = policy.input_ranges();

  // The epochs above thresholded the float policy; the evaluator runs the policy file quantised
  // (8-bit weights and inputs, as CimConfig's defaults), with the ranges just measured, and a
  // decision whose logit lies near 0 may go the other way. So the last epoch's figures, which the
  // files promise, are measured again as the evaluator will reproduce them.
  if (!result.epochs.empty()) {
    eval_options.quant = QuantSettings{};
    BlockDropEpoch& last = result.epochs.back();
    if (last.joint) {
      const ResNet tuned_net(backbone_arch, result.backbone_tensors, result.backbone_input_ranges);
      const std::unique_ptr<CimBackend> tuned_chip =
          make_backend(BackendChoice{}, tuned_net.cim_layers(), CimConfig{});
      test(tuned_net, *tuned_chip, test_data, std::vector<uint8_t>(size_t(blocks), 1),
           last.test_accuracy, last.blocks_kept);
    } else {
      test(net, *backend, test_data, curriculum_free_blocks(blocks, last.epoch),
           last.test_accuracy, last.blocks_kept);
    }
    if (log) {
      char line[256];
      std::snprintf(line, sizeof line,
                    "the policy as shipped (8-bit): test accuracy %.2f %% with %.2f blocks kept",
                    last.test_accuracy, last.blocks_kept);
      log(line);
    }
  }

  nlohmann::json s;
  s["policy_blocks"] = settings.policy_blocks;
  s["policy_width"] = settings.policy_width;
  s["gamma"] = settings.reward.gamma;
  s["accuracy_objective"] = settings.reward.accuracy_objective;
  s["compute_weight"] = settings.reward.compute_weight;
  s["lr"] = settings.lr;
  s["alpha"] = settings.alpha;
  s["beta"] = settings.beta;
  s["batch"] = settings.batch;
  s["epochs"] = epochs;
  s["finetune_epochs"] = joint_epochs;
  if (joint_epochs > 0) s["backbone_lr"] = settings.backbone_lr;
  s["seed"] = settings.seed;
  s["sigma_aware"] = sigma_aware;
  if (sigma_aware) {
    s["sigma_range"] = {settings.sigma_min, settings.sigma_max};
    s["cim"] = settings.cim.to_json();
  }
  nlohmann::json history = nlohmann::json::array();
  for (const BlockDropEpoch& e : result.epochs)
    history.push_back({{"epoch", e.epoch},
                       {"free_blocks", e.free_blocks},
                       {"reward", e.reward},
                       {"test_accuracy", e.test_accuracy},
                       {"blocks_kept", e.blocks_kept},
                       {"joint", e.joint}});
  result.provenance = {{"settings", s},
                       {"epochs", history},
                       {"train_data", train_data.description},
                       {"train_images", train_data.size()},
                       {"command_line", settings.command_line}};
  if (result.finetuned()) {
    result.backbone_provenance = {
        {"trained_by", "cimsweep train-blockdrop (joint fine-tuning with the policy)"},
        {"finetuned_from", backbone.path},
        {"finetuned_from_hash", backbone.content_hash},
        {"finetune_epochs", joint_epochs},
        {"optimizer", "Adam lr " + std::to_string(settings.backbone_lr) + ", no weight decay"},
        {"loss", "cross-entropy of the backbone run with the policy's sampled keep masks"},
        {"quantisation_aware", "8-bit weights (max-abs) and 8-bit inputs"},
        {"input_ranges", "99.99th percentile over " +
                             std::to_string(std::min(kCalibrationImages, train_data.size())) +
                             " class-balanced training images"},
        {"test_accuracy_with_policy", result.epochs.back().test_accuracy / 100.0},
        {"blocks_kept_with_policy", result.epochs.back().blocks_kept},
        {"train_data", train_data.description},
        {"command_line", settings.command_line}};
  }
  return result;
}

std::string finetuned_backbone_path(const std::string& policy_path) {
  const std::filesystem::path policy(policy_path);
  return (policy.parent_path() / (policy.stem().string() + "-backbone.safetensors")).string();
}

void save_blockdrop_policy(const std::string& path, const BlockDropResult& result,
                           const LoadedModel& backbone) {
  namespace fs = std::filesystem;
  std::string backbone_path = backbone.path, backbone_hash = backbone.content_hash;
  if (result.finetuned()) {
    backbone_path = finetuned_backbone_path(path);
    // The original's other metadata (class names and the like) still describes the fine-tuned
    // backbone; architecture and ranges are written anew and the provenance is its own.
    std::map<std::string, std::string> metadata;
    for (const auto& [key, value] : backbone.metadata)
      if (key != "cimsweep.arch" && key != "cimsweep.input_ranges" && key != "cimsweep.provenance")
        metadata[key] = value;
    metadata["cimsweep.provenance"] = result.backbone_provenance.dump();
    save_model(backbone_path, result.backbone_arch, result.backbone_tensors,
               result.backbone_input_ranges, metadata);
    backbone_hash = load_model(backbone_path).content_hash;
  }
  const fs::path folder = fs::absolute(fs::path(path)).parent_path();
  const std::string relative =
      fs::absolute(fs::path(backbone_path)).lexically_relative(folder).generic_string();
  const nlohmann::json blockdrop = {{"backbone", relative},
                                    {"backbone_hash", backbone_hash},
                                    {"blocks", result.policy_arch.num_classes},
                                    {"sigma_input", !result.sigma_weight.empty()},
                                    {"sigma_scale", result.sigma_scale},
                                    {"sigma_weight", result.sigma_weight}};
  save_model(path, result.policy_arch, result.tensors, result.input_ranges,
             {{"cimsweep.blockdrop", blockdrop.dump()},
              {"cimsweep.provenance", result.provenance.dump()}});
}

}  // namespace cimsweep::train
