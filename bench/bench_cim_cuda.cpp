// bench_cim_cuda: how fast is the CUDA CIM backend, against the dense fp16 tensor-core rate of the
// same GPU measured in the same run, and against the CPU backend on the same trial?
//
//  1. Baseline: one square cublasGemmEx (fp16 inputs and output, fp32 accumulation), best of 5.
//  2. ResNet-20/56/110 with random weights (He-normal, randomised batch norm, input ranges 4.0
//     except conv1 = 1.0) on random CIFAR-shaped 8-bit images, default CIM model, σ = 0.1 device
//     variation, ADC dynamic / fixed / ideal and the digital path, precision exact and fast.
//     Per mode: program_chip and the forward pass timed; images/s; seconds and trials/s for a
//     10,000-image chip (a CIFAR-10 test set); the FLOP floor of that trial, 2·ab·nc·MACs per
//     image at the measured fp16 rate, and the ratio of the measured time to it.
//  3. CPU backend on the first --cpu-images images of the same trial (one batch, both backends):
//     images/s ratio and logit agreement (max |Δ| / max |logit|, argmax agreement).
//  --dump-layer FILE: writes a small conv layer, its inputs and the CPU backend's outputs for
//  tools/cim_torch_baseline.py --check, then exits.
#include <cublas_v2.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <map>
#include <random>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "cuda/cuda_backend.h"
#include "cuda/device_info.h"
#include "common/cim_backend.h"
#include "common/cim_config.h"
#include "host/cpu/cim_cpu.h"
#include "common/errors.h"
#include "host/io/model_file.h"
#include "host/io/output_file.h"
#include "host/results/results.h"
#include "networks/resnet.h"
#include "bench/random_resnet.h"

using namespace cimsweep;
using Clock = std::chrono::steady_clock;
using nlohmann::json;
using cimsweep::bench::make_random_resnet;
using cimsweep::bench::RandomModel;

namespace {

constexpr double kTrialImages = 10000;  // one chip over CIFAR-10's test set

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(e));
}
void check(cublasStatus_t s, const char* what) {
  if (s != CUBLAS_STATUS_SUCCESS)
    throw std::runtime_error(std::string(what) + ": " + cublasGetStatusName(s));
}

// ---------------------------------------------------------------------------------------------
// 1. Dense fp16 tensor-core rate: C = A·B, size³, fp16 in and out, fp32 accumulation.

double fp16_gemm_tflops(int device, int size) {
  check(cudaSetDevice(device), "cudaSetDevice");
  const size_t count = size_t(size) * size;
  std::vector<__half> host(count);
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);  // not zeros: no power-gated shortcut
  for (__half& h : host) h = __float2half(u(rng));
  __half *a = nullptr, *b = nullptr, *c = nullptr;
  check(cudaMalloc(&a, count * sizeof(__half)), "cudaMalloc");
  check(cudaMalloc(&b, count * sizeof(__half)), "cudaMalloc");
  check(cudaMalloc(&c, count * sizeof(__half)), "cudaMalloc");
  check(cudaMemcpy(a, host.data(), count * sizeof(__half), cudaMemcpyHostToDevice), "copy");
  check(cudaMemcpy(b, host.data(), count * sizeof(__half), cudaMemcpyHostToDevice), "copy");
  cublasHandle_t handle;
  check(cublasCreate(&handle), "cublasCreate");
  const float one = 1.0f, zero = 0.0f;
  auto gemm = [&] {
    check(cublasGemmEx(handle, CUBLAS_OP_N, CUBLAS_OP_N, size, size, size, &one, a, CUDA_R_16F,
                       size, b, CUDA_R_16F, size, &zero, c, CUDA_R_16F, size, CUBLAS_COMPUTE_32F,
                       CUBLAS_GEMM_DEFAULT),
          "cublasGemmEx");
  };
  cudaEvent_t start, stop;
  check(cudaEventCreate(&start), "event");
  check(cudaEventCreate(&stop), "event");
  for (int i = 0; i < 3; ++i) gemm();  // warm-up, clocks up
  double best = 0;
  constexpr int kRepeats = 20;
  for (int rep = 0; rep < 5; ++rep) {
    check(cudaEventRecord(start), "record");
    for (int i = 0; i < kRepeats; ++i) gemm();
    check(cudaEventRecord(stop), "record");
    check(cudaEventSynchronize(stop), "sync");
    float ms = 0;
    check(cudaEventElapsedTime(&ms, start, stop), "elapsed");
    best = std::max(best, 2.0 * double(size) * size * size * kRepeats / (ms * 1e-3) * 1e-12);
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  cublasDestroy(handle);
  cudaFree(a);
  cudaFree(b);
  cudaFree(c);
  return best;
}

