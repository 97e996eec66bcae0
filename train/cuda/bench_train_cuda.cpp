// Times training steps of a ResNet (CIFAR-10 shapes, random images and labels) on the CUDA path,
// against the PyTorch baseline tools/train_torch_baseline.py: forward of every exit, joint loss,
// backward, SGD, batch 128 by default. Prints one JSON line per configuration.
//
//   bench_train_cuda [--depth 20] [--batch 128] [--steps 100] [--warmup 10]
//                    [--precision fp32|mixed|both] [--qat on|off|both] [--cpu-steps 0]
//
// --cpu-steps N also times N steps of the CPU network on the same batches (for the speed-up).
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "train/cuda/network_cuda.h"
#include "train/cuda/train_ops.h"
#include "train/network.h"
#include "train/optimizer.h"

using namespace cimsweep;
using namespace cimsweep::train;
using Clock = std::chrono::steady_clock;

namespace {

double seconds_since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

}  // namespace

int main(int argc, char** argv) {
  int depth = 20, batch = 128, steps = 100, warmup = 10, cpu_steps = 0;
  std::string precision = "both", qat = "both";
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string key = argv[i], value = argv[i + 1];
    if (key == "--depth") depth = std::atoi(value.c_str());
    else if (key == "--batch") batch = std::atoi(value.c_str());
    else if (key == "--steps") steps = std::atoi(value.c_str());
    else if (key == "--warmup") warmup = std::atoi(value.c_str());
    else if (key == "--cpu-steps") cpu_steps = std::atoi(value.c_str());
    else if (key == "--precision") precision = value;
    else if (key == "--qat") qat = value;
    else {
      std::fprintf(stderr, "unknown option %s\n", key.c_str());
      return 2;
    }
  }
  const std::string why = gpu::unavailable_reason(0);
  if (!why.empty()) {
    std::fprintf(stderr, "bench_train_cuda: no GPU for the CUDA training path: %s\n", why.c_str());
    return 77;
  }
  ResNetArch arch;
  arch.depth = depth;
  arch.in_channels = 3;
  arch.input_height = arch.input_width = 32;
  arch.num_classes = 10;
  std::mt19937 rng(1);
  std::uniform_real_distribution<float> u(0.0f, 1.0f);
  const size_t per_image = size_t(3) * 32 * 32;
  std::vector<float> images(per_image * size_t(batch));
  std::vector<int32_t> labels(static_cast<size_t>(batch));
  for (float& v : images) v = u(rng);
  for (int32_t& l : labels) l = int32_t(rng() % 10u);

  std::vector<gpu::Precision> precisions;
  if (precision != "mixed") precisions.push_back(gpu::Precision::kFp32);
  if (precision != "fp32") precisions.push_back(gpu::Precision::kMixed);
  std::vector<bool> quants;
  if (qat != "on") quants.push_back(false);
  if (qat != "off") quants.push_back(true);
  SgdSettings sgd;
  for (const gpu::Precision p : precisions)
    for (const bool quant : quants) {
      TrainableResNet net(arch);
      net.initialise(1);
      for (const std::string& layer : net.cim_layer_names())
        net.set_input_range(layer, layer == "conv1" ? 1.0f : 2.0f);
      gpu::CudaTrainOps ops(0, p);
      gpu::CudaResNet gnet(net, ops);
      gpu::DeviceVector<int32_t> labels_d(labels);
      ForwardOptions o;
      o.training = true;
      o.quant.enabled = quant;
      double loss = 0;
      auto step = [&] {
        // A fresh upload per step, as the trainer would send each augmented batch.
        std::vector<gpu::DeviceMap> logits = gnet.forward(images.data(), batch, o);
        std::vector<gpu::DeviceMap> dlogits(logits.size());
        loss = 0;
        for (size_t e = 0; e < logits.size(); ++e)
          loss += ops.softmax_cross_entropy(logits[e], labels_d.data(), 1.0f, dlogits[e], nullptr);
        gnet.backward(dlogits);
        gnet.sgd_step(sgd, 0.01);
      };
      for (int i = 0; i < warmup; ++i) step();
      ops.synchronize();
      const auto start = Clock::now();
      for (int i = 0; i < steps; ++i) step();
      ops.synchronize();
      const double seconds = seconds_since(start);
      double cpu_ips = 0;
      if (cpu_steps > 0) {
        TrainableResNet cpu(arch);
        cpu.initialise(1);
        const auto cpu_start = Clock::now();
        for (int i = 0; i < cpu_steps; ++i) {
          const auto logits = cpu.forward(images.data(), batch, o);
          std::vector<FeatureMap> dl(logits.size());
          for (size_t e = 0; e < logits.size(); ++e)
            softmax_cross_entropy(logits[e], labels.data(), 1.0f, dl[e], nullptr);
          cpu.backward(dl);
          sgd_step(cpu.parameters(), sgd, 0.01);
        }
        cpu_ips = double(cpu_steps) * batch / seconds_since(cpu_start);
      }
      const double ips = double(steps) * batch / seconds;
      std::printf(
          "{\"depth\": %d, \"batch\": %d, \"precision\": \"%s\", \"qat\": %s, \"steps\": %d, "
          "\"seconds\": %.4f, \"images_per_second\": %.1f, \"epoch_seconds_50k\": %.2f, "
          "\"last_loss\": %.5f, \"cpu_images_per_second\": %.1f}\n",
          depth, batch, gpu::to_string(p).c_str(), quant ? "true" : "false", steps, seconds, ips,
          50000.0 / ips, loss, cpu_ips);
      std::fflush(stdout);
    }
  return 0;
}
