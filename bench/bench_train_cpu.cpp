// bench_train_cpu: how fast does the CPU training engine (train/: oneDNN convolutions, OpenBLAS
// FC) train a ResNet, against PyTorch on the same network and against the GEMM rate of the
// machine, both measured in the same run? For each of --depths (default 20,56):
//
//  1. Baselines: the GEMMs one training step's convolutions amount to as im2col GEMMs, alone: for
//     every conv/FC layer and every chunk of images the engine cuts the batch into
//     (train/layers.cpp: 2048 output positions per chunk), the forward GEMM (out × positions ×
//     rows), the weight-gradient GEMM and the input-gradient GEMM (not for the first layer), each
//     chunk's on one thread, the chunks spread over the OpenMP threads as the engine spreads
//     them: OpenBLAS sgemm (fp32) and, where the CPU has AVX-512 BF16, oneDNN's bf16 matmul.
//  2. Training steps of the ResNet (32×32×3, batch 128, random images and labels),
//     quantisation-aware (8-bit weights and inputs): forward + backward + SGD, in fp32 and, where
//     the CPU has AVX-512 BF16, with bf16 convolutions.
//  3. PyTorch (Debian's python3-torch, when `/usr/bin/python3 -c 'import torch'` works) training
//     the same network, batch and fake quantisers in channels-last, fp32 and bf16 autocast (bf16
//     only where the CPU has AVX-512 BF16/AMX), run by bench/pytorch_train_cpu.py on the same
//     number of threads. 2 and 3 alternate --rounds times and each keeps its best round, so that
//     a drifting load on a shared machine hits both: "ratio_vs_pytorch" = ours / PyTorch per
//     precision (null where either side was not measured).
//  4. With --forward: the engine's forward pass alone (evaluation mode, quantised) and the
//     evaluator's digital path (networks/resnet.cpp + the CPU backend, σ = 0).
#include <cblas.h>
#include <omp.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include <dnnl.hpp>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <optional>

#include "host/cpu/cim_cpu.h"
#include "host/io/output_file.h"
#include "host/results/results.h"
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