// ---------------------------------------------------------------------------------------------
// 2. A ResNet with random weights, written and read back as a model file.


struct Run {
  double calibration_s = 0, program_s = 0, forward_s = 0;
  std::vector<float> logits;  // final exit, all images
};

// One chip (trial 0 at σ) over `images` images in batches of config.batch_size, as TrialRunner.
Run run_chip(CimBackend& backend, const ResNet& net, const CimConfig& config, bool digital,
             double sigma, const std::vector<uint8_t>& pixels, int images) {
  const size_t per_image =
      size_t(net.arch().in_channels) * net.arch().input_height * net.arch().input_width;
  std::vector<float> batch;
  auto load = [&](int first, int count) {
    batch.resize(size_t(count) * per_image);
    for (size_t i = 0; i < batch.size(); ++i)
      batch[i] = pixels[size_t(first) * per_image + i] * (1.0f / 255.0f);
  };
  Run run;
  if (config.adc == AdcMode::kCalibrated && !digital) {
    const auto start = Clock::now();
    const int count = std::min(images, config.batch_size);
    load(0, count);
    calibrate_adc(backend, net, batch.data(), count);
    run.calibration_s = seconds_since(start);
  }
  backend.set_all_digital(digital);
  auto start = Clock::now();
  backend.program_chip(0, digital ? 0.0 : sigma);
  run.program_s = seconds_since(start);
  start = Clock::now();
  for (int first = 0, b = 0; first < images; first += config.batch_size, ++b) {
    const int count = std::min(config.batch_size, images - first);
    load(first, count);
    backend.begin_batch(uint32_t(b));
    const auto logits = net.forward(batch.data(), count, backend);
    run.logits.insert(run.logits.end(), logits.back().begin(), logits.back().end());
  }
  run.forward_s = seconds_since(start);
  return run;
}

// 3. Logit agreement between two runs of the same images.
json agreement(const std::vector<float>& a, const std::vector<float>& b, int classes) {
  double scale = 0, max_diff = 0;
  for (size_t i = 0; i < std::min(a.size(), b.size()); ++i) {
    scale = std::max(scale, double(std::fabs(b[i])));
    max_diff = std::max(max_diff, double(std::fabs(a[i] - b[i])));
  }
  size_t same = 0, images = std::min(a.size(), b.size()) / size_t(classes);
  for (size_t i = 0; i < images; ++i) {
    const float* ra = a.data() + i * classes;
    const float* rb = b.data() + i * classes;
    same += (std::max_element(ra, ra + classes) - ra) == (std::max_element(rb, rb + classes) - rb);
  }
  return {{"max_abs_diff_over_scale", scale > 0 ? max_diff / scale : 0.0},
          {"argmax_agreement", images ? double(same) / double(images) : 0.0},
          {"images", images}};
}

// --dump-layer: a small case for tools/cim_torch_baseline.py --check.
void dump_layer(const std::string& path, uint64_t seed) {
  std::mt19937 rng{uint32_t(seed)};
  CimLayerSpec spec;
  spec.name = "dump";
  spec.out_channels = 6;
  spec.in_channels = 20;
  spec.kernel_h = spec.kernel_w = 3;
  spec.pad = 1;
  spec.stride = 1;
  spec.input_range = 1.5f;
  const int n = 3, h = 6, w = 5;
  std::normal_distribution<float> normal(0.0f, 0.3f);
  std::uniform_real_distribution<float> uniform(-0.2f, 1.8f);
  std::vector<float> weight(size_t(spec.out_channels) * spec.rows()), bias(spec.out_channels),
      input(size_t(n) * spec.in_channels * h * w);
  for (float& v : weight) v = normal(rng);
  for (float& v : bias) v = normal(rng);
  for (float& v : input) v = uniform(rng);
  spec.weight = weight.data();
  spec.bias = bias.data();
  json cases = json::array();
  for (const char* adc : {"dynamic", "fixed", "ideal"})
    for (const char* mapping : {"kernel", "dense"})
      for (int rows : {128, 16}) {
        CimConfig config;
        config.adc = parse_adc_mode(adc);
        config.mapping = parse_mapping(mapping);
        config.subarray_rows = rows;
        CpuCimBackend cpu({spec}, config);
        cpu.program_chip(0, 0.0);
        cpu.begin_batch(0);
        std::vector<float> y(size_t(n) * spec.out_channels * h * w);
        cpu.run_layer(0, input.data(), n, h, w, y.data());
        cases.push_back({{"config", config.to_json()}, {"sigma", 0.0}, {"output", y}});
      }
  const json dump = {{"in_channels", spec.in_channels},
                     {"out_channels", spec.out_channels},
                     {"kernel", spec.kernel_h},
                     {"stride", spec.stride},
                     {"pad", spec.pad},
                     {"input_range", spec.input_range},
                     {"n", n},
                     {"h", h},
                     {"w", w},
                     {"weight", weight},
                     {"bias", bias},
                     {"input", input},
                     {"cases", cases}};
  write_output_file(path, dump.dump() + "\n", "benchmark report");
  std::printf("wrote %s (%zu cases)\n", path.c_str(), cases.size());
}

