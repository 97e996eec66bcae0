#include "networks/resnet.h"

#include <algorithm>
#include <cmath>

#include "common/errors.h"

namespace cimsweep {
namespace {

constexpr float kBatchNormEps = 1e-5f;

// An activation tensor [n, c, h, w].
struct Activation {
  int n = 0, c = 0, h = 0, w = 0;
  std::vector<float> data;
  Activation() = default;
  Activation(int n_, int c_, int h_, int w_)
      : n(n_), c(c_), h(h_), w(w_), data(size_t(n_) * c_ * h_ * w_, 0.0f) {}
  size_t image_size() const { return size_t(c) * h * w; }
};

Activation run_conv(CimBackend& backend, const CimLayerSpec& spec, int layer, const Activation& x) {
  Activation y(x.n, spec.out_channels, spec.output_size(x.h, spec.kernel_h),
               spec.output_size(x.w, spec.kernel_w));
  if (x.n > 0) backend.run_layer(layer, x.data.data(), x.n, x.h, x.w, y.data.data());
  return y;
}

void relu(Activation& x) {
  for (float& v : x.data) v = v > 0.0f ? v : 0.0f;
}

Activation global_average_pool(const Activation& x) {
  Activation y(x.n, x.c, 1, 1);
  const int plane = x.h * x.w;
  for (int i = 0; i < x.n * x.c; ++i) {
    double sum = 0;
    for (int p = 0; p < plane; ++p) sum += x.data[size_t(i) * plane + p];
    y.data[i] = float(sum / plane);
  }
  return y;
}

// Option A: subsample by the stride, then zero channels before (`before` of them) and after.
Activation identity_shortcut(const Activation& x, int out_channels, int stride, int before) {
  const int oh = (x.h + stride - 1) / stride, ow = (x.w + stride - 1) / stride;
  Activation y(x.n, out_channels, oh, ow);
  for (int img = 0; img < x.n; ++img)
    for (int c = 0; c < x.c; ++c)
      for (int i = 0; i < oh; ++i)
        for (int j = 0; j < ow; ++j)
          y.data[((size_t(img) * out_channels + before + c) * oh + i) * ow + j] =
              x.data[((size_t(img) * x.c + c) * x.h + i * stride) * x.w + j * stride];
  return y;
}

Activation gather_images(const Activation& x, const std::vector<int>& which) {
  Activation y(int(which.size()), x.c, x.h, x.w);
  for (size_t k = 0; k < which.size(); ++k)
    std::copy_n(x.data.begin() + size_t(which[k]) * x.image_size(), x.image_size(),
                y.data.begin() + k * x.image_size());
  return y;
}

}  // namespace

void ResNetArch::validate() const {
  auto fail = [](const std::string& m) { throw UserError(m); };
  if (depth < 8 || (depth - 2) % 6 != 0)
    fail("architecture depth " + std::to_string(depth) +
         " is not 6n+2 (e.g. 20, 32, 44, 56, 110): fix cimsweep.arch in the model file");
  if (kernel < 1 || kernel % 2 == 0)
    fail("architecture kernel " + std::to_string(kernel) + " must be odd (1, 3, 5, 7)");
  if (width < 1) fail("architecture width must be at least 1");
  if (in_channels != 1 && in_channels != 3)
    fail("architecture in_channels " + std::to_string(in_channels) + " must be 1 or 3");
  if (input_height < 4 || input_width < 4) fail("architecture input_size must be at least 4×4");
  // Keeps the layer-size arithmetic (input + 2·pad, MACs) far from int overflow.
  if (input_height > 65535 || input_width > 65535)
    fail("architecture input_size " + std::to_string(input_height) + "×" +
         std::to_string(input_width) + " is larger than 65535×65535: fix cimsweep.arch");
  if (num_classes < 2) fail("architecture num_classes must be at least 2");
  if (shortcut != 'A' && shortcut != 'B') fail("architecture shortcut must be \"A\" or \"B\"");
  if (shortcut_padding != "split" && shortcut_padding != "after")
    fail("architecture shortcut_padding '" + shortcut_padding + "' must be \"split\" or \"after\"");
  for (int e : exits)
    if (e != 1 && e != 2) fail("architecture exits may only name stages 1 and 2");
  if (exit_head.type != "conv" && exit_head.type != "pool")
    fail("architecture exit_head type '" + exit_head.type + "' must be \"conv\" or \"pool\"");
  if (exit_head.kernel < 1 || exit_head.stride < 1 || exit_head.channels < 0)
    fail("architecture exit_head has a bad kernel, stride or channel count");
}

nlohmann::json ResNetArch::to_json() const {
  nlohmann::json j{{"family", "resnet-cifar"},
                   {"depth", depth},
                   {"kernel", kernel},
                   {"width", width},
                   {"in_channels", in_channels},
                   {"input_size", {input_height, input_width}},
                   {"num_classes", num_classes},
                   {"shortcut", std::string(1, shortcut)},
                   {"shortcut_padding", shortcut_padding},
                   {"exits", exits}};
  if (exit_head.type == "conv")
    j["exit_head"] = {{"type", "conv"},
                      {"kernel", exit_head.kernel},
                      {"stride", exit_head.stride},
                      {"channels", exit_head.channels}};
  else
    j["exit_head"] = {{"type", "pool"}};
  return j;
}

ResNetArch ResNetArch::from_json(const nlohmann::json& j) {
  ResNetArch a;
  try {
    if (!j.is_object()) throw UserError("cimsweep.arch is not a JSON object");
    const std::string family = j.value("family", std::string("resnet-cifar"));
    if (family != "resnet-cifar")
      throw UserError("unknown network family '" + family + "': cimsweep knows resnet-cifar");
    a.depth = j.at("depth").get<int>();
    a.kernel = j.value("kernel", 3);
    a.width = j.value("width", 16);
    a.in_channels = j.value("in_channels", 3);
    if (j.contains("input_size")) {
      a.input_height = j.at("input_size").at(0).get<int>();
      a.input_width = j.at("input_size").at(1).get<int>();
    }
    a.num_classes = j.value("num_classes", 10);
    const std::string shortcut = j.value("shortcut", std::string("A"));
    a.shortcut = shortcut.size() == 1 ? shortcut[0] : '?';
    a.shortcut_padding = j.value("shortcut_padding", std::string("split"));
    a.exits = j.value("exits", std::vector<int>{});
    if (j.contains("exit_head")) {
      const auto& h = j.at("exit_head");
      a.exit_head.type = h.value("type", std::string("conv"));
      a.exit_head.kernel = h.value("kernel", 3);
      a.exit_head.stride = h.value("stride", 2);
      a.exit_head.channels = h.value("channels", 0);
    }
  } catch (const nlohmann::json::exception& e) {
    throw UserError(std::string("cimsweep.arch has a missing or ill-typed field (") + e.what() +
                    "): see docs/model-format.md");
  }
  a.validate();
  return a;
}

std::string ResNetArch::describe() const {
  std::string s = "ResNet-" + std::to_string(depth) + " (kernel " + std::to_string(kernel) +
                  ", width " + std::to_string(width) + ", shortcut " + std::string(1, shortcut) +
                  ", input " + std::to_string(in_channels) + "×" + std::to_string(input_height) +
                  "×" + std::to_string(input_width) + ", " + std::to_string(num_classes) +
                  " classes";
  if (!exits.empty()) {
    s += ", exits after stage";
    for (size_t i = 0; i < exits.size(); ++i) s += (i ? ", " : " ") + std::to_string(exits[i]);
    s += " + final";
  }
  return s + ")";
}

const Tensor& ResNet::require(const std::string& name, const std::vector<int64_t>& shape) const {
  auto it = tensors_.find(name);
  if (it == tensors_.end())
    throw UserError(
        "model file lacks tensor '" + name + "' that " + arch_.describe() +
        " needs: check the architecture metadata or the tensor names (docs/model-format.md)");
  if (it->second.shape != shape) {
    // The needed shape comes from the file's metadata and may be huge: print it, never allocate it.
    Tensor needed;
    needed.shape = shape;
    throw UserError("tensor '" + name + "' has shape " + it->second.shape_string() + " but " +
                    arch_.describe() + " needs " + needed.shape_string() +
                    ": the weights do not match the architecture metadata");
  }
  return it->second;
}

ResNet::Norm ResNet::load_norm(const std::string& prefix, int channels) const {
  const Tensor& weight = require(prefix + ".weight", {channels});
  const Tensor& bias = require(prefix + ".bias", {channels});
  const Tensor& mean = require(prefix + ".running_mean", {channels});
  const Tensor& var = require(prefix + ".running_var", {channels});
  Norm norm;
  norm.scale.resize(channels);
  norm.shift.resize(channels);
  for (int c = 0; c < channels; ++c) {
    if (var.data[c] < 0)
      throw UserError("tensor '" + prefix +
                      ".running_var' has a negative variance: the model is corrupt");
    norm.scale[c] = weight.data[c] / std::sqrt(var.data[c] + kBatchNormEps);
    norm.shift[c] = bias.data[c] - mean.data[c] * norm.scale[c];
  }
  return norm;
}

int ResNet::add_cim_layer(const std::string& name, int out, int in, int kernel, int stride, int pad,
                          int in_h, int in_w, bool with_bias,
                          const std::map<std::string, float>& ranges) {
  CimLayerSpec spec;
  spec.name = name;
  spec.out_channels = out;
  spec.in_channels = in;
  spec.kernel_h = spec.kernel_w = kernel;
  spec.stride = stride;
  spec.pad = pad;
  const bool is_fc =
      name == "fc" || (name.size() > 3 && name.compare(name.size() - 3, 3, ".fc") == 0);
  spec.weight = is_fc ? require(name + ".weight", {out, in}).data.data()
                      : require(name + ".weight", {out, in, kernel, kernel}).data.data();
  const bool has_bias = tensors_.count(name + ".bias") > 0;
  if (with_bias || has_bias) spec.bias = require(name + ".bias", {out}).data.data();
  auto range = ranges.find(name);
  if (range == ranges.end())
    throw UserError("model has no input range for CIM layer '" + name +
                    "': add it to cimsweep.input_ranges (docs/model-format.md)");
  if (!(range->second > 0) || !std::isfinite(range->second))
    throw UserError("input range of layer '" + name + "' is " + std::to_string(range->second) +
                    ": it must be a positive number");
  spec.input_range = range->second;
  cim_layers_.push_back(spec);
  input_sizes_.push_back({in_h, in_w});
  return int(cim_layers_.size()) - 1;
}

ResNet::ResNet(const ResNetArch& arch, std::map<std::string, Tensor> tensors,
               const std::map<std::string, float>& input_ranges)
    : arch_(arch), tensors_(std::move(tensors)) {
  arch_.validate();
  const int k = arch_.kernel, pad = k / 2, n = arch_.blocks_per_stage();
  int h = arch_.input_height, w = arch_.input_width;
  stem_.layer =
      add_cim_layer("conv1", arch_.width, arch_.in_channels, k, 1, pad, h, w, false, input_ranges);
  stem_.norm = load_norm("bn1", arch_.width);
  int channels = arch_.width;
  for (int stage = 1; stage <= 3; ++stage) {
    const int out = arch_.width << (stage - 1);
    for (int b = 0; b < n; ++b) {
      const std::string prefix = "layer" + std::to_string(stage) + "." + std::to_string(b);
      Block block;
      block.in_channels = channels;
      block.out_channels = out;
      block.stride = (stage > 1 && b == 0) ? 2 : 1;
      block.conv1.layer = add_cim_layer(prefix + ".conv1", out, channels, k, block.stride, pad, h,
                                        w, false, input_ranges);
      block.conv1.norm = load_norm(prefix + ".bn1", out);
      const int in_h = h, in_w = w;
      h = cim_layers_[block.conv1.layer].output_size(h, k);
      w = cim_layers_[block.conv1.layer].output_size(w, k);
      block.conv2.layer =
          add_cim_layer(prefix + ".conv2", out, out, k, 1, pad, h, w, false, input_ranges);
      block.conv2.norm = load_norm(prefix + ".bn2", out);
      block.projection = arch_.shortcut == 'B' && (block.stride != 1 || channels != out);
      if (block.projection) {
        block.shortcut.layer = add_cim_layer(prefix + ".shortcut.conv", out, channels, 1,
                                             block.stride, 0, in_h, in_w, false, input_ranges);
        block.shortcut.norm = load_norm(prefix + ".shortcut.bn", out);
      }
      blocks_.push_back(block);
      channels = out;
    }
    if (std::find(arch_.exits.begin(), arch_.exits.end(), stage) != arch_.exits.end()) {
      const std::string prefix = "exit" + std::to_string(stage);
      Exit exit;
      exit.after_stage = stage;
      exit.has_conv = arch_.exit_head.type == "conv";
      int head_channels = channels;
      if (exit.has_conv) {
        head_channels = arch_.exit_head.channels > 0 ? arch_.exit_head.channels : channels;
        exit.conv.layer = add_cim_layer(prefix + ".conv", head_channels, channels,
                                        arch_.exit_head.kernel, arch_.exit_head.stride,
                                        arch_.exit_head.kernel / 2, h, w, false, input_ranges);
        exit.conv.norm = load_norm(prefix + ".bn", head_channels);
      }
      exit.fc = add_cim_layer(prefix + ".fc", arch_.num_classes, head_channels, 1, 1, 0, 1, 1, true,
                              input_ranges);
      exits_.push_back(exit);
    }
  }
  fc_ = add_cim_layer("fc", arch_.num_classes, channels, 1, 1, 0, 1, 1, true, input_ranges);
}

int64_t ResNet::parameter_count() const {
  int64_t count = 0;
  for (const auto& [name, tensor] : tensors_) {
    const bool buffer = name.find("running_") != std::string::npos ||
                        name.find("num_batches_tracked") != std::string::npos;
    if (!buffer) count += tensor.numel();
  }
  return count;
}

std::vector<int64_t> ResNet::layer_macs() const {
  std::vector<int64_t> macs;
  for (size_t i = 0; i < cim_layers_.size(); ++i) {
    const CimLayerSpec& s = cim_layers_[i];
    const int oh = s.output_size(input_sizes_[i].first, s.kernel_h);
    const int ow = s.output_size(input_sizes_[i].second, s.kernel_w);
    macs.push_back(int64_t(oh) * ow * s.out_channels * s.rows());
  }
  return macs;
}

std::vector<std::vector<float>> ResNet::forward(const float* images, int n, CimBackend& backend,
                                                const uint8_t* keep) const {
  const int classes = arch_.num_classes, per_stage = arch_.blocks_per_stage();
  Activation x(n, arch_.in_channels, arch_.input_height, arch_.input_width);
  std::copy_n(images, x.data.size(), x.data.begin());

  auto conv_norm = [&](const ConvNorm& cn, const Activation& in, bool with_relu) {
    Activation y = run_conv(backend, cim_layers_[cn.layer], cn.layer, in);
    const int plane = y.h * y.w;
    for (int img = 0; img < y.n; ++img)
      for (int c = 0; c < y.c; ++c) {
        float* p = y.data.data() + (size_t(img) * y.c + c) * plane;
        for (int i = 0; i < plane; ++i) {
          const float v = p[i] * cn.norm.scale[c] + cn.norm.shift[c];
          p[i] = with_relu && v < 0.0f ? 0.0f : v;
        }
      }
    return y;
  };
  auto classify = [&](int fc, const Activation& features) {
    Activation pooled = global_average_pool(features);
    Activation logits = run_conv(backend, cim_layers_[fc], fc, pooled);
    return logits.data;
  };
  auto shortcut = [&](const Block& block, const Activation& in) {
    if (block.projection) return conv_norm(block.shortcut, in, false);
    if (block.stride == 1 && block.in_channels == block.out_channels) return in;
    const int extra = block.out_channels - block.in_channels;
    return identity_shortcut(in, block.out_channels, block.stride,
                             arch_.shortcut_padding == "split" ? extra / 2 : 0);
  };
  auto residual_block = [&](const Block& block, const Activation& in) {
    Activation y = conv_norm(block.conv2, conv_norm(block.conv1, in, true), false);
    const Activation skip = shortcut(block, in);
    for (size_t i = 0; i < y.data.size(); ++i) y.data[i] += skip.data[i];
    relu(y);
    return y;
  };

  std::vector<std::vector<float>> logits;
  x = conv_norm(stem_, x, true);
  for (size_t b = 0; b < blocks_.size(); ++b) {
    const Block& block = blocks_[b];
    std::vector<int> kept;
    for (int img = 0; img < n; ++img)
      if (!keep || keep[size_t(img) * blocks_.size() + b]) kept.push_back(img);
    if (int(kept.size()) == n) {
      x = residual_block(block, x);
    } else {
      // Skipped images take the shortcut alone (BlockDrop); the block runs on the kept ones only.
      Activation y = shortcut(block, x);
      if (!kept.empty()) {
        const Activation computed = residual_block(block, gather_images(x, kept));
        for (size_t k = 0; k < kept.size(); ++k)
          std::copy_n(computed.data.begin() + k * computed.image_size(), computed.image_size(),
                      y.data.begin() + size_t(kept[k]) * y.image_size());
      }
      x = std::move(y);
    }
    const bool stage_end = (b + 1) % per_stage == 0;
    for (const Exit& exit : exits_) {
      if (!stage_end || int(b + 1) / per_stage != exit.after_stage) continue;
      logits.push_back(exit.has_conv ? classify(exit.fc, conv_norm(exit.conv, x, true))
                                     : classify(exit.fc, x));
    }
  }
  logits.push_back(classify(fc_, x));
  for (auto& l : logits) l.resize(size_t(n) * classes);
  return logits;
}

}  // namespace cimsweep