// Seconds for one pass over all the shapes as bf16 GEMMs (oneDNN matmul, bf16 × bf16 → fp32),
// spread over the threads as time_gemms does; each matmul is set up for one thread.
double time_bf16_gemms(const std::vector<std::vector<GemmShape>>& layers) {
  using dnnl::memory;
  const dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  std::vector<std::vector<dnnl::matmul>> primitives(layers.size());
  std::vector<std::vector<std::array<memory, 3>>> operands(layers.size());
  const int threads = omp_get_max_threads();
  omp_set_num_threads(1);
  for (size_t l = 0; l < layers.size(); ++l)
    for (const GemmShape& g : layers[l]) {
      const memory::desc a({g.m, g.k}, memory::data_type::bf16, memory::format_tag::ab);
      const memory::desc b({g.k, g.n}, memory::data_type::bf16, memory::format_tag::ab);
      const memory::desc c({g.m, g.n}, memory::data_type::f32, memory::format_tag::ab);
      primitives[l].emplace_back(dnnl::matmul::primitive_desc(dnnl::matmul::desc(a, b, c), engine));
      operands[l].push_back({memory(a, engine), memory(b, engine), memory(c, engine)});
      std::memset(operands[l].back()[0].get_data_handle(), 0, a.get_size());
      std::memset(operands[l].back()[1].get_data_handle(), 0, b.get_size());
    }
  omp_set_num_threads(threads);
  const auto start = Clock::now();
  for (size_t l = 0; l < layers.size(); ++l) {
#pragma omp parallel
    {
      dnnl::stream stream(engine);
#pragma omp for schedule(dynamic)
      for (int i = 0; i < int(layers[l].size()); ++i) {
        auto& [a, b, c] = operands[l][size_t(i)];
        primitives[l][size_t(i)].execute(
            stream, {{DNNL_ARG_SRC, a}, {DNNL_ARG_WEIGHTS, b}, {DNNL_ARG_DST, c}});
        stream.wait();
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

// PyTorch's images/s for this network and precision (bench/pytorch_train_cpu.py), or nothing
// when torch is missing or the precision unsupported; `note` says which.
std::optional<double> pytorch_images_per_second(const std::string& script, int depth, int width,
                                                int size, int channels, int batch, int steps,
                                                int threads, const std::string& precision,
                                                std::string& note) {
  const std::string command =
      "/usr/bin/python3 '" + script + "' --depth " + std::to_string(depth) + " --width " +
      std::to_string(width) + " --size " + std::to_string(size) + " --channels " +
      std::to_string(channels) + " --batch " + std::to_string(batch) + " --steps " +
      std::to_string(steps) + " --threads " + std::to_string(threads) + " --precision " + precision;
  FILE* pipe = popen(command.c_str(), "r");
  if (!pipe) {
    note = "could not start /usr/bin/python3";
    return std::nullopt;
  }
  std::string output;
  char buffer[4096];
  while (size_t got = std::fread(buffer, 1, sizeof buffer, pipe)) output.append(buffer, got);
  const int status = pclose(pipe);
  const size_t line = output.rfind('{');
  if (status != 0 || line == std::string::npos) {
    note = "PyTorch run failed (exit status " + std::to_string(status) + ")";
    return std::nullopt;
  }
  const nlohmann::json j = nlohmann::json::parse(output.substr(line));
  if (j.contains("unsupported")) {
    note = j["unsupported"].get<std::string>();
    return std::nullopt;
  }
  note = "torch " + j.value("torch", std::string("?"));
  return j["images_per_second"].get<double>();
}

bool torch_importable() {
  return std::system("/usr/bin/python3 -c 'import torch' >/dev/null 2>&1") == 0;
}

}  // namespace

static int run(int argc, char** argv) {
  CLI::App app{"bench_train_cpu: CPU training throughput against the sgemm rate of its shapes"};
  std::vector<int> depths{20, 56};
  int width = 16, size = 32, channels = 3, classes = 10, batch = 128, steps = 5;
  int threads = 0;
  std::string json_path;
  app.add_option("--depths", depths, "ResNet depths, comma-separated (default 20,56)")
      ->delimiter(',');
  app.add_option("--width", width, "first-stage width (default 16)");
  app.add_option("--size", size, "image height and width (default 32)");
  app.add_option("--channels", channels, "image channels, 1 or 3 (default 3)");
  app.add_option("--batch", batch, "training batch (default 128)");
  app.add_option("--steps", steps, "timed training steps, after one warm-up step (default 5)");
  app.add_option("--threads", threads, "OpenMP threads (default all cores)");
  app.add_option("--json", json_path, "also write the figures to this JSON file");
  bool no_pytorch = false, forward_too = false;
  int rounds = 2;
  app.add_flag("--no-pytorch", no_pytorch, "skip the PyTorch comparison");
  app.add_option("--rounds", rounds,
                 "alternate ours and PyTorch this many times, keep each best (default 2)");
  app.add_flag("--forward", forward_too, "also time the forward pass alone and the evaluator");
  CLI11_PARSE(app, argc, argv);
  if (threads > 0) omp_set_num_threads(threads);
  const int thread_count = omp_get_max_threads();
  // The script sits beside this file in the source tree.
  const std::string script =
      (std::filesystem::path(CIMSWEEP_SOURCE_DIR) / "bench" / "pytorch_train_cpu.py").string();
  const bool pytorch = !no_pytorch && torch_importable();
  if (!no_pytorch && !pytorch)
    std::printf("bench_train_cpu: /usr/bin/python3 cannot import torch: no PyTorch comparison\n");
  nlohmann::json networks = nlohmann::json::array();
  for (const int depth : depths) {
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

    // bf16 GEMM rate of the same shapes (oneDNN matmul: bf16 operands, fp32 results), where the
    // CPU has AVX-512 BF16 (Debian's OpenBLAS exports no sbgemm).
    const bool bf16 = cpu_has_bf16_convolutions();
    double bf16_gemm_gflops = 0;
    if (bf16) {
      double seconds = 1e30;
      for (int pass = 0; pass < 3; ++pass) seconds = std::min(seconds, time_bf16_gemms(gemms));
      bf16_gemm_gflops = gemm_flops(gemms) / seconds / 1e9;
      std::printf("  bf16 GEMM (oneDNN matmul) of the same shapes: %.1f GFLOP/s\n",
                  bf16_gemm_gflops);
    }

    // 2. Training steps (QAT, 8-bit) and 3. PyTorch's, interleaved `rounds` times: the load of
    // a shared machine drifts, so each side keeps its best round.
    SgdSettings sgd;
    ScheduleSettings schedule;
    int64_t step_count = 0;
    auto our_images_per_second = [&](ConvPrecision precision) {
      auto train_step = [&] {
        ForwardOptions o;
        o.training = true;
        o.precision = precision;
        const auto logits = net.forward(images.data(), batch, o);
        std::vector<FeatureMap> d(logits.size());
        softmax_cross_entropy(logits.back(), labels.data(), 1.0f, d.back(), nullptr);
        net.backward(d);
        sgd_step(net.parameters(), sgd, learning_rate(schedule, step_count++) * 0.01);
      };
      train_step();  // warm-up: oneDNN creates its kernels
      const auto start = Clock::now();
      for (int s = 0; s < steps; ++s) train_step();
      return batch * steps / seconds_since(start);
    };
    const std::vector<std::string> precisions{"fp32", "bf16"};
    nlohmann::json ours{{"fp32", nullptr}, {"bf16", nullptr}};
    nlohmann::json theirs{{"fp32", nullptr}, {"bf16", nullptr}};
    nlohmann::json notes = nlohmann::json::object();
    if (!bf16)
      notes["ours_bf16"] = "this CPU has no AVX-512 BF16 (oneDNN: " + convolution_isa() + ")";
    auto keep_best = [](nlohmann::json& slot, double value) {
      if (slot.is_null() || value > slot.get<double>()) slot = value;
    };
    for (int round = 0; round < rounds; ++round) {
      for (const std::string& precision : precisions) {
        if (precision == "fp32" || bf16) {
          const double rate = our_images_per_second(precision == "bf16" ? ConvPrecision::kBf16
                                                                        : ConvPrecision::kFp32);
          keep_best(ours[precision], rate);
          std::printf("  round %d, ours %s (QAT 8/8-bit): %.1f images/s\n", round + 1,
                      precision.c_str(), rate);
        }
        if (!pytorch) continue;
        std::string note;
        const auto rate = pytorch_images_per_second(script, depth, width, size, channels, batch,
                                                    steps, thread_count, precision, note);
        notes["pytorch_" + precision] = note;
        if (!rate) {
          std::printf("  round %d, PyTorch %s: not measured (%s)\n", round + 1, precision.c_str(),
                      note.c_str());
          continue;
        }
        keep_best(theirs[precision], *rate);
        std::printf("  round %d, PyTorch %s (channels-last, same quantisers): %.1f images/s\n",
                    round + 1, precision.c_str(), *rate);
      }
    }
    nlohmann::json ratio{{"fp32", nullptr}, {"bf16", nullptr}};
    nlohmann::json gflops{{"fp32", nullptr}, {"bf16", nullptr}};
    nlohmann::json fraction{{"fp32", nullptr}, {"bf16", nullptr}};
    const double rate_of[2] = {gemm_gflops, bf16_gemm_gflops};
    for (size_t k = 0; k < precisions.size(); ++k) {
      const std::string& precision = precisions[k];
      if (ours[precision].is_null()) continue;
      const double images_per_second = ours[precision].get<double>();
      const double g = gemm_flops(gemms) * images_per_second / batch / 1e9;
      gflops[precision] = g;
      fraction[precision] = g / rate_of[k];
      std::printf("  ours %s: best %.1f images/s, %.1f GFLOP/s = %.2f of the %s GEMM rate",
                  precision.c_str(), images_per_second, g, g / rate_of[k], precision.c_str());
      if (!theirs[precision].is_null()) {
        ratio[precision] = images_per_second / theirs[precision].get<double>();
        std::printf("; PyTorch best %.1f images/s; ours / PyTorch = %.2f",
                    theirs[precision].get<double>(), ratio[precision].get<double>());
      }
      std::printf("\n");
    }

    // 4. Forward only (optional): the engine's quantised evaluation and the evaluator's digital
    // path, the figures eval/sweep users know.
    nlohmann::json forward_figures = nlohmann::json::object();
    if (forward_too) {
      ForwardOptions eval;
      net.forward(images.data(), batch, eval);
      auto start = Clock::now();
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
      forward_figures = {{"engine_forward_images_per_second", forward_images},
                         {"evaluator_digital_images_per_second", digital_images}};
    }

    networks.push_back(nlohmann::json{
        {"network", arch.describe()},
        {"batch", batch},
        {"threads", thread_count},
        {"steps_per_round", steps},
        {"rounds", rounds},
        {"forward_mmac_per_image", macs / 1e6},
        {"sgemm_gflops", gemm_gflops},
        {"bf16_gemm_gflops", bf16 ? nlohmann::json(bf16_gemm_gflops) : nlohmann::json(nullptr)},
        {"train_images_per_second", ours},
        {"train_gemm_gflops", gflops},
        {"train_fraction_of_gemm_rate", fraction},
        {"pytorch_images_per_second", theirs},
        {"notes", notes},
        {"ratio_vs_pytorch", ratio},
        {"forward", forward_figures}});
  }  // depths
  if (!json_path.empty()) {
    const nlohmann::json j{{"batch", batch}, {"threads", thread_count}, {"networks", networks}};
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
