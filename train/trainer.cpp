#include "train/trainer.h"

#include <omp.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <ctime>
#include <filesystem>
#include <random>
#include <sstream>

#include "host/cpu/cim_cpu.h"
#include "common/errors.h"
#include "host/io/model_file.h"
#include "host/progress.h"
#include "host/io/safetensors.h"

namespace cimsweep::train {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

constexpr const char* kCheckpointFile = "checkpoint.safetensors";
constexpr const char* kCheckpointKey = "cimsweep.checkpoint";
constexpr const char* kMomentumPrefix = "momentum.";
constexpr int kEvaluationBatch = 250;
// PACT: the smallest a_max a step may leave; below it nearly every input would be clipped.
constexpr float kMinimumRange = 1e-2f;

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

std::string format(const char* fmt, double value) {
  char buf[64];
  std::snprintf(buf, sizeof buf, fmt, value);
  return buf;
}

// The training-data stream (shuffles, crops, flips), separate from the initialisation stream.
std::mt19937_64 data_rng(uint64_t seed) {
  std::seed_seq seq{uint32_t(seed), uint32_t(seed >> 32), 0x64617461u};
  return std::mt19937_64(seq);
}

// ---------------------------------------------------------------------------------------------
// Progress line: a terminal's stderr only, redrawn at most four times a second.

class TrainProgress {
 public:
  TrainProgress(bool enabled, int epochs, size_t images_per_epoch)
      : visible_(enabled && isatty(STDERR_FILENO)),
        epochs_(epochs),
        images_per_epoch_(images_per_epoch) {}
  ~TrainProgress() { clear(); }

  void start_epoch(int epoch) {
    epoch_ = epoch;
    epoch_start_ = Clock::now();
    images_ = 0;
    draw(true);
  }
  void update(size_t images, double loss) {
    images_ = images;
    loss_ = loss;
    draw(false);
  }
  void clear() {
    if (visible_ && drawn_) std::fprintf(stderr, "\r\033[K");
    drawn_ = false;
  }

 private:
  void draw(bool force) {
    if (!visible_) return;
    const auto now = Clock::now();
    if (!force && now - last_draw_ < std::chrono::milliseconds(250)) return;
    last_draw_ = now;
    const double elapsed = seconds_since(epoch_start_);
    const double rate = elapsed > 0 ? double(images_) / elapsed : 0.0;
    const double left_in_epoch = double(images_per_epoch_ - images_);
    const double eta =
        rate > 0 ? (left_in_epoch + double(epochs_ - epoch_) * images_per_epoch_) / rate : -1;
    std::fprintf(stderr, "\r\033[Kepoch %d/%d  %zu/%zu images  %.0f images/s  loss %.4f  ETA %s",
                 epoch_, epochs_, images_, images_per_epoch_, rate, loss_,
                 format_duration(eta).c_str());
    std::fflush(stderr);
    drawn_ = true;
  }

  bool visible_, drawn_ = false;
  int epochs_, epoch_ = 0;
  size_t images_per_epoch_, images_ = 0;
  double loss_ = 0;
  Clock::time_point epoch_start_, last_draw_;
};

// ---------------------------------------------------------------------------------------------
// Data.

void check_dataset(const Dataset& data, const char* which) {
  if (data.size() == 0)
    throw UserError(std::string("the ") + which + " data (" + data.description +
                    ") holds no images: pass --data with a data set that has a " + which +
                    " split");
  for (int32_t label : data.labels)
    if (label < 0 || label >= data.num_classes)
      throw UserError("the " + std::string(which) + " data (" + data.description + ") has label " +
                      std::to_string(label) + " outside 0.." +
                      std::to_string(data.num_classes - 1) + ": check the data files");
}

std::vector<float> to_float_images(const Dataset& data) {
  std::vector<float> images(data.pixels.size());
  for (size_t i = 0; i < images.size(); ++i) images[i] = data.pixels[i] * (1.0f / 255.0f);
  return images;
}

struct Augmentation {
  int top = 0, left = 0;
  bool flip = false;
};

// Fills `images` with the batch order[first … first+count−1], cropped after zero padding by
// `pad` pixels at (top, left) and flipped as drawn; pixels/255.
void build_batch(const Dataset& data, const std::vector<uint32_t>& order, size_t first, int count,
                 const std::vector<Augmentation>& augmentation, int pad, std::vector<float>& images,
                 std::vector<int32_t>& labels) {
  const int c = data.channels, h = data.height, w = data.width;
  const size_t per_image = data.image_elements();
  images.resize(size_t(count) * per_image);
  labels.resize(size_t(count));
#pragma omp parallel for schedule(static) if (count * per_image >= (1 << 16))
  for (int i = 0; i < count; ++i) {
    const uint32_t index = order[first + size_t(i)];
    labels[size_t(i)] = data.labels[index];
    const uint8_t* src = data.image(index);
    float* dst = images.data() + size_t(i) * per_image;
    const Augmentation& a = augmentation[size_t(i)];
    for (int ch = 0; ch < c; ++ch)
      for (int y = 0; y < h; ++y) {
        const int sy = y + a.top - pad;
        for (int x = 0; x < w; ++x) {
          const int sx = (a.flip ? w - 1 - x : x) + a.left - pad;
          const bool inside = sy >= 0 && sy < h && sx >= 0 && sx < w;
          dst[(size_t(ch) * h + y) * w + x] =
              inside ? src[(size_t(ch) * h + sy) * w + sx] * (1.0f / 255.0f) : 0.0f;
        }
      }
  }
}

// ---------------------------------------------------------------------------------------------
// Input-range calibration.

}  // namespace

