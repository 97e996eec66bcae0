#include "host/sweep/evaluate.h"

#include <algorithm>
#include <chrono>

#include "common/errors.h"

namespace cimsweep {

void check_data_fits(const ResNetArch& arch, const Dataset& data, const std::string& model_path) {
  const std::string where = "data (" + data.description + ") and model '" + model_path + "'";
  if (data.size() == 0) throw UserError("the data set " + data.description + " holds no images");
  if (data.channels != arch.in_channels)
    throw UserError(where + " disagree: the images have " + std::to_string(data.channels) +
                    " channel(s), the model expects " + std::to_string(arch.in_channels) +
                    ": use data of the kind the model was trained on");
  if (data.height != arch.input_height || data.width != arch.input_width)
    throw UserError(where + " disagree: the images are " + std::to_string(data.height) + "×" +
                    std::to_string(data.width) + ", the model expects " +
                    std::to_string(arch.input_height) + "×" + std::to_string(arch.input_width));
  if (data.num_classes != arch.num_classes)
    throw UserError(where + " disagree: the data has " + std::to_string(data.num_classes) +
                    " classes, the model " + std::to_string(arch.num_classes) +
                    ": use the data set the model was trained on");
}

std::string configuration_hash(const LoadedModel& model, const Dataset& data,
                               const CimConfig& config) {
  nlohmann::json identity;
  identity["model"] = model.content_hash;
  identity["data"] = data.description;
  identity["images"] = data.size();
  identity["cim"] = config.to_json();
  return fnv1a_hex(identity.dump());
}

TrialRunner::TrialRunner(const LoadedModel& model, const Dataset& data, const CimConfig& config,
                         std::string model_label, const BackendChoice& backend)
    : model_(model),
      data_(data),
      config_(config),
      label_(std::move(model_label)),
      backend_choice_(backend) {
  config_.validate();
  check_data_fits(model.network->arch(), data, model.path);
  config_hash_ = configuration_hash(model, data, config_);
  backend_ = make_backend(backend, model.network->cim_layers(), config_);
  if (config_.adc == AdcMode::kCalibrated) {
    const size_t count = std::min<size_t>(data.size(), size_t(config_.batch_size));
    std::vector<float> images(count * data.image_elements());
    for (size_t i = 0; i < images.size(); ++i) images[i] = data.pixels[i] * (1.0f / 255.0f);
    calibrate_adc(*backend_, *model.network, images.data(), int(count));
  }
}

TrialRecord TrialRunner::run_trial(double sigma, int trial, const BatchCallback& on_batch) {
  if (trial < 0) throw UserError("trial numbers start at 0");
  backend_->set_all_digital(false);
  backend_->program_chip(uint32_t(trial), sigma);
  return classify_all(sigma, trial, on_batch);
}

TrialRecord TrialRunner::run_clean(const BatchCallback& on_batch) {
  backend_->program_chip(0, 0.0);
  backend_->set_all_digital(true);
  TrialRecord record = classify_all(0.0, -1, on_batch);
  backend_->set_all_digital(false);
  return record;
}

void TrialRunner::update_config_hash() {
  config_hash_ = exit_policy_ ? fnv1a_hex(base_config_hash_ + exit_policy_->identity().dump())
                              : base_config_hash_;
  if (!sweep_sigmas_.empty())
    config_hash_ = fnv1a_hex(config_hash_ + "sigmas" + nlohmann::json(sweep_sigmas_).dump());
}

void TrialRunner::set_exit_policy(std::shared_ptr<const ExitPolicy> policy) {
  if (base_config_hash_.empty()) base_config_hash_ = config_hash_;
  exit_policy_ = std::move(policy);
  update_config_hash();
}

void TrialRunner::set_sweep_sigmas(std::vector<double> sigmas) {
  if (base_config_hash_.empty()) base_config_hash_ = config_hash_;
  sweep_sigmas_ = std::move(sigmas);
  update_config_hash();
}

void TrialRunner::set_blockdrop(std::shared_ptr<const BlockDropModel> blockdrop) {
  if (!blockdrop) return;
  blockdrop_ = std::make_unique<BlockDropDecider>(std::move(blockdrop), config_, backend_choice_);
  if (base_config_hash_.empty()) base_config_hash_ = config_hash_;
  base_config_hash_ = fnv1a_hex(base_config_hash_ + blockdrop_->model().identity().dump());
  update_config_hash();
}

ExitObservations TrialRunner::observe_trial(double sigma, uint32_t trial) {
  backend_->set_all_digital(false);
  backend_->program_chip(trial, sigma);
  ExitObservations observations;
  classify_all(sigma, int(trial), {}, &observations);
  return observations;
}

TrialRecord TrialRunner::classify_all(double sigma, int trial, const BatchCallback& on_batch,
                                      ExitObservations* observations) {
  ExitObservations policy_observations;
  if (!observations && exit_policy_) observations = &policy_observations;
  const auto start = std::chrono::steady_clock::now();
  const ResNet& net = *model_.network;
  const int classes = net.arch().num_classes, exits = net.arch().num_exits();
  const size_t total = data_.size(), per_image = data_.image_elements();
  std::vector<uint64_t> exit_correct(exits, 0);
  std::vector<float> images;
  std::vector<int> predicted;  // [image][exit] of the batch
  std::string prediction_lines;
  KeepStatistics keep_statistics(blockdrop_ ? block_macs(net) : BlockMacs{});
  if (blockdrop_) blockdrop_->set_chip(uint32_t(std::max(trial, 0)), sigma, trial < 0);
  uint32_t batch_index = 0;
  for (size_t first = 0; first < total; first += size_t(config_.batch_size), ++batch_index) {
    const size_t count = std::min(total - first, size_t(config_.batch_size));
    images.resize(count * per_image);
    const uint8_t* pixels = data_.image(first);
    for (size_t i = 0; i < images.size(); ++i) images[i] = pixels[i] * (1.0f / 255.0f);
    backend_->begin_batch(batch_index);
    std::vector<uint8_t> keep;
    if (blockdrop_) {
      keep = blockdrop_->decide(images.data(), int(count), batch_index);
      keep_statistics.add(keep.data(), int(count), blockdrop_->model().blocks());
    }
    const auto logits =
        net.forward(images.data(), int(count), *backend_, keep.empty() ? nullptr : keep.data());
    if (observations) observations->add_batch(logits, classes, &data_.labels[first], count);
    predicted.assign(count * size_t(exits), 0);
    for (int e = 0; e < exits; ++e) {
      for (size_t i = 0; i < count; ++i) {
        const float* row = logits[e].data() + i * classes;
        predicted[i * exits + e] = int(std::max_element(row, row + classes) - row);
        exit_correct[e] += predicted[i * exits + e] == data_.labels[first + i];
      }
    }
    for (size_t i = 0; keep_predictions_ && i < count; ++i) {
      const size_t image = first + i;
      std::vector<int> exit_predicted;
      if (exits > 1) exit_predicted.assign(&predicted[i * exits], &predicted[(i + 1) * exits]);
      prediction_lines +=
          prediction_line(label_, sigma, trial, data_.reader_index(image),
                          data_.image_names.empty() ? std::string() : data_.image_names[image],
                          data_.labels[image], logits.back().data() + i * classes, classes,
                          exit_predicted) +
          "\n";
    }
    if (on_batch) on_batch(first + count);
  }
  TrialRecord record;
  record.model = label_;
  record.config_hash = config_hash_;
  record.sigma = sigma;
  record.trial = trial;
  record.images = total;
  record.correct = exit_correct.back();
  record.accuracy = 100.0 * double(record.correct) / double(total);
  if (exits > 1)
    for (uint64_t c : exit_correct)
      record.exit_accuracy.push_back(100.0 * double(c) / double(total));
  record.prediction_lines = std::move(prediction_lines);
  record.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  // What a figure's caption says about the run (host/cli/plot.cpp); not part of the identity.
  record.extra = {
      {"backend", backend_->name()}, {"data", data_.description}, {"cim", config_.describe()}};
  if (blockdrop_) record.extra["blockdrop"] = keep_statistics.to_json(blockdrop_->model());
  if (exit_policy_ && observations == &policy_observations)
    exit_policy_->apply(sigma, *observations, record);
  return record;
}

std::string prediction_line(const std::string& model, double sigma, int trial, size_t index,
                            const std::string& file, int label, const float* logits, int classes,
                            const std::vector<int>& exit_predicted) {
  nlohmann::ordered_json line;
  line["model"] = model;
  line["sigma"] = sigma;
  line["trial"] = trial;
  line["index"] = index;
  if (!file.empty()) line["file"] = file;
  line["label"] = label;
  line["predicted"] = int(std::max_element(logits, logits + classes) - logits);
  // A float32 widened to double is written with the digits that give that double back, so the
  // logits read back exactly.
  line["logits"] = std::vector<double>(logits, logits + classes);
  if (!exit_predicted.empty()) line["exit_predicted"] = exit_predicted;
  return line.dump();
}

}  // namespace cimsweep
