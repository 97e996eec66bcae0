// Exit policies for multi-exit ResNets (BranchyNet-style heads after stages 1 and 2): which exit
// answers each image, what that costs in MACs, and how the calibrated policies learn their choice
// on calibration chips and calibration images that are held apart from the evaluation ones.
//
// Exits are numbered 1 … E as users see them (1 = after stage 1 where the model has that head,
// E = the final head); the functions below take and return 0-based exit indices.
#pragma once
#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "host/io/dataset.h"
#include "host/results/results.h"
#include "networks/resnet.h"

namespace cimsweep {

// Softmax statistics of one exit's logits for one image: everything a policy decides on.
struct ExitStats {
  int predicted = 0;    // argmax of the logits, the first on ties (as the per-exit accuracy)
  double entropy = 0;   // −Σ p ln p in nats, 0 … ln(classes)
  double max_prob = 0;  // the largest softmax probability
  double margin = 0;    // largest minus second-largest probability
};

// Numerically stable softmax statistics of `classes` logits.
ExitStats exit_stats(const float* logits, int classes);

// Every exit's statistics for every image of one chip, and the images' labels.
struct ExitObservations {
  int exits = 0;
  std::vector<ExitStats> stats;  // image-major: stats[image · exits + exit]
  std::vector<int32_t> labels;

  size_t images() const { return labels.size(); }
  const ExitStats* image(size_t i) const { return stats.data() + i * size_t(exits); }
  bool correct(size_t i, int exit) const { return image(i)[exit].predicted == labels[i]; }
  // Appends a batch of forward() output: logits[exit][image · classes + class].
  void add_batch(const std::vector<std::vector<float>>& logits, int classes,
                 const int32_t* batch_labels, size_t count);
};

// Multiply-accumulates of the CIM layers per image, split by exit (batch norm, ReLU, pooling and
// additions are not counted: they are not CIM work).
struct ExitMacs {
  std::vector<int64_t> backbone;  // per exit: stem + every residual block before its head
  std::vector<int64_t> head;      // per exit: its own head (exit conv + FC, or the final FC)

  int exits() const { return int(head.size()); }
  // An image that only runs exit e's head (fixed and best-static policies).
  int64_t alone(int exit) const { return backbone[size_t(exit)] + head[size_t(exit)]; }
  // An image that left at exit e after the heads of every earlier exit were evaluated to decide
  // (entropy and sigma-aware thresholds).
  int64_t cascade(int exit) const;
  // The whole network with every head (the learned picker needs every exit's statistics).
  int64_t all() const { return cascade(exits() - 1); }
};
ExitMacs exit_macs(const ResNet& net);

enum class ExitPolicyKind { kFixed, kEntropy, kBestStatic, kSigmaAware, kSigmaAwareLearned };

struct ExitPolicySpec {
  ExitPolicyKind kind = ExitPolicyKind::kFixed;
  int fixed_exit = 0;              // kFixed: 1-based exit
  std::vector<double> thresholds;  // kEntropy: one per early exit (exits 1 … E−1)
  bool needs_calibration() const {
    return kind == ExitPolicyKind::kBestStatic || kind == ExitPolicyKind::kSigmaAware ||
           kind == ExitPolicyKind::kSigmaAwareLearned;
  }
  std::string text() const;  // canonical form of the --exit-policy value
};

// Parses "fixed:E", "entropy:T1,T2,…", "best-static", "sigma-aware", "sigma-aware-learned".
ExitPolicySpec parse_exit_policy(const std::string& text);
// UserError unless the policy can drive a model with `exits` exits.
void check_policy_fits(const ExitPolicySpec& spec, int exits, const std::string& model_path);

// The command-line options of exit policies (eval and sweep).
struct ExitPolicyOptions {
  std::string policy;             // --exit-policy; empty: none
  size_t calibration_images = 0;  // --calibration N: images held apart for calibration
  int calibration_trials = 3;     // --calibration-trials K: calibration chips per σ
  double mac_budget = 0;          // --mac-budget M: mean MACs/image at most M; 0: no budget
  int entropy_grid = 0;           // --entropy-grid G: G+1 shared thresholds 0 … ln(classes)
  bool any() const { return !policy.empty() || entropy_grid > 0; }
  // UserError on a bad policy, calibration or budget setting (before any data is read).
  void validate() const;
};

// Calibration chips are the trials kCalibrationFirstTrial … +K−1 of the sweep seed, so that no
// evaluation chip (trials below it) is ever used to calibrate.
constexpr uint32_t kCalibrationFirstTrial = 1u << 30;

struct CalibrationSplit;
CalibrationSplit split_for_calibration(const Dataset& data, size_t count, uint64_t seed);

// Images that only the calibrator sees. Only split_for_calibration makes them, from images it
// removes from the evaluation set, so calibration and evaluation images are disjoint by
// construction.
class CalibrationImages {
 public:
  const Dataset& data() const { return data_; }
  // Positions of these images in the data set that was split.
  const std::vector<size_t>& source_indices() const { return source_indices_; }