// Keeps only each layer's largest values: the percentile of N values depends on the top
// N − floor(q·(N − 1)) of them alone.
std::map<std::string, float> calibrate_ranges(TrainableResNet& net,
                                              const std::vector<float>& images, int count,
                                              double percentile, bool batch_statistics) {
  const std::vector<std::string>& names = net.cim_layer_names();
  const size_t layers = names.size();
  const double q = percentile / 100.0;
  const size_t per_image =
      net.arch().in_channels * size_t(net.arch().input_height) * size_t(net.arch().input_width);
  std::vector<std::vector<float>> top(layers);
  std::vector<size_t> keep(layers, 0), total(layers, 0);
  std::vector<float> floor_value(layers, -INFINITY);
  int batch_images = 0;
  ForwardOptions options;
  options.quant.enabled = false;
  options.training = batch_statistics;
  options.update_running_stats = false;
  options.observe_input = [&](int layer, const float* values, size_t n) {
    const size_t l = size_t(layer);
    if (keep[l] == 0) {
      total[l] = n / size_t(batch_images) * size_t(count);
      keep[l] = std::max<size_t>(1, total[l] - size_t(std::floor(q * double(total[l] - 1))));
    }
    std::vector<float>& t = top[l];
    for (size_t i = 0; i < n; ++i)
      if (values[i] >= floor_value[l]) t.push_back(values[i]);
    if (t.size() > 2 * keep[l] + 4096) {
      std::nth_element(t.begin(), t.begin() + std::ptrdiff_t(keep[l] - 1), t.end(),
                       std::greater<float>());
      t.resize(keep[l]);
      floor_value[l] = *std::min_element(t.begin(), t.end());
    }
  };
  for (int first = 0; first < count; first += kEvaluationBatch) {
    batch_images = std::min(kEvaluationBatch, count - first);
    net.forward(images.data() + size_t(first) * per_image, batch_images, options);
  }
  std::map<std::string, float> ranges;
  for (size_t l = 0; l < layers; ++l) {
    if (names[l] == "conv1") {
      ranges[names[l]] = 1.0f;  // pixels in [0, 1] (cim-model.md §3)
      continue;
    }
    std::vector<float>& t = top[l];
    std::sort(t.begin(), t.end(), std::greater<float>());
    const size_t n = total[l];
    const double position = q * double(n - 1);
    const size_t rank = size_t(std::floor(position));  // ascending rank
    const double fraction = position - double(rank);
    auto ascending = [&](size_t r) { return double(t[std::min(t.size() - 1, n - 1 - r)]); };
    double value = ascending(rank);
    if (rank + 1 < n) value += fraction * (ascending(rank + 1) - value);
    // A layer whose inputs are (almost) all zero still needs a positive range.
    if (!(value > 0)) value = t.empty() ? 0.0 : double(t.front());
    if (!(value > 0)) value = 1.0;
    ranges[names[l]] = float(value);
  }
  return ranges;
}

