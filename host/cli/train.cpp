#include "host/cli/train.h"

#include <omp.h>

#include <cstdio>
#include <filesystem>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>

#include "host/io/dataset.h"
#include "common/errors.h"
#include "host/io/output_file.h"
#include "host/sweep/runner.h"
#include "train/layers.h"
#include "train/trainer.h"

namespace cimsweep {

using train::TrainResult;
using train::TrainSettings;

CLI::App* setup_train(CLI::App& app, TrainOptions& o) {
  TrainSettings& s = o.settings;
  CLI::App* cmd = app.add_subcommand(
      "train", "train a ResNet (quantisation-aware) on the CPU and write a model file");
  cmd->add_option("--data", o.data,
                  "data set with train and test splits: CIFAR-10 binary, IDX(.gz) or image folder "
                  "(default: Debian's Fashion-MNIST, /usr/share/datasets/fashion-mnist)");
  cmd->add_option("--limit", o.limit, "class-balanced subset of N training images (default all)");
  cmd->add_option("--test-limit", o.test_limit,
                  "class-balanced subset of N test images (default all)");
  cmd->add_option("--output", o.output, "model file to write (.safetensors)")->required();

  cmd->add_option("--depth", s.depth, "depth 6n+2 (default 20)");
  cmd->add_option("--kernel", s.kernel, "kernel size 1, 3, 5 or 7 (default 3)");
  cmd->add_option("--width", s.width, "first-stage width w; stages w, 2w, 4w (default 16)");
  cmd->add_option("--shortcut", o.shortcut, "A (identity + zero channels) or B (1×1 conv + BN)");
  cmd->add_option("--shortcut-padding", s.shortcut_padding,
                  "option A's zero channels: split (before and after) or after (default split)");
  cmd->add_option("--exits", s.exits, "early exits after these stages, e.g. 1,2 (default none)")
      ->delimiter(',');
  cmd->add_option("--exit-head", o.exit_head,
                  "early-exit head: conv (3×3 stride-2 conv + BN + ReLU + pool + FC) or pool "
                  "(pool + FC) (default conv)");
  cmd->add_option("--exit-weights", s.exit_weights,
                  "loss weight of every head, exits first, e.g. 1,0.75,0.5 (default: linear from "
                  "1 at the shallowest exit to 0.5 at the final head)")
      ->delimiter(',');
  cmd->add_option("--init", s.init_path,
                  "start from this model file's tensors (e.g. a trained backbone); missing exit "
                  "heads are initialised afresh");
  cmd->add_flag("--freeze-backbone", s.freeze_backbone,
                "with --init: train only the exit heads, the backbone stays as loaded");

  cmd->add_option("--epochs", s.epochs, "epochs (default 30)");
  cmd->add_option("--batch", s.batch, "batch size (default 128)");
  cmd->add_option("--lr", s.lr, "peak learning rate (default 0.1)");
  cmd->add_option("--momentum", s.momentum, "SGD momentum in [0, 1) (default 0.9)");
  cmd->add_flag("--nesterov", s.nesterov, "Nesterov momentum");
  cmd->add_option("--weight-decay", s.weight_decay,
                  "L2 weight decay of conv/FC weights (default 5e-4)");
  cmd->add_option("--schedule", o.schedule,
                  "learning-rate schedule: cosine, step, onecycle or constant (default cosine)");
  cmd->add_option("--milestones", s.milestones,
                  "step schedule: epochs after which the rate is multiplied by --gamma (default "
                  "50 % and 75 % of --epochs)")
      ->delimiter(',');
  cmd->add_option("--gamma", s.gamma, "step schedule factor (default 0.1)");
  cmd->add_option("--warmup-epochs", s.warmup_epochs,
                  "linear learning-rate warm-up over these epochs (default 0)");
  cmd->add_option("--seed", s.seed,
                  "seed of the initial weights, shuffles and augmentation (default 1)");
  cmd->add_option("--crop-padding", s.crop_padding,
                  "random-crop zero padding in pixels (default: image height / 8)");
  cmd->add_option("--flip", s.flip,
                  "random horizontal flip: auto (on for RGB, off for grey images), on or off");

  cmd->add_option("--weight-bits", s.weight_bits, "weight bits wb of QAT (default 8)");
  cmd->add_option("--input-bits", s.input_bits, "input bits ab of QAT (default 8)");
  cmd->add_option("--weight-scaling", o.scaling, "maxabs or wage (default maxabs)");
  cmd->add_flag("--no-qat", o.no_qat, "train the float network (ranges calibrated at the end)");
  cmd->add_option("--ranges", o.ranges,
                  "input ranges a_max: calibrate (percentile, every epoch) or pact (learned) "
                  "(default calibrate)");
  cmd->add_option("--range-percentile", s.range_percentile,
                  "percentile of a layer's inputs that sets a_max (default 99.99)");
  cmd->add_option("--calibration-images", s.calibration_images,
                  "training images the ranges are measured on (default 2000)");
  cmd->add_option("--train-sigma", s.train_sigma,
                  "noise-aware training: weights × (1 + σ·z), fresh every batch (default 0)");

  cmd->add_option("--checkpoint-dir", s.checkpoint_dir,
                  "write a checkpoint here after every epoch (atomically)");
  cmd->add_flag("--resume", s.resume,
                "continue from the checkpoint in --checkpoint-dir (same options and data)");
  cmd->add_option("--stop-after-epoch", s.stop_after_epoch,
                  "stop after this epoch (checkpoint kept; --resume continues)");
  cmd->add_option("--threads", o.threads, "CPU threads (default: all cores)");
  cmd->add_option("--precision", o.precision,
                  "convolutions in fp32 (default) or bf16 (CPUs with AVX-512 BF16)");
  cmd->add_flag("--quiet", s.quiet, "no progress line");
  return cmd;
}

int run_train(const TrainOptions& o) {
  TrainSettings s = o.settings;
  if (o.shortcut != "A" && o.shortcut != "B")
    throw UserError("--shortcut '" + o.shortcut + "' must be A or B");
  s.shortcut = o.shortcut[0];
  s.schedule = train::parse_schedule(o.schedule);
  s.scaling = parse_weight_scaling(o.scaling);
  if (o.ranges != "calibrate" && o.ranges != "pact")
    throw UserError("--ranges '" + o.ranges + "' must be calibrate or pact");
  s.ranges = o.ranges == "pact" ? train::RangeMode::kPact : train::RangeMode::kCalibrate;
  s.exit_head.type = o.exit_head;
  s.quantise = !o.no_qat;
  if (o.limit < 0) throw UserError("--limit must be ≥ 0 (0: all training images)");
  if (o.test_limit < 0) throw UserError("--test-limit must be ≥ 0 (0: all test images)");
  s.precision = train::parse_cpu_precision(o.precision);
  if (o.threads < 0) throw UserError("--threads must be at least 1 (or leave it out: all cores)");
  train::validate_settings(s);
  // Fail before hours of training, not after: the output must be writable (and no directory).
  (void)OutputPath(o.output, "--output");
  if (o.threads > 0) omp_set_num_threads(o.threads);

  const bool default_data = o.data.empty();
  const std::string path = default_data ? default_data_path() : o.data;
  if (default_data && !std::filesystem::exists(path))
    throw UserError("no --data given and Fashion-MNIST is not installed at " + path +
                    ": run `apt-get install dataset-fashion-mnist` or pass --data PATH");
  const Dataset train_data = load_balanced(path, "train", o.limit);
  const Dataset test_data = load_balanced(path, "test", o.test_limit);

  auto log = [](const std::string& line) {
    std::fprintf(stderr, "%s\n", line.c_str());
    std::fflush(stderr);
  };
  const TrainResult result = train::train_network(s, train_data, test_data, log);
  if (result.stopped_early) return 0;
  train::save_trained_model(o.output, result, train_data.class_names);
  char line[256];
  std::snprintf(
      line, sizeof line,
      "test accuracy: float %.2f %%, quantised digital (%d-bit weights and %d-bit inputs, "
      "σ = 0) %.2f %%; wrote %s",
      result.float_test_accuracy, s.weight_bits, s.input_bits, result.quantised_test_accuracy,
      o.output.c_str());
  log(line);
  return 0;
}

}  // namespace cimsweep
