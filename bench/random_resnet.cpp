#include "bench/random_resnet.h"

#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <map>
#include <random>

#include "common/tensor.h"
#include "networks/resnet.h"

namespace cimsweep::bench {

RandomModel make_random_resnet(int depth, uint64_t seed, const std::string& tag) {
  ResNetArch arch;  // 32×32×3, width 16, kernel 3, 10 classes, shortcut A
  arch.depth = depth;
  return make_random_resnet(arch, seed, tag);
}

RandomModel make_random_resnet(const ResNetArch& arch, uint64_t seed, const std::string& tag) {
  arch.validate();
  const int depth = arch.depth;
  std::mt19937_64 rng(seed + uint64_t(depth));
  std::map<std::string, Tensor> tensors;
  std::map<std::string, float> ranges;
  auto conv = [&](const std::string& name, int out, int in, int k, float range) {
    Tensor w({out, in, k, k});
    std::normal_distribution<float> he(0.0f, std::sqrt(2.0f / float(in * k * k)));
    for (float& v : w.data) v = he(rng);
    tensors[name + ".weight"] = std::move(w);
    ranges[name] = range;
  };
  auto norm = [&](const std::string& name, int channels) {
    Tensor gamma({channels}), beta({channels}), mean({channels}), var({channels});
    std::uniform_real_distribution<float> scale(0.5f, 1.5f), variance(0.5f, 2.0f);
    std::normal_distribution<float> shift(0.0f, 0.2f);
    for (int c = 0; c < channels; ++c) {
      gamma.data[c] = scale(rng);
      beta.data[c] = shift(rng);
      mean.data[c] = shift(rng);
      var.data[c] = variance(rng);
    }
    tensors[name + ".weight"] = std::move(gamma);
    tensors[name + ".bias"] = std::move(beta);
    tensors[name + ".running_mean"] = std::move(mean);
    tensors[name + ".running_var"] = std::move(var);
  };
  const int k = arch.kernel;
  conv("conv1", arch.width, arch.in_channels, k, 1.0f);
  norm("bn1", arch.width);
  int channels = arch.width;
  for (int stage = 1; stage <= 3; ++stage) {
    const int out = arch.width << (stage - 1);
    for (int b = 0; b < arch.blocks_per_stage(); ++b) {
      const std::string prefix = "layer" + std::to_string(stage) + "." + std::to_string(b);
      conv(prefix + ".conv1", out, channels, k, 4.0f);
      norm(prefix + ".bn1", out);
      conv(prefix + ".conv2", out, out, k, 4.0f);
      norm(prefix + ".bn2", out);
      channels = out;
    }
  }
  Tensor fc({arch.num_classes, channels}), fc_bias({arch.num_classes});
  std::normal_distribution<float> he(0.0f, std::sqrt(2.0f / float(channels))), small(0.0f, 0.01f);
  for (float& v : fc.data) v = he(rng);
  for (float& v : fc_bias.data) v = small(rng);
  tensors["fc.weight"] = std::move(fc);
  tensors["fc.bias"] = std::move(fc_bias);
  ranges["fc"] = 4.0f;

  const std::filesystem::path path =
      std::filesystem::temp_directory_path() /
      (tag + "_" + std::to_string(getpid()) + "_resnet" + std::to_string(depth) + ".safetensors");
  save_model(path.string(), arch, tensors, ranges, {{tag + ".seed", std::to_string(seed)}});
  RandomModel model;
  model.loaded = load_model(path.string());
  std::filesystem::remove(path);
  model.macs = model.loaded.network->layer_macs();
  for (int64_t m : model.macs) model.total_macs += m;
  return model;
}

}  // namespace cimsweep::bench