namespace {

// ---------------------------------------------------------------------------------------------
// Settings as JSON: the identity of a run (checkpoints must match it) and its provenance.

nlohmann::json settings_identity(const TrainSettings& s, const Dataset& train,
                                 const Dataset& test) {
  nlohmann::json j;
  j["depth"] = s.depth;
  j["kernel"] = s.kernel;
  j["width"] = s.width;
  j["shortcut"] = std::string(1, s.shortcut);
  j["shortcut_padding"] = s.shortcut_padding;
  j["exits"] = s.exits;
  j["exit_head"] = {{"type", s.exit_head.type},
                    {"kernel", s.exit_head.kernel},
                    {"stride", s.exit_head.stride},
                    {"channels", s.exit_head.channels}};
  j["epochs"] = s.epochs;
  j["batch"] = s.batch;
  j["lr"] = s.lr;
  j["momentum"] = s.momentum;
  j["weight_decay"] = s.weight_decay;
  j["nesterov"] = s.nesterov;
  j["schedule"] = to_string(s.schedule);
  j["milestones"] = s.milestones;
  j["gamma"] = s.gamma;
  j["warmup_epochs"] = s.warmup_epochs;
  j["seed"] = s.seed;
  j["crop_padding"] = s.crop_padding;
  j["flip"] = s.flip;
  j["quantise"] = s.quantise;
  j["weight_bits"] = s.weight_bits;
  j["input_bits"] = s.input_bits;
  j["weight_scaling"] = to_string(s.scaling);
  j["ranges"] = s.ranges == RangeMode::kPact ? "pact" : "calibrate";
  j["range_percentile"] = s.range_percentile;
  j["calibration_images"] = s.calibration_images;
  j["train_sigma"] = s.train_sigma;
  // Only when not the default, so that checkpoints written before --precision existed resume.
  if (s.precision == ConvPrecision::kBf16) j["precision"] = "bf16";
  j["exit_weights"] = s.exit_weights;
  j["init"] = s.init_path;
  j["freeze_backbone"] = s.freeze_backbone;
  j["train_data"] = {{"description", train.description}, {"images", train.size()}};
  j["test_data"] = {{"description", test.description}, {"images", test.size()}};
  return j;
}

// ---------------------------------------------------------------------------------------------
// Checkpoints.

struct RunState {
  int epochs_done = 0;
  int64_t step = 0;
  std::string rng;  // std::mt19937_64's text form
  std::vector<EpochSummary> history;
};

nlohmann::json summary_to_json(const EpochSummary& e) {
  return {{"epoch", e.epoch},
          {"loss", e.loss},
          {"train_accuracy", e.train_accuracy},
          {"test_accuracy", e.test_accuracy},
          {"exit_test_accuracy", e.exit_test_accuracy},
          {"learning_rate", e.learning_rate},
          {"seconds", e.seconds},
          {"images_per_second", e.images_per_second}};
}

EpochSummary summary_from_json(const nlohmann::json& j) {
  EpochSummary e;
  e.epoch = j.at("epoch").get<int>();
  e.loss = j.at("loss").get<double>();
  e.train_accuracy = j.at("train_accuracy").get<double>();
  e.test_accuracy = j.at("test_accuracy").get<double>();
  e.exit_test_accuracy = j.at("exit_test_accuracy").get<std::vector<double>>();
  e.learning_rate = j.at("learning_rate").get<double>();
  e.seconds = j.at("seconds").get<double>();
  e.images_per_second = j.at("images_per_second").get<double>();
  return e;
}

void save_checkpoint(const std::string& dir, TrainableResNet& net, const RunState& state,
                     const nlohmann::json& identity) {
  std::map<std::string, Tensor> tensors = net.export_tensors();
  for (const Parameter& p : net.parameters()) {
    Tensor momentum(p.shape);
    momentum.data = p.momentum;
    tensors[kMomentumPrefix + p.name] = std::move(momentum);
  }
  nlohmann::json history = nlohmann::json::array();
  for (const EpochSummary& e : state.history) history.push_back(summary_to_json(e));
  const nlohmann::json checkpoint{{"epochs_done", state.epochs_done},
                                  {"step", state.step},
                                  {"rng", state.rng},
                                  {"settings", identity},
                                  {"history", history}};
  // save_model writes a temporary file and renames it: a kill leaves the previous checkpoint.
  save_model((fs::path(dir) / kCheckpointFile).string(), net.arch(), tensors, net.input_ranges(),
             {{kCheckpointKey, checkpoint.dump()}});
}

// The first setting whose value differs, as "name (checkpoint: A, now: B)".
std::string first_difference(const nlohmann::json& saved, const nlohmann::json& now) {
  for (const auto& [key, value] : now.items()) {
    if (!saved.contains(key)) return key + " (not in the checkpoint)";
    if (saved.at(key) != value)
      return key + " (checkpoint: " + saved.at(key).dump() + ", now: " + value.dump() + ")";
  }
  return "unknown";
}

bool load_checkpoint(const std::string& dir, TrainableResNet& net, RunState& state,
                     const nlohmann::json& identity) {
  const fs::path path = fs::path(dir) / kCheckpointFile;
  if (!fs::exists(path)) return false;
  SafetensorsFile file = read_safetensors(path.string());
  const std::string where = "checkpoint '" + path.string() + "'";
  auto meta = file.metadata.find(kCheckpointKey);
  if (meta == file.metadata.end())
    throw UserError(where +
                    " has no training state: it is not a cimsweep train checkpoint; "
                    "use another --checkpoint-dir");
  nlohmann::json checkpoint, ranges;
  try {
    checkpoint = nlohmann::json::parse(meta->second);
    ranges = nlohmann::json::parse(file.metadata.at("cimsweep.input_ranges"));
    if (checkpoint.at("settings") != identity)
      throw UserError(where + " belongs to a different training run: " +
                      first_difference(checkpoint.at("settings"), identity) +
                      "; rerun with the same options and data, or use a fresh --checkpoint-dir");
    state.epochs_done = checkpoint.at("epochs_done").get<int>();
    state.step = checkpoint.at("step").get<int64_t>();
    state.rng = checkpoint.at("rng").get<std::string>();
    state.history.clear();
    for (const auto& e : checkpoint.at("history")) state.history.push_back(summary_from_json(e));
    for (const auto& [name, value] : ranges.items()) net.set_input_range(name, value.get<float>());
  } catch (const nlohmann::json::exception& e) {
    throw UserError(where + " is damaged (" + e.what() + "): delete it to start afresh");
  } catch (const std::out_of_range& e) {
    throw UserError(where + " is damaged (" + e.what() + "): delete it to start afresh");
  }
  const std::vector<std::string> missing = net.import_tensors(file.tensors);
  if (!missing.empty())
    throw UserError(where + " lacks tensor '" + missing.front() + "': delete it to start afresh");
  for (Parameter& p : net.parameters()) {
    auto it = file.tensors.find(kMomentumPrefix + p.name);
    if (it == file.tensors.end() || it->second.data.size() != p.momentum.size())
      throw UserError(where + " lacks the momentum of '" + p.name + "': delete it to start afresh");
    p.momentum = it->second.data;
  }
  return true;
}

// ---------------------------------------------------------------------------------------------
// --init: tensors of another model file (e.g. a trained backbone for new exit heads).

void initialise_from(TrainableResNet& net, const TrainSettings& s) {
  SafetensorsFile file = read_safetensors(s.init_path);
  const std::string where = "--init model '" + s.init_path + "'";
  auto arch_it = file.metadata.find("cimsweep.arch");
  if (arch_it != file.metadata.end()) {
    ResNetArch theirs;
    try {
      theirs = ResNetArch::from_json(nlohmann::json::parse(arch_it->second));
    } catch (const nlohmann::json::exception&) {
      throw UserError(where + " has unreadable cimsweep.arch metadata: see docs/model-format.md");
    } catch (const UserError& e) {
      throw UserError(where + ": " + e.what());
    }
    const ResNetArch& ours = net.arch();
    if (theirs.in_channels != ours.in_channels || theirs.input_height != ours.input_height ||
        theirs.input_width != ours.input_width || theirs.num_classes != ours.num_classes)
      throw UserError(
          where + " takes " + std::to_string(theirs.in_channels) + "×" +
          std::to_string(theirs.input_height) + "×" + std::to_string(theirs.input_width) +
          " images of " + std::to_string(theirs.num_classes) + " classes, the data has " +
          std::to_string(ours.in_channels) + "×" + std::to_string(ours.input_height) + "×" +
          std::to_string(ours.input_width) + " images of " + std::to_string(ours.num_classes) +
          ": use the data set that model was trained on");
    if (theirs.depth != ours.depth || theirs.kernel != ours.kernel || theirs.width != ours.width ||
        theirs.shortcut != ours.shortcut || theirs.shortcut_padding != ours.shortcut_padding)
      throw UserError(where + " is a " + theirs.describe() + ", not a " + ours.describe() +
                      ": pass the same --depth, --kernel, --width and --shortcut");
  }
  std::vector<std::string> missing;
  try {
    missing = net.import_tensors(file.tensors);
  } catch (const UserError& e) {
    throw UserError(where + ": " + e.what());
  }
  for (const std::string& name : missing)
    if (name.rfind("exit", 0) != 0)
      throw UserError(where + " lacks backbone tensor '" + name +
                      "': --init needs a model of the same architecture");
}

}  // namespace

