// bench_train_cpu: how fast does the CPU training engine (train/) train a ResNet, against the
// sgemm rate of the same GEMM shapes on the same machine, measured in the same run?
//
//  1. Baseline: the GEMMs one training step must do, alone: for every conv/FC layer and every chunk
//     of images the engine cuts the batch into (train/layers.cpp: 2048 output positions per chunk),
//     the forward GEMM (out × positions × rows), the weight-gradient GEMM and the input-gradient
//     GEMM (not for the first layer), each chunk's on one thread with OpenBLAS single-threaded, the
//     chunks spread over the OpenMP threads exactly as the engine spreads them.
//  2. Training steps of a ResNet (default ResNet-20 on 32×32×3, batch 128, random images and
//     labels), quantisation-aware (8-bit weights and inputs): forward + backward + SGD update.
//  3. The engine's forward pass alone (evaluation mode, quantised), and the evaluator's digital
//     path (networks/resnet.cpp + the CPU backend, σ = 0), the figures eval/sweep users know.
// The ratio (1)/(2) says how much of a training step is the GEMM work any engine must do.
#include <cblas.h>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "host/cim_cpu.h"
#include "host/output_file.h"
#include "host/results.h"
#include "networks/resnet.h"
#include "train/layers.h"
#include "train/network.h"
#include "train/optimizer.h"

using namespace cimsweep;
using namespace cimsweep::train;
using Clock = std::chrono::steady_clock;

namespace {

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

struct GemmShape {
  int m, n, k;
};

// The GEMMs of one training step of `net` on `batch` images, chunked as train/layers.cpp does.
std::vector<std::vector<GemmShape>> training_gemms(const ResNet& net, int batch) {
  std::vector<std::vector<GemmShape>> layers;
  const std::vector<int64_t> macs = net.layer_macs();
  for (size_t i = 0; i < net.cim_layers().size(); ++i) {
    const CimLayerSpec& s = net.cim_layers()[i];
    const int rows = s.rows();
    const int positions = int(macs[i] / (int64_t(s.out_channels) * rows));
    const int per_chunk = std::max(1, 2048 / positions);
    std::vector<GemmShape> shapes;
    for (int first = 0; first < batch; first += per_chunk) {
      const int cols = std::min(per_chunk, batch - first) * positions;
      shapes.push_back({s.out_channels, cols, rows});             // forward
      shapes.push_back({s.out_channels, rows, cols});             // weight gradient
      if (i > 0) shapes.push_back({rows, cols, s.out_channels});  // input gradient
    }
    layers.push_back(shapes);
  }
  return layers;
}

// Seconds for one pass over all the shapes, chunks of a layer spread over the threads.
double time_gemms(const std::vector<std::vector<GemmShape>>& layers) {
  size_t largest = 0;
  for (const auto& shapes : layers)
    for (const GemmShape& g : shapes)
      largest = std::max({largest, size_t(g.m) * g.k, size_t(g.k) * g.n, size_t(g.m) * g.n});
  const auto start = Clock::now();
  for (const auto& shapes : layers) {
#pragma omp parallel
    {
      std::vector<float> a(largest, 0.01f), b(largest, 0.02f), c(largest);
#pragma omp for schedule(dynamic)
      for (int i = 0; i < int(shapes.size()); ++i) {
        const GemmShape& g = shapes[size_t(i)];
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, g.m, g.n, g.k, 1.0f, a.data(), g.k,
                    b.data(), g.n, 0.0f, c.data(), g.n);
      }
    }
  }
  return seconds_since(start);
}

double gemm_flops(const std::vector<std::vector<GemmShape>>& layers) {
  double flops = 0;
  for (const auto& shapes : layers)
    for (const GemmShape& g : shapes) flops += 2.0 * g.m * g.n * g.k;
  return flops;
}

}  // namespace

