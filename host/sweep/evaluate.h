// Runs Monte-Carlo trials of one model on one data set: each trial programs a fresh simulated chip
// (seed, trial) and classifies every image in batches.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "host/policies/blockdrop_eval.h"
#include "common/cim_config.h"
#include "host/backends.h"
#include "host/io/dataset.h"
#include "host/policies/exit_policy.h"
#include "host/io/model_file.h"
#include "host/results/results.h"

namespace cimsweep {

// Throws UserError when the data cannot feed the model (channels, size, classes).
void check_data_fits(const ResNetArch& arch, const Dataset& data, const std::string& model_path);

class TrialRunner {
 public:
  // Called after every batch with the images done so far in this trial.
  using BatchCallback = std::function<void(size_t images_done)>;

  TrialRunner(const LoadedModel& model, const Dataset& data, const CimConfig& config,
              std::string model_label, const BackendChoice& backend = {});

  // One chip at `sigma`: trial index `trial` keys its noise.
  TrialRecord run_trial(double sigma, int trial, const BatchCallback& on_batch = {});
  // The clean reference: σ = 0 with an ideal ADC, computed as the exactly equal digital network.
  TrialRecord run_clean(const BatchCallback& on_batch = {});

  const std::string& config_hash() const { return config_hash_; }

  // From now on every trial's accuracy is the exit policy's (and its record says which exits
  // answered); the configuration hash then includes the policy's identity. Null: the final exit.
  void set_exit_policy(std::shared_ptr<const ExitPolicy> policy);
  // From now on the backbone runs with the keep masks that this BlockDrop policy chooses per image
  // (records gain extra["blockdrop"]); the configuration hash then includes the policy's identity.
  void set_blockdrop(std::shared_ptr<const BlockDropModel> blockdrop);
  // Every σ of the sweep this runner belongs to joins the configuration hash, so that trials of
  // a sweep with other σ values (whose shards hold other units) are never resumed or merged in.
  void set_sweep_sigmas(std::vector<double> sigmas);
  // From now on every record carries one JSON line per image in prediction_lines (the format of
  // `eval --predictions`, prediction_line below).
  void set_keep_predictions(bool keep) { keep_predictions_ = keep; }
  // Every exit's softmax statistics of every image on chip (sigma, trial): calibration chips.
  ExitObservations observe_trial(double sigma, uint32_t trial);

 private:
  // observations: where to put every exit's statistics (observe_trial), else the policy's own.
  TrialRecord classify_all(double sigma, int trial, const BatchCallback& on_batch,
                           ExitObservations* observations = nullptr);

  const LoadedModel& model_;
  const Dataset& data_;
  CimConfig config_;
  std::string label_;
  std::string config_hash_;
  std::unique_ptr<CimBackend> backend_;
  std::shared_ptr<const ExitPolicy> exit_policy_;
  void update_config_hash();
  std::string base_config_hash_;  // without the exit policy and the sweep's σ values
  std::vector<double> sweep_sigmas_;
  BackendChoice backend_choice_;
  std::unique_ptr<BlockDropDecider> blockdrop_;
  bool keep_predictions_ = false;
};

// One image of one run as `eval --predictions` writes it: {"model", "sigma", "trial" (−1: the
// clean reference), "index" (in the reader's order of the whole data set), "file" (image folders:
// "<class>/<file>"), "label", "predicted", "logits" (the final exit's, float32 written exactly)},
// plus "exit_predicted" (every exit's class, final last) for multi-exit models. No newline.
std::string prediction_line(const std::string& model, double sigma, int trial, size_t index,
                            const std::string& file, int label, const float* logits, int classes,
                            const std::vector<int>& exit_predicted);

// The identity of (model file, data, CIM configuration): every trial record carries it, and
// --resume only reuses records whose hash matches.
std::string configuration_hash(const LoadedModel& model, const Dataset& data,
                               const CimConfig& config);

}  // namespace cimsweep