// ---------------------------------------------------------------------------------------------

std::vector<float> default_exit_weights(int heads) {
  std::vector<float> weights;
  for (int e = 0; e < heads; ++e)
    weights.push_back(heads == 1 ? 1.0f : float(1.0 - 0.5 * e / double(heads - 1)));
  return weights;
}

void validate_settings(const TrainSettings& s) {
  auto fail = [](const std::string& m) { throw UserError(m); };
  auto text = [](double v) { return format("%g", v); };
  if (s.depth < 8 || (s.depth - 2) % 6 != 0)
    fail("--depth " + std::to_string(s.depth) +
         " is not of the form 6n+2 with n ≥ 1: use 8, 14, 20, 32, 44, 56 or 110");
  if (s.kernel < 1 || s.kernel % 2 == 0 || s.kernel > 7)
    fail("--kernel " + std::to_string(s.kernel) + " must be 1, 3, 5 or 7");
  if (s.width < 1) fail("--width must be at least 1, got " + std::to_string(s.width));
  if (s.shortcut != 'A' && s.shortcut != 'B') fail("--shortcut must be A or B");
  if (s.shortcut_padding != "split" && s.shortcut_padding != "after")
    fail("--shortcut-padding '" + s.shortcut_padding + "' must be split or after");
  for (size_t i = 0; i < s.exits.size(); ++i) {
    if (s.exits[i] != 1 && s.exits[i] != 2)
      fail("--exits may only name stages 1 and 2 (e.g. --exits 1,2), got " +
           std::to_string(s.exits[i]));
    if (i > 0 && s.exits[i] <= s.exits[i - 1])
      fail("--exits must list each stage once, in increasing order (e.g. --exits 1,2)");
  }
  if (s.exit_head.type != "conv" && s.exit_head.type != "pool")
    fail("--exit-head '" + s.exit_head.type + "' must be conv or pool");
  if (s.epochs < 1) fail("--epochs must be at least 1, got " + std::to_string(s.epochs));
  if (s.batch < 1) fail("--batch must be at least 1, got " + std::to_string(s.batch));
  if (!(s.lr > 0) || !std::isfinite(s.lr))
    fail("--lr must be a positive number, got " + text(s.lr));
  if (!(s.momentum >= 0 && s.momentum < 1))
    fail("--momentum must be in [0, 1), got " + text(s.momentum));
  if (!(s.weight_decay >= 0) || !std::isfinite(s.weight_decay))
    fail("--weight-decay must be ≥ 0, got " + text(s.weight_decay));
  if (s.nesterov && s.momentum == 0) fail("--nesterov needs a --momentum above 0");
  if (!(s.gamma > 0 && s.gamma <= 1)) fail("--gamma must be in (0, 1], got " + text(s.gamma));
  for (size_t i = 0; i < s.milestones.size(); ++i) {
    if (s.milestones[i] < 1 || s.milestones[i] >= s.epochs)
      fail("--milestones " + std::to_string(s.milestones[i]) + " is not an epoch in 1.." +
           std::to_string(s.epochs - 1) + ": the rate drops after each listed epoch");
    if (i > 0 && s.milestones[i] <= s.milestones[i - 1])
      fail("--milestones must increase (e.g. --milestones 100,150)");
  }
  if (!s.milestones.empty() && s.schedule != Schedule::kStep)
    fail("--milestones only applies to --schedule step");
  if (s.warmup_epochs < 0 || s.warmup_epochs >= s.epochs)
    fail("--warmup-epochs must be in 0.." + std::to_string(s.epochs - 1) + ", got " +
         std::to_string(s.warmup_epochs));
  if (s.weight_bits < 2 || s.weight_bits > 16)
    fail("--weight-bits " + std::to_string(s.weight_bits) + " is out of range: use 2 to 16");
  if (s.input_bits < 1 || s.input_bits > 16)
    fail("--input-bits " + std::to_string(s.input_bits) + " is out of range: use 1 to 16");
  if (!(s.range_percentile > 0 && s.range_percentile <= 100))
    fail("--range-percentile must be in (0, 100], got " + text(s.range_percentile));
  if (s.calibration_images < 1)
    fail("--calibration-images must be at least 1, got " + std::to_string(s.calibration_images));
  if (!(s.train_sigma >= 0 && s.train_sigma < 1))
    fail("--train-sigma must be in [0, 1), got " + text(s.train_sigma));
  if (s.precision == ConvPrecision::kBf16 && !cpu_has_bf16_convolutions())
    fail("--precision bf16 needs a CPU with AVX-512 BF16 and this one has " + convolution_isa() +
         " (oneDNN): use --precision fp32");
  if (s.crop_padding < -1) fail("--crop-padding must be ≥ 0");
  if (s.flip != "auto" && s.flip != "on" && s.flip != "off")
    fail("--flip '" + s.flip + "' must be auto, on or off");
  const int heads = int(s.exits.size()) + 1;
  if (!s.exit_weights.empty()) {
    if (int(s.exit_weights.size()) != heads)
      fail("--exit-weights has " + std::to_string(s.exit_weights.size()) +
           " values but the network has " + std::to_string(heads) +
           " heads (the exits, then the final one): give one weight per head");
    double sum = 0;
    for (float w : s.exit_weights) {
      if (!(w >= 0) || !std::isfinite(w))
        fail("--exit-weights must be numbers ≥ 0, got " + text(w));
      sum += w;
    }
    if (!(sum > 0)) fail("--exit-weights are all 0: at least one head must have a weight");
  }
  if (s.freeze_backbone && s.init_path.empty())
    fail("--freeze-backbone needs --init FROM.safetensors: a trained backbone to keep");
  if (s.freeze_backbone && s.exits.empty())
    fail("--freeze-backbone trains only the exit heads: add --exits 1,2");
  if (s.resume && s.checkpoint_dir.empty())
    fail("--resume needs --checkpoint-dir D: the directory of the run to continue");
  if (s.stop_after_epoch < 0 || s.stop_after_epoch > s.epochs)
    fail("--stop-after-epoch must be in 1.." + std::to_string(s.epochs));
  if (s.stop_after_epoch > 0 && s.checkpoint_dir.empty())
    fail("--stop-after-epoch needs --checkpoint-dir D, or the run could not be resumed");
}