static int run(int argc, char** argv) {
  CLI::App app{"bench_train_cpu: CPU training throughput against the sgemm rate of its shapes"};
  int depth = 20, width = 16, size = 32, channels = 3, classes = 10, batch = 128, steps = 5;
  int threads = 0;
  std::string json_path;
  app.add_option("--depth", depth, "ResNet depth (default 20)");
  app.add_option("--width", width, "first-stage width (default 16)");
  app.add_option("--size", size, "image height and width (default 32)");
  app.add_option("--channels", channels, "image channels, 1 or 3 (default 3)");
  app.add_option("--batch", batch, "training batch (default 128)");
  app.add_option("--steps", steps, "timed training steps, after one warm-up step (default 5)");
  app.add_option("--threads", threads, "OpenMP threads (default all cores)");
  app.add_option("--json", json_path, "also write the figures to this JSON file");
  CLI11_PARSE(app, argc, argv);
  if (threads > 0) omp_set_num_threads(threads);

  ResNetArch arch;
  arch.depth = depth;
  arch.width = width;
  arch.in_channels = channels;
  arch.input_height = arch.input_width = size;
  arch.num_classes = classes;
  TrainableResNet net(arch);
  net.initialise(1);
  for (const std::string& layer : net.cim_layer_names())
    if (layer != "conv1") net.set_input_range(layer, 4.0f);
  std::mt19937 rng(1);
  std::uniform_real_distribution<float> pixel(0.0f, 1.0f);
  std::vector<float> images(size_t(batch) * channels * size * size);
  for (float& v : images) v = std::round(255.0f * pixel(rng)) / 255.0f;
  std::vector<int32_t> labels(static_cast<size_t>(batch));
  for (int32_t& l : labels) l = int32_t(rng() % uint32_t(classes));

  const ResNet reference(arch, net.export_tensors(), net.input_ranges());
  int64_t macs = 0;
  for (int64_t m : reference.layer_macs()) macs += m;
  std::printf("bench_train_cpu: %s, batch %d, %d OpenMP threads, %.1f MMAC/image forward\n",
              arch.describe().c_str(), batch, omp_get_max_threads(), macs / 1e6);

  // 1. The GEMM baseline (best of three passes).
  openblas_set_num_threads(1);
  const auto gemms = training_gemms(reference, batch);
  double gemm_seconds = 1e30;
  for (int pass = 0; pass < 3; ++pass) gemm_seconds = std::min(gemm_seconds, time_gemms(gemms));
  const double gemm_gflops = gemm_flops(gemms) / gemm_seconds / 1e9;
  const double gemm_images = batch / gemm_seconds;
  std::printf(
      "  sgemm of one training step's shapes: %.1f GFLOP/s, %.1f images/s if nothing "
      "else took time\n",
      gemm_gflops, gemm_images);

  // 2. Training steps (QAT, 8-bit).
  SgdSettings sgd;
  ScheduleSettings schedule;
  auto train_step = [&](int64_t step) {
    ForwardOptions o;
    o.training = true;
    const auto logits = net.forward(images.data(), batch, o);
    std::vector<FeatureMap> d(logits.size());
    softmax_cross_entropy(logits.back(), labels.data(), 1.0f, d.back(), nullptr);
    net.backward(d);
    sgd_step(net.parameters(), sgd, learning_rate(schedule, step) * 0.01);
  };
  train_step(0);
  auto start = Clock::now();
  for (int s = 0; s < steps; ++s) train_step(s + 1);
  const double step_seconds = seconds_since(start) / steps;
  const double train_images = batch / step_seconds;
  const double train_gflops = gemm_flops(gemms) / step_seconds / 1e9;
  std::printf(
      "  training (forward + backward + SGD, QAT 8/8-bit): %.1f images/s, %.2f s/step, "
      "%.1f GFLOP/s of GEMM work = %.2f of the sgemm rate\n",
      train_images, step_seconds, train_gflops, train_images / gemm_images);

  // 3. Forward only: the engine's quantised evaluation and the evaluator's digital path.
  ForwardOptions eval;
  net.forward(images.data(), batch, eval);
  start = Clock::now();
  for (int s = 0; s < steps; ++s) net.forward(images.data(), batch, eval);
  const double forward_images = batch * steps / seconds_since(start);
  CimConfig config;
  config.adc = AdcMode::kIdeal;
  CpuCimBackend backend(reference.cim_layers(), config);
  backend.set_all_digital(true);
  reference.forward(images.data(), batch, backend);
  start = Clock::now();
  for (int s = 0; s < steps; ++s) reference.forward(images.data(), batch, backend);
  const double digital_images = batch * steps / seconds_since(start);
  std::printf(
      "  forward only: engine (quantised, eval mode) %.1f images/s; evaluator's digital "
      "path %.1f images/s\n",
      forward_images, digital_images);
  std::printf("  training step / engine forward: %.2f (3 GEMMs per layer instead of 1)\n",
              forward_images / train_images);

  if (!json_path.empty()) {
    nlohmann::json j{{"network", arch.describe()},
                     {"batch", batch},
                     {"threads", omp_get_max_threads()},
                     {"forward_mmac_per_image", macs / 1e6},
                     {"sgemm_gflops", gemm_gflops},
                     {"sgemm_images_per_second", gemm_images},
                     {"train_images_per_second", train_images},
                     {"train_gemm_gflops", train_gflops},
                     {"train_fraction_of_sgemm", train_images / gemm_images},
                     {"engine_forward_images_per_second", forward_images},
                     {"evaluator_digital_images_per_second", digital_images}};
    cimsweep::write_output_file(json_path, j.dump(2) + "\n", "benchmark report");
  }
  return 0;
}

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_train_cpu: %s\n", e.what());
    return 1;
  }
}