struct Options {
  std::vector<int> depths{20, 56, 110};
  int images = 2000, cpu_images = 50, device = 0, gemm_size = 8192;
  double sigma = 0.1;
  std::vector<std::string> precisions{"exact", "fast"};
  std::vector<std::string> modes{"dynamic", "fixed", "ideal", "digital"};
  uint64_t seed = 20240601;
  std::string json_path, dump_path;
};

}  // namespace

int main(int argc, char** argv) {
  Options o;
  CLI::App app{"bench_cim_cuda: CUDA CIM inference against the fp16 tensor-core rate of this GPU"};
  app.add_option("--depth", o.depths, "ResNet depths")->capture_default_str();
  app.add_option("--images", o.images, "images per timed chip (batches of 500)")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--cpu-images", o.cpu_images, "images of the CPU comparison (0: skip)")
      ->capture_default_str();
  app.add_option("--device", o.device, "GPU ordinal")->capture_default_str();
  app.add_option("--sigma", o.sigma, "conductance variation σ (device mode)")
      ->capture_default_str();
  app.add_option("--precision", o.precisions, "exact, fast")->delimiter(',')->capture_default_str();
  app.add_option("--modes", o.modes, "dynamic, fixed, calibrated, ideal, digital")
      ->delimiter(',')
      ->capture_default_str();
  app.add_option("--gemm-size", o.gemm_size, "size of the fp16 baseline GEMM")
      ->capture_default_str();
  app.add_option("--seed", o.seed, "weights and images")->capture_default_str();
  app.add_option("--json", o.json_path, "also write the figures to this JSON file");
  app.add_option("--dump-layer", o.dump_path,
                 "write a layer case for tools/cim_torch_baseline.py --check and exit");
  CLI11_PARSE(app, argc, argv);

  try {
    if (!o.dump_path.empty()) {
      dump_layer(o.dump_path, o.seed);
      return 0;
    }
    const std::string why = cuda_device_unusable_reason(o.device);
    if (!why.empty()) throw UserError("bench_cim_cuda needs a usable GPU: " + why);
    const CudaDeviceInfo info = cuda_device_info(o.device);
    json report;
    report["device"] = {
        {"name", info.name},
        {"compute_capability", std::to_string(info.major) + "." + std::to_string(info.minor)},
        {"total_bytes", info.total_bytes}};
    report["options"] = {
        {"depths", o.depths}, {"images", o.images},         {"cpu_images", o.cpu_images},
        {"sigma", o.sigma},   {"precisions", o.precisions}, {"modes", o.modes},
        {"seed", o.seed}};
    std::printf("bench_cim_cuda — cimsweep %s on %s\n", CIMSWEEP_VERSION, info.summary().c_str());

    const double tflops = fp16_gemm_tflops(o.device, o.gemm_size);
    std::printf("fp16 tensor-core GEMM %d³ (fp32 accumulation): %.1f TFLOP/s\n\n", o.gemm_size,
                tflops);
    report["fp16_gemm"] = {{"size", o.gemm_size}, {"tflops", tflops}};

    std::vector<uint8_t> pixels(size_t(std::max(o.images, o.cpu_images)) * 3 * 32 * 32);
    {
      std::mt19937_64 rng(o.seed);
      std::uniform_int_distribution<int> byte(0, 255);
      for (uint8_t& p : pixels) p = uint8_t(byte(rng));
    }
    json networks = json::array();
    for (int depth : o.depths) {
      const RandomModel model = make_random_resnet(depth, o.seed, "bench_cim_cuda");
      const ResNet& net = *model.loaded.network;
      const CimConfig defaults;
      const double work = 2.0 * defaults.input_bits * defaults.cells_per_weight() *
                          double(model.total_macs);  // FLOP per image
      const double floor_s = work * kTrialImages / (tflops * 1e12);
      std::printf(
          "== %s: %.2f MMAC/image, CIM work %.3f GFLOP/image; FLOP floor of a %.0f-image "
          "trial at %.0f TFLOP/s: %.3f s ==\n",
          net.arch().describe().c_str(), model.total_macs * 1e-6, work * 1e-9, kTrialImages, tflops,
          floor_s);
      std::printf("  %-9s %-8s %8s %9s %10s %12s %10s %9s %10s %10s\n", "precision", "mode",
                  "program", "forward", "images/s", "s per trial", "trials/s", "÷ floor", "× CPU",
                  "CPU logits");
      json runs = json::array();
      for (const std::string& precision : o.precisions) {
        for (const std::string& mode : o.modes) {
          const bool digital = mode == "digital";
          CimConfig config;
          if (!digital) config.adc = parse_adc_mode(mode);
          CudaBackendOptions options;
          options.precision = precision == "fast" ? CudaPrecision::kFast : CudaPrecision::kExact;
          CudaCimBackend gpu(o.device, net.cim_layers(), config, options);
          run_chip(gpu, net, config, digital, o.sigma, pixels, std::min(o.images, 500));  // warm-up
          const Run timed = run_chip(gpu, net, config, digital, o.sigma, pixels, o.images);
          const double images_per_s = o.images / timed.forward_s;
          const double trial_s = kTrialImages / images_per_s + timed.program_s;
          json cpu_json = nullptr;
          char speedup[32] = "-", logits[48] = "-";
          if (o.cpu_images > 0 && precision == o.precisions.front()) {
            CimConfig small = config;
            small.batch_size = std::min(config.batch_size, o.cpu_images);
            CpuCimBackend cpu(net.cim_layers(), small);
            CudaCimBackend gpu_small(o.device, net.cim_layers(), small, options);
            const Run c = run_chip(cpu, net, small, digital, o.sigma, pixels, o.cpu_images);
            const Run g = run_chip(gpu_small, net, small, digital, o.sigma, pixels, o.cpu_images);
            const double cpu_rate = o.cpu_images / c.forward_s;
            const json agree = agreement(g.logits, c.logits, net.arch().num_classes);
            std::snprintf(speedup, sizeof speedup, "%.0f", images_per_s / cpu_rate);
            std::snprintf(logits, sizeof logits, "%.1e/%.0f%%",
                          agree["max_abs_diff_over_scale"].get<double>(),
                          100 * agree["argmax_agreement"].get<double>());
            cpu_json = {{"images", o.cpu_images},
                        {"cpu_images_per_s", cpu_rate},
                        {"gpu_images_per_s_same_batch", o.cpu_images / g.forward_s},
                        {"logits", agree}};
          }
          std::printf("  %-9s %-8s %7.3fs %8.2fs %10.0f %12.3f %10.3f %9.1f %10s %10s\n",
                      precision.c_str(), mode.c_str(), timed.program_s, timed.forward_s,
                      images_per_s, trial_s, 1.0 / trial_s, digital ? 0.0 : trial_s / floor_s,
                      speedup, logits);
          runs.push_back(
              {{"precision", precision},
               {"mode", mode},
               {"sigma", digital ? 0.0 : o.sigma},
               {"images", o.images},
               {"calibration_s", timed.calibration_s},
               {"program_chip_s", timed.program_s},
               {"forward_s", timed.forward_s},
               {"images_per_s", images_per_s},
               {"seconds_per_10k_trial", trial_s},
               {"trials_per_s", 1.0 / trial_s},
               {"ratio_to_flop_floor", digital ? json(nullptr) : json(trial_s / floor_s)},
               {"cpu", cpu_json}});
        }
      }
      networks.push_back({{"arch", net.arch().to_json()},
                          {"macs_per_image", model.total_macs},
                          {"cim_work_flops_per_image", work},
                          {"flop_floor_s_per_10k_trial", floor_s},
                          {"runs", runs}});
      std::printf(
          "  (÷ floor: trial time over the FLOP floor; × CPU: GPU images/s over the CPU "
          "backend's on %d images; CPU logits: max |Δ|/max |logit| and argmax agreement)\n\n",
          o.cpu_images);
    }
    report["networks"] = networks;
    if (!o.json_path.empty()) {
      write_output_file(o.json_path, report.dump(2) + "\n", "benchmark report");
      std::printf("raw numbers written to %s\n", o.json_path.c_str());
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_cim_cuda: %s\n", e.what());
    return 1;
  }
  return 0;
}
