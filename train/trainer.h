// The training run: data augmentation, per-epoch shuffling, quantisation-aware SGD, input-range
// calibration, per-epoch test accuracy, atomic checkpoints with bit-exact resume, and the final
// model file with its provenance. Everything random comes from one std::mt19937_64 seeded by
// --seed (saved in checkpoints) or from Philox streams counted by the step, so that a run is a
// pure function of its settings and data, whatever the thread count.
#pragma once
#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/cim_config.h"
#include "host/io/dataset.h"
#include "common/tensor.h"
#include "networks/resnet.h"
#include "train/network.h"
#include "train/optimizer.h"

namespace cimsweep::train {

// How every CIM layer's input range a_max is found.
//  - calibrate (default): before every epoch, and once more after the last, a_max of each layer is
//    the `range_percentile` percentile (numpy's linear interpolation) of the layer's float inputs
//    over `calibration_images` class-balanced training images, network in evaluation mode,
//    without augmentation (as tools/train_reference.py calibrates). Within an epoch it is fixed.
//  - pact: calibrated once before the first step, then learned by SGD with PACT's gradient
//    (Σ dy over the inputs clipped at a_max) and weight decay; the final ranges are the learned
//    ones.
// conv1 reads pixels in [0, 1] and keeps a_max = 1 in both modes.
enum class RangeMode { kCalibrate, kPact };

struct TrainSettings {
  // Architecture (input size, channels and classes come from the data).
  int depth = 20, kernel = 3, width = 16;
  char shortcut = 'A';
  std::string shortcut_padding = "split";
  std::vector<int> exits;
  ExitHeadSpec exit_head;

  // Optimisation.
  int epochs = 30;
  int batch = 128;
  double lr = 0.1;
  double momentum = 0.9;
  double weight_decay = 5e-4;
  bool nesterov = false;
  Schedule schedule = Schedule::kCosine;
  std::vector<int> milestones;  // step schedule; empty: 50 % and 75 % of the epochs
  double gamma = 0.1;
  int warmup_epochs = 0;
  uint64_t seed = 1;

  // Augmentation: random crop after zero padding (-1: height/8 pixels, 4 for 32×32, 3 for
  // 28×28), and a random horizontal flip ("auto": on for 3-channel images, off for 1-channel
  // ones, where digits and clothes have a handedness).
  int crop_padding = -1;
  std::string flip = "auto";

  // Quantisation-aware training (cim-model.md §1, §3).
  bool quantise = true;
  int weight_bits = 8, input_bits = 8;
  WeightScaling scaling = WeightScaling::kMaxAbs;
  RangeMode ranges = RangeMode::kCalibrate;
  double range_percentile = 99.99;
  int calibration_images = 2000;
  float train_sigma = 0;  // noise-aware training: weights × (1 + σz), fresh per batch
  // The training steps' convolutions (bf16 only where the CPU has AVX-512 BF16); evaluation,
  // calibration and the reported accuracies are fp32 whatever this is.
  ConvPrecision precision = ConvPrecision::kFp32;

  // Multi-exit: loss Σ w_e·CE_e over the exits (early ones first, the final head last); empty:
  // the default, linear from 1 at the shallowest exit to 0.5 at the final head.
  std::vector<float> exit_weights;
  std::string init_path;  // start from this model file's tensors (e.g. a trained backbone)
  bool freeze_backbone = false;

  // Run control; none of these changes the weights.
  std::string checkpoint_dir;
  bool resume = false;
  int stop_after_epoch = 0;  // > 0: stop after that epoch (checkpoint written), resume later
  bool quiet = false;        // no progress line (it is never shown when stderr is not a terminal)
  std::string command_line;  // recorded in the model's provenance
};

// The default exit weights for `exits` heads (see TrainSettings::exit_weights).
std::vector<float> default_exit_weights(int heads);

// UserError naming the first impossible setting and what to do.
void validate_settings(const TrainSettings& settings);
// The architecture trained on `data` (input size, channels and classes from the data).
ResNetArch make_arch(const TrainSettings& settings, const Dataset& data);

struct EpochSummary {
  int epoch = 0;
  double loss = 0;            // mean joint loss over the epoch's batches (augmented data)
  double train_accuracy = 0;  // %, final head, augmented data, training-mode network
  double test_accuracy = 0;   // %, final head, quantised network (σ = 0) when QAT is on
  std::vector<double> exit_test_accuracy;  // % per exit (multi-exit models)
  double learning_rate = 0;                // at the epoch's last step
  double seconds = 0;                      // training time of the epoch (not the evaluation)
  double images_per_second = 0;
};

struct TrainResult {
  std::vector<EpochSummary> epochs;    // including those of a resumed run's earlier part
  bool stopped_early = false;          // stop_after_epoch reached: no model written
  double float_test_accuracy = 0;      // %, final head
  double quantised_test_accuracy = 0;  // %, final head, σ = 0 digital CIM network (evaluator)
  std::vector<double> exit_float_test_accuracy, exit_quantised_test_accuracy;
  std::map<std::string, Tensor> tensors;  // the trained model
  std::map<std::string, float> input_ranges;
  ResNetArch arch;
  nlohmann::json provenance;
};

// Trains on `train_data`, evaluating on `test_data` after every epoch. Writes checkpoints when
// settings.checkpoint_dir is set. `log` receives the one-line messages (epoch summaries).
TrainResult train_network(const TrainSettings& settings, const Dataset& train_data,
                          const Dataset& test_data,
                          const std::function<void(const std::string&)>& log = {});

// Writes the trained model (float32 safetensors with arch, input ranges, class names and
// provenance metadata) atomically.
void save_trained_model(const std::string& path, const TrainResult& result,
                        const std::vector<std::string>& class_names);

// Top-1 accuracy (%) of every exit of `net` on `data` (evaluation mode, pixels/255).
std::vector<double> evaluate_accuracy(TrainableResNet& net, const Dataset& data,
                                      const QuantSettings& quant);

// Input ranges a_max: the `percentile` of every CIM layer's float input over `count` images
// (linear interpolation, as numpy's), conv1 = 1.0 (pixels in [0, 1]). The network runs in
// evaluation mode, or with batch statistics (running statistics left alone) when those are still
// at their initial values.
std::map<std::string, float> calibrate_ranges(TrainableResNet& net,
                                              const std::vector<float>& images, int count,
                                              double percentile, bool batch_statistics);

}  // namespace cimsweep::train