 private:
  CalibrationImages() = default;
  friend CalibrationSplit split_for_calibration(const Dataset&, size_t, uint64_t);
  Dataset data_;
  std::vector<size_t> source_indices_;
};

struct CalibrationSplit {
  CalibrationImages calibration;
  Dataset evaluation;                      // every other image, in the original order
  std::vector<size_t> evaluation_indices;  // their positions in the data set that was split
};

// Holds `count` class-balanced images apart for calibration, chosen by a permutation of each
// class seeded with `seed` (every class gives floor or ceil of count / classes where it can).
// UserError unless 0 < count < data.size().
CalibrationSplit split_for_calibration(const Dataset& data, size_t count, uint64_t seed);

// Runs one calibration chip (σ, trial) over the calibration images.
using ChipObserver =
    std::function<ExitObservations(const CalibrationImages& images, double sigma, uint32_t trial)>;

// The exit, 0-based, that the entropy rule picks: the first early exit whose entropy is strictly
// below its threshold, else the last exit. thresholds: one per early exit.
int entropy_exit(const ExitStats* per_exit, int exits, const std::vector<double>& thresholds);

// What a policy did over a set of images.
struct ExitOutcome {
  uint64_t images = 0, correct = 0;
  std::vector<uint64_t> exit_counts;  // images answered by each exit
  double macs_per_image = 0;
};

// The exit of best mean accuracy over the calibration chips among those whose cost (alone) fits
// the budget (0: none); the earlier exit on ties. UserError when no exit fits.
int best_static_exit(const std::vector<ExitObservations>& chips, const ExitMacs& macs,
                     double mac_budget);

// Entropy thresholds (one per early exit) of best mean accuracy over the calibration chips, with
// mean MACs/image (cascade costs) at most the budget (0: none); among equally accurate ones the
// cheapest (then the first found). Candidates per exit: 0 (never leave there), the midpoints
// between neighbouring observed entropies (all of them when there are at most 65 distinct values,
// else at 64 evenly spaced quantiles), and just above the largest (always leave); exhaustive over
// the exits' combinations. UserError when no candidate fits the budget.
std::vector<double> search_thresholds(const std::vector<ExitObservations>& chips,
                                      const ExitMacs& macs, double mac_budget);

// The learned picker: a small MLP (softmax statistics of every exit + σ → exit), trained on
// calibration chips at every σ of the sweep to maximise the probability of picking a correct exit.
class ExitPicker {
 public:
  struct Sample {
    double sigma;
    const ExitObservations* chip;
  };
  // Deterministic for a seed. Needs at least one image.
  static ExitPicker train(const std::vector<Sample>& chips, int classes, uint64_t seed);
  int choose(double sigma, const ExitStats* per_exit) const;
  nlohmann::json to_json() const;
  int parameter_count() const { return int(w1_.size() + b1_.size() + w2_.size() + b2_.size()); }

 private:
  std::vector<double> features(double sigma, const ExitStats* per_exit) const;
  void hidden_and_output(const std::vector<double>& x, std::vector<double>& h,
                         std::vector<double>& out) const;
  int exits_ = 0, inputs_ = 0, hidden_ = 0;
  double log_classes_ = 1;
  std::vector<double> mean_, scale_;  // input standardisation from the training data
  std::vector<double> w1_, b1_, w2_, b2_;
};

// A policy bound to one model, its σ values and its calibration: what TrialRunner consults.
class ExitPolicy {
 public:
  // sigmas: every σ a trial may be run at (the clean reference is σ = 0). UserError when the
  // options do not fit the model.
  ExitPolicy(const ExitPolicyOptions& options, const ResNet& net, const std::string& model_path,
             std::vector<double> sigmas, uint64_t seed);

  // Everything that decides the policy's choices (not the calibrated values themselves, which
  // follow from it): the configuration hash includes it, so --resume never mixes policies.
  nlohmann::json identity() const;
  bool needs_calibration() const { return spec_ && spec_->needs_calibration(); }
  // Runs calibration chips kCalibrationFirstTrial … over the calibration images at each σ.
  void calibrate(const CalibrationImages& images, const ChipObserver& observe);

  // The exit (0-based) chosen for one image on a chip at `sigma`.
  int choose(double sigma, const ExitStats* per_exit) const;
  ExitOutcome evaluate(double sigma, const ExitObservations& chip) const;
  // Sets the record's accuracy to the policy's and adds extra["exit_policy"] (policy, exit
  // counts, MACs/image, calibrated choice) and extra["entropy_grid"] when asked for.
  void apply(double sigma, const ExitObservations& chip, TrialRecord& record) const;

  const ExitMacs& macs() const { return macs_; }

 private:
  int64_t cost(int exit) const;
  const std::vector<double>& thresholds_at(double sigma) const;

  ExitPolicyOptions options_;
  std::unique_ptr<ExitPolicySpec> spec_;  // null: only the entropy grid
  ExitMacs macs_;
  int classes_ = 0;
  std::vector<double> sigmas_;
  uint64_t seed_ = 0;
  bool calibrated_ = false;
  std::map<double, int> static_exit_;                 // best-static, per σ
  std::map<double, std::vector<double>> thresholds_;  // sigma-aware, per σ
  std::unique_ptr<ExitPicker> picker_;                // sigma-aware-learned
};

// The accuracy–compute frontier of the entropy grid in the records (those with
// extra["entropy_grid"]): per model and σ, the Pareto-optimal shared thresholds with mean
// accuracy and mean MACs/image over the trials. Empty text when no record has a grid.
std::string format_frontier(const std::vector<TrialRecord>& records, const std::string& format);

// The table text with the frontier added: md and csv after a blank line; json as
// {"table": [...], "frontier": [...]}. Unchanged when there is no frontier.
std::string add_frontier(const std::string& table, const std::vector<TrialRecord>& records,
                         const std::string& format);

}  // namespace cimsweep