ResNetArch make_arch(const TrainSettings& s, const Dataset& data) {
  ResNetArch a;
  a.depth = s.depth;
  a.kernel = s.kernel;
  a.width = s.width;
  a.in_channels = data.channels;
  a.input_height = data.height;
  a.input_width = data.width;
  a.num_classes = data.num_classes;
  a.shortcut = s.shortcut;
  a.shortcut_padding = s.shortcut_padding;
  a.exits = s.exits;
  a.exit_head = s.exit_head;
  if (data.channels != 1 && data.channels != 3)
    throw UserError("the data (" + data.description + ") has " + std::to_string(data.channels) +
                    " channels: cimsweep networks take 1 (grey) or 3 (RGB)");
  if (data.height < 4 || data.width < 4)
    throw UserError("the data's images are " + std::to_string(data.height) + "×" +
                    std::to_string(data.width) + ": the networks need at least 4×4");
  if (data.num_classes < 2)
    throw UserError("the data (" + data.description + ") has " + std::to_string(data.num_classes) +
                    " class(es): classification needs two");
  a.validate();
  return a;
}

namespace {

// Top-1 accuracy (%) of every exit over `data`, in batches of kEvaluationBatch images scaled to
// [0, 1]; `forward(images, count)` returns the logits of every exit.
template <class Forward>
std::vector<double> exit_accuracies(const Dataset& data, const ResNetArch& arch,
                                    Forward&& forward) {
  const int heads = arch.num_exits(), classes = arch.num_classes;
  std::vector<uint64_t> correct(size_t(heads), 0);
  std::vector<float> images;
  for (size_t first = 0; first < data.size(); first += kEvaluationBatch) {
    const int count = int(std::min<size_t>(kEvaluationBatch, data.size() - first));
    images.resize(size_t(count) * data.image_elements());
    const uint8_t* pixels = data.image(first);
    for (size_t i = 0; i < images.size(); ++i) images[i] = pixels[i] * (1.0f / 255.0f);
    const auto logits = forward(images.data(), count);
    for (int e = 0; e < heads; ++e)
      for (int i = 0; i < count; ++i) {
        const float* row = logits[size_t(e)].data() + size_t(i) * classes;
        correct[size_t(e)] +=
            int(std::max_element(row, row + classes) - row) == data.labels[first + size_t(i)];
      }
  }
  std::vector<double> accuracy;
  for (uint64_t c : correct) accuracy.push_back(100.0 * double(c) / double(data.size()));
  return accuracy;
}

}  // namespace

std::vector<double> evaluate_accuracy(TrainableResNet& net, const Dataset& data,
                                      const QuantSettings& quant) {
  ForwardOptions options;
  options.quant = quant;
  return exit_accuracies(data, net.arch(), [&](const float* images, int count) {
    return net.predict(images, count, options);
  });
}

namespace {

// The σ = 0 digital CIM network of the evaluator (networks/resnet.cpp + the CPU backend's exact
// digital path), which is what `cimsweep eval` reports as "clean".
std::vector<double> evaluator_accuracy(const TrainResult& r, const Dataset& data,
                                       const TrainSettings& s) {
  ResNet net(r.arch, r.tensors, r.input_ranges);
  CimConfig config;
  config.weight_bits = s.weight_bits;
  config.cell_bits = s.weight_bits;
  config.input_bits = s.input_bits;
  config.scaling = s.scaling;
  CpuCimBackend backend(net.cim_layers(), config);
  backend.set_all_digital(true);
  return exit_accuracies(data, r.arch, [&](const float* images, int count) {
    return net.forward(images, count, backend);
  });
}

std::string utc_now() {
  const std::time_t now = std::time(nullptr);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", std::gmtime(&now));
  return buf;
}

}  // namespace

TrainResult train_network(const TrainSettings& settings_in, const Dataset& train_data,
                          const Dataset& test_data,
                          const std::function<void(const std::string&)>& log) {
  const auto run_start = Clock::now();
  TrainSettings s = settings_in;
  validate_settings(s);
  check_dataset(train_data, "training");
  check_dataset(test_data, "test");
  if (train_data.channels != test_data.channels || train_data.height != test_data.height ||
      train_data.width != test_data.width || train_data.num_classes != test_data.num_classes)
    throw UserError("the training and test splits disagree (" +
                    std::to_string(train_data.channels) + "×" + std::to_string(train_data.height) +
                    "×" + std::to_string(train_data.width) + ", " +
                    std::to_string(train_data.num_classes) + " classes vs " +
                    std::to_string(test_data.channels) + "×" + std::to_string(test_data.height) +
                    "×" + std::to_string(test_data.width) + ", " +
                    std::to_string(test_data.num_classes) + "): use one data set for both");
  if (s.crop_padding >= std::min(train_data.height, train_data.width))
    throw UserError("--crop-padding " + std::to_string(s.crop_padding) +
                    " is not smaller than the images (" + std::to_string(train_data.height) + "×" +
                    std::to_string(train_data.width) + "): use a smaller padding");
  const int heads = int(s.exits.size()) + 1;
  if (s.exit_weights.empty()) s.exit_weights = default_exit_weights(heads);
  if (s.schedule == Schedule::kStep && s.milestones.empty()) {
    for (int m : {s.epochs / 2, s.epochs * 3 / 4})
      if (m >= 1 && (s.milestones.empty() || m > s.milestones.back())) s.milestones.push_back(m);
  }
  const int pad =
      s.crop_padding >= 0 ? s.crop_padding : std::min(train_data.height, train_data.width) / 8;
  const bool flip = s.flip == "on" || (s.flip == "auto" && train_data.channels == 3);

  TrainResult result;
  result.arch = make_arch(s, train_data);
  TrainableResNet net(result.arch);
  net.initialise(s.seed);
  if (!s.init_path.empty()) initialise_from(net, s);
  if (s.freeze_backbone)
    for (Parameter& p : net.parameters())
      if (p.backbone) p.trainable = false;
  if (s.ranges == RangeMode::kPact) {
    net.set_ranges_trainable(true);
    for (Parameter& p : net.parameters())
      if (p.trainable && p.shape == std::vector<int64_t>{1} &&
          p.name.find(".input_range") != std::string::npos) {
        p.weight_decay = true;  // PACT's L2 regularisation of a_max
        if (s.freeze_backbone && p.backbone) p.trainable = false;
      }
  }

  QuantSettings quant;
  quant.enabled = s.quantise;
  quant.weight_bits = s.weight_bits;
  quant.input_bits = s.input_bits;
  quant.scaling = s.scaling;
  SgdSettings sgd{s.momentum, s.weight_decay, s.nesterov};
  const size_t n_train = train_data.size();
  ScheduleSettings schedule;
  schedule.kind = s.schedule;
  schedule.base_lr = s.lr;
  schedule.epochs = s.epochs;
  schedule.steps_per_epoch = int64_t((n_train + size_t(s.batch) - 1) / size_t(s.batch));
  schedule.milestones = s.milestones;
  schedule.gamma = s.gamma;
  schedule.warmup_epochs = s.warmup_epochs;

  const nlohmann::json identity = settings_identity(s, train_data, test_data);
  RunState state;
  std::mt19937_64 rng = data_rng(s.seed);
  std::string resume_note;
  if (!s.checkpoint_dir.empty()) {
    std::error_code error;
    fs::create_directories(s.checkpoint_dir, error);
    if (error || !fs::is_directory(s.checkpoint_dir))
      throw UserError("cannot create --checkpoint-dir '" + s.checkpoint_dir +
                      "': " + error.message());
    const bool exists = fs::exists(fs::path(s.checkpoint_dir) / kCheckpointFile);
    if (exists && !s.resume)
      throw UserError("--checkpoint-dir '" + s.checkpoint_dir +
                      "' already holds a checkpoint: add --resume to continue that run, or use "
                      "an empty directory");
    if (s.resume && load_checkpoint(s.checkpoint_dir, net, state, identity)) {
      std::istringstream in(state.rng);
      in >> rng;
      resume_note = "resuming from " + (fs::path(s.checkpoint_dir) / kCheckpointFile).string() +
                    " after epoch " + std::to_string(state.epochs_done);
    } else if (s.resume) {
      resume_note = "no checkpoint in " + s.checkpoint_dir + " yet: starting from epoch 1";
    }
  }
  result.epochs = state.history;
  if (log) {
    int64_t parameters = 0;
    for (const auto& [name, tensor] : net.export_tensors())
      if (name.find("running_") == std::string::npos) parameters += tensor.numel();
    log("cimsweep train: " + result.arch.describe() + ", " + std::to_string(parameters) +
        " parameters, on " + train_data.description + ": " + std::to_string(n_train) +
        " training / " + std::to_string(test_data.size()) + " test images, " +
        std::to_string(schedule.steps_per_epoch) + " steps per epoch, " +
        std::to_string(omp_get_max_threads()) + " threads (CPU)");
    if (!resume_note.empty()) log(resume_note);
  }

  // Calibration images: a class-balanced, augmentation-free subset of the training data.
  const Dataset calibration_set =
      balanced_subset(train_data, std::min<size_t>(size_t(s.calibration_images), n_train));
  const std::vector<float> calibration_images = to_float_images(calibration_set);
  // A freshly initialised network's running statistics (0 and 1) say nothing about its
  // activations yet: its first calibration uses batch statistics, as its first steps do.
  const bool fresh = s.init_path.empty();
  auto calibrate = [&] {
    for (const auto& [layer, a_max] :
         calibrate_ranges(net, calibration_images, int(calibration_set.size()), s.range_percentile,
                          fresh && state.step == 0))
      net.set_input_range(layer, a_max);
  };

  TrainProgress progress(!s.quiet, s.epochs, n_train);
  std::vector<uint32_t> order(n_train);
  std::vector<Augmentation> augmentation;
  std::vector<float> images;
  std::vector<int32_t> labels;
  const uint32_t crop_choices = uint32_t(2 * pad + 1);
  for (int epoch = state.epochs_done + 1; epoch <= s.epochs; ++epoch) {
    if (s.quantise && (s.ranges == RangeMode::kCalibrate || state.step == 0)) calibrate();
    const auto epoch_start = Clock::now();
    progress.start_epoch(epoch);
    for (size_t i = 0; i < n_train; ++i) order[i] = uint32_t(i);
    for (size_t i = n_train - 1; i > 0; --i) std::swap(order[i], order[rng() % (i + 1)]);
    double loss_sum = 0;
    uint64_t correct_sum = 0;
    double lr = 0;
    for (size_t first = 0; first < n_train; first += size_t(s.batch)) {
      const int count = int(std::min(n_train - first, size_t(s.batch)));
      augmentation.resize(size_t(count));
      for (Augmentation& a : augmentation) {
        a.top = pad > 0 ? int(rng() % crop_choices) : 0;
        a.left = pad > 0 ? int(rng() % crop_choices) : 0;
        a.flip = flip && (rng() & 1);
      }
      build_batch(train_data, order, first, count, augmentation, pad, images, labels);
      ForwardOptions options;
      options.training = true;
      options.quant = quant;
      options.noise_sigma = s.train_sigma;
      options.noise_seed = uint32_t(s.seed);
      options.noise_step = uint64_t(state.step);
      options.frozen_backbone = s.freeze_backbone;
      options.precision = s.precision;
      const std::vector<FeatureMap> logits = net.forward(images.data(), count, options);
      std::vector<FeatureMap> dlogits(logits.size());
      double loss = 0;
      int correct = 0;
      for (size_t e = 0; e < logits.size(); ++e)
        loss += s.exit_weights[e] *
                softmax_cross_entropy(logits[e], labels.data(), s.exit_weights[e], dlogits[e],
                                      e + 1 == logits.size() ? &correct : nullptr);
      if (!std::isfinite(loss))
        throw UserError("training diverged (loss " + format("%g", loss) + " at epoch " +
                        std::to_string(epoch) + "): lower --lr or add --warmup-epochs");
      net.backward(dlogits);
      lr = learning_rate(schedule, state.step);
      sgd_step(net.parameters(), sgd, lr);
      if (s.ranges == RangeMode::kPact) net.clamp_input_ranges(kMinimumRange);
      ++state.step;
      loss_sum += loss * count;
      correct_sum += uint64_t(correct);
      progress.update(first + size_t(count), loss_sum / double(first + size_t(count)));
    }
    EpochSummary summary;
    summary.epoch = epoch;
    summary.seconds = seconds_since(epoch_start);
    summary.loss = loss_sum / double(n_train);
    summary.train_accuracy = 100.0 * double(correct_sum) / double(n_train);
    summary.learning_rate = lr;
    summary.images_per_second = double(n_train) / std::max(1e-9, summary.seconds);
    const std::vector<double> test_accuracy = evaluate_accuracy(net, test_data, quant);
    summary.test_accuracy = test_accuracy.back();
    if (heads > 1) summary.exit_test_accuracy = test_accuracy;
    progress.clear();
    if (log) {
      std::string line = "epoch " + std::to_string(epoch) + "/" + std::to_string(s.epochs) +
                         ": loss " + format("%.4f", summary.loss) + ", train acc " +
                         format("%.2f", summary.train_accuracy) + " %, test acc " +
                         format("%.2f", summary.test_accuracy) + " %";
      if (heads > 1) {
        line += " (exits";
        for (size_t e = 0; e < test_accuracy.size(); ++e)
          line += (e ? " / " : " ") + format("%.2f", test_accuracy[e]);
        line += ")";
      }
      line += ", lr " + format("%.4g", lr) + ", " + format("%.1f", summary.images_per_second) +
              " images/s, " + format_duration(summary.seconds);
      log(line);
    }
    result.epochs.push_back(summary);
    state.history.push_back(summary);
    state.epochs_done = epoch;
    std::ostringstream rng_text;
    rng_text << rng;
    state.rng = rng_text.str();
    if (!s.checkpoint_dir.empty()) save_checkpoint(s.checkpoint_dir, net, state, identity);
    if (s.stop_after_epoch == epoch && epoch < s.epochs) {
      result.stopped_early = true;
      if (log)
        log("stopped after epoch " + std::to_string(epoch) +
            " as asked: the same command with --resume continues");
      return result;
    }
  }

  // The final ranges: measured on the final network (calibrate, and float training), or as
  // learned (pact).
  if (!s.quantise || s.ranges == RangeMode::kCalibrate) calibrate();
  result.tensors = net.export_tensors();
  result.input_ranges = net.input_ranges();
  QuantSettings float_net = quant;
  float_net.enabled = false;
  const std::vector<double> float_accuracy = evaluate_accuracy(net, test_data, float_net);
  const std::vector<double> quantised_accuracy = evaluator_accuracy(result, test_data, s);
  result.float_test_accuracy = float_accuracy.back();
  result.quantised_test_accuracy = quantised_accuracy.back();
  if (heads > 1) {
    result.exit_float_test_accuracy = float_accuracy;
    result.exit_quantised_test_accuracy = quantised_accuracy;
  }

  nlohmann::json history = nlohmann::json::array();
  double train_seconds = 0;
  for (const EpochSummary& e : result.epochs) {
    history.push_back(summary_to_json(e));
    train_seconds += e.seconds;
  }
  const std::string scaling = to_string(s.scaling);
  nlohmann::json p;
  p["trained_by"] = std::string("cimsweep ") + CIMSWEEP_VERSION + " train (CPU engine)";
  p["command"] = s.command_line;
  p["data"] = train_data.description + " (" + std::to_string(n_train) + " training images)";
  p["test_data"] = test_data.description + " (" + std::to_string(test_data.size()) + " images)";
  p["input"] = "pixel/255, no normalisation";
  p["seed"] = s.seed;
  p["epochs"] = s.epochs;
  p["batch"] = s.batch;
  p["optimizer"] = std::string("SGD momentum ") + format("%g", s.momentum) +
                   (s.nesterov ? " (Nesterov)" : "") + ", lr " + format("%g", s.lr) + " " +
                   to_string(s.schedule) + " per step" +
                   (s.warmup_epochs ? ", " + std::to_string(s.warmup_epochs) + " warm-up epochs"
                                    : std::string()) +
                   ", weight decay " + format("%g", s.weight_decay) + " (conv/FC weights)";
  p["augmentation"] = "random crop with " + std::to_string(pad) + "-pixel zero padding" +
                      (flip ? ", horizontal flip" : ", no flip");
  p["quantisation_aware"] = s.quantise ? std::to_string(s.weight_bits) + "-bit weights (" +
                                             scaling + ") and " + std::to_string(s.input_bits) +
                                             "-bit inputs, straight-through"
                                       : std::string("off (float training)");
  p["input_ranges"] = s.ranges == RangeMode::kPact
                          ? std::string("learned (PACT), conv1 = 1.0")
                          : "percentile " + format("%g", s.range_percentile) +
                                " of each layer's float input over " +
                                std::to_string(calibration_set.size()) +
                                " class-balanced training images after the last epoch, conv1 = 1.0";
  if (s.precision == ConvPrecision::kBf16)
    p["precision"] = "bf16 convolutions (fp32 accumulation, master weights, batch norm and loss)";
  if (s.train_sigma > 0)
    p["noise_aware"] = "weights × (1 + " + format("%g", s.train_sigma) + "·z) per batch";
  if (heads > 1) p["exit_weights"] = s.exit_weights;
  if (!s.init_path.empty()) p["init"] = s.init_path;
  if (s.freeze_backbone) p["frozen_backbone"] = true;
  p["float_test_accuracy"] = result.float_test_accuracy / 100.0;
  p["quantised_digital_test_accuracy"] = result.quantised_test_accuracy / 100.0;
  p["quantised_digital"] = std::to_string(s.weight_bits) + "-bit weights (" + scaling + ") and " +
                           std::to_string(s.input_bits) +
                           "-bit inputs, sigma 0, ideal ADC (cimsweep's digital path)";
  if (heads > 1) {
    nlohmann::json f = nlohmann::json::array(), q = nlohmann::json::array();
    for (double a : result.exit_float_test_accuracy) f.push_back(a / 100.0);
    for (double a : result.exit_quantised_test_accuracy) q.push_back(a / 100.0);
    p["exit_float_test_accuracy"] = f;
    p["exit_quantised_digital_test_accuracy"] = q;
  }
  p["history"] = history;
  p["date"] = utc_now();
  p["train_seconds"] = std::round(train_seconds);
  p["wall_seconds"] = std::round(seconds_since(run_start));
  p["threads"] = omp_get_max_threads();
  result.provenance = p;
  return result;
}

void save_trained_model(const std::string& path, const TrainResult& result,
                        const std::vector<std::string>& class_names) {
  std::map<std::string, std::string> metadata{{"cimsweep.provenance", result.provenance.dump()}};
  if (!class_names.empty()) metadata["cimsweep.class_names"] = nlohmann::json(class_names).dump();
  save_model(path, result.arch, result.tensors, result.input_ranges, metadata);
}

}  // namespace cimsweep::train
