#include "train/network.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <random>

#include "common/errors.h"
#include "kernels/noise.h"

namespace cimsweep::train {
namespace {

// Noise-aware training draws its weight noise from a Philox stream that no chip uses.
constexpr uint32_t kTrainingNoiseStream = 2;

// A standard normal from a 64-bit engine through the inverse CDF (kernels/noise.h), so that the
// initial weights do not depend on the standard library's distribution algorithms.
double standard_normal(std::mt19937_64& rng) {
  const double p = (double(rng() >> 11) + 0.5) * (1.0 / 9007199254740992.0);
  return cim::normal_quantile(p);
}

double uniform(std::mt19937_64& rng, double lo, double hi) {
  return lo + (hi - lo) * (double(rng() >> 11) * (1.0 / 9007199254740992.0));
}

// The images `which` of x (in that order), as a batch of their own.
FeatureMap gather_images(const FeatureMap& x, const std::vector<int>& which) {
  FeatureMap out(x.channels, int(which.size()), x.height, x.width);
  const size_t plane = x.plane();
  for (int c = 0; c < x.channels; ++c)
    for (size_t k = 0; k < which.size(); ++k)
      std::copy_n(x.data.begin() + (size_t(c) * x.images + size_t(which[k])) * plane, plane,
                  out.data.begin() + (size_t(c) * out.images + k) * plane);
  return out;
}

// Image k of `part` replaces image which[k] of `into`.
void scatter_images(const FeatureMap& part, const std::vector<int>& which, FeatureMap& into) {
  const size_t plane = into.plane();
  for (int c = 0; c < into.channels; ++c)
    for (size_t k = 0; k < which.size(); ++k)
      std::copy_n(part.data.begin() + (size_t(c) * part.images + k) * plane, plane,
                  into.data.begin() + (size_t(c) * into.images + size_t(which[k])) * plane);
}

// One CIM layer (conv or FC) with its fake quantisers.
struct CimConv {
  int index = -1;  // forward-order number (keys the training noise)
  std::string name;
  ConvGeometry geometry;
  int weight = -1, bias = -1, range = -1;  // parameter indices

  // Kept by a training forward pass for backward().
  FeatureMap input_used;        // the input as the GEMM read it (quantised when QAT is on)
  std::vector<uint8_t> region;  // where each input fell relative to [0, a_max]
  std::vector<float> weight_used;
  std::vector<float> weight_factor;  // d weight_used / d weight: STE pass × (1 + σz)
  bool quantised = false;
  ConvPrecision precision = ConvPrecision::kFp32;  // the forward pass's, for backward()

  FeatureMap forward(const FeatureMap& x, const ForwardOptions& o, std::vector<Parameter>& p,
                     bool training) {
    if (o.observe_input) o.observe_input(index, x.data.data(), x.size());
    const Parameter& w = p[weight];
    const size_t count = w.value.size();
    quantised = o.quant.enabled;
    FeatureMap input;
    weight_used.resize(count);
    std::vector<uint8_t> pass;
    if (quantised) {
      input = FeatureMap(x.channels, x.images, x.height, x.width);
      region.resize(training ? x.size() : 0);
      quantise_inputs(x.data.data(), x.size(), p[range].value[0], o.quant.input_bits,
                      input.data.data(), training ? region.data() : nullptr);
      if (training) pass.resize(count);
      quantise_weights(w.value.data(), count, geometry.rows(), o.quant.weight_bits, o.quant.scaling,
                       weight_used.data(), training ? pass.data() : nullptr);
    } else {
      input = x;
      std::copy(w.value.begin(), w.value.end(), weight_used.begin());
    }
    weight_factor.clear();
    if (training) {
      weight_factor.assign(count, 1.0f);
      if (!pass.empty())
        for (size_t i = 0; i < count; ++i) weight_factor[i] = pass[i];
      if (o.noise_sigma > 0) {
        const cim::NoiseKey key{o.noise_seed, uint32_t(o.noise_step)};
        const uint32_t read = uint32_t(o.noise_step >> 32);
        for (size_t group = 0; group * 4 < count; ++group) {
          float z[4];
          cim::normal4(key, uint32_t(index), kTrainingNoiseStream, group, read, z);
          for (size_t i = group * 4; i < std::min(count, group * 4 + 4); ++i) {
            const float factor = 1.0f + o.noise_sigma * z[i - group * 4];
            weight_used[i] *= factor;
            weight_factor[i] *= factor;
          }
        }
      }
    }
    const float* bias_values = bias >= 0 ? p[bias].value.data() : nullptr;
    precision = o.precision;
    FeatureMap y = conv_forward(geometry, weight_used.data(), bias_values, input, precision);
    if (training)
      input_used = std::move(input);
    else
      input_used = FeatureMap();
    return y;
  }

  // Returns dx when need_dx (else an empty map); writes the weight, bias and range gradients.
  FeatureMap backward(const FeatureMap& dy, bool need_dx, std::vector<Parameter>& p) {
    Parameter& w = p[weight];
    w.grad.resize(w.value.size());
    float* dbias = nullptr;
    if (bias >= 0) {
      p[bias].grad.resize(p[bias].value.size());
      dbias = p[bias].grad.data();
    }
    const bool range_learns = quantised && range >= 0 && p[range].trainable;
    FeatureMap d_input;
    conv_backward(geometry, weight_used.data(), input_used, dy,
                  need_dx || range_learns ? &d_input : nullptr, w.grad.data(), dbias, precision);
    for (size_t i = 0; i < weight_factor.size(); ++i) w.grad[i] *= weight_factor[i];
    if (!quantised) return d_input;
    FeatureMap dx(d_input.channels, d_input.images, d_input.height, d_input.width);
    if (!need_dx && !range_learns) return dx;
    double d_range = 0;
    quantise_inputs_backward(d_input.data.data(), region.data(), d_input.size(), dx.data.data(),
                             range_learns ? &d_range : nullptr);
    if (range_learns) p[range].grad.assign(1, float(d_range));
    return need_dx ? dx : FeatureMap();
  }
};

struct Norm {
  std::string name;
  int gamma = -1, beta = -1;
  std::vector<float> running_mean, running_var;
  BatchNormCache cache;

  void forward(FeatureMap& x, const std::vector<Parameter>& p, bool training, bool update) {
    if (training) {
      batchnorm_train_forward(p[gamma].value.data(), p[beta].value.data(), x, cache,
                              update ? running_mean.data() : nullptr,
                              update ? running_var.data() : nullptr);
    } else {
      batchnorm_eval_forward(p[gamma].value.data(), p[beta].value.data(), running_mean.data(),
                             running_var.data(), x);
    }
  }
  void backward(FeatureMap& dy, std::vector<Parameter>& p) {
    p[gamma].grad.resize(p[gamma].value.size());
    p[beta].grad.resize(p[beta].value.size());
    batchnorm_backward(p[gamma].value.data(), cache, dy, p[gamma].grad.data(), p[beta].grad.data());
  }
};

struct Block {
  int in_channels = 0, out_channels = 0, stride = 1;
  CimConv conv1, conv2;
  Norm bn1, bn2;
  bool projection = false;  // option B where the shape changes
  CimConv shortcut_conv;
  Norm shortcut_norm;
  int padding_before = 0;     // option A: zero channels before the identity channels
  FeatureMap hidden, output;  // post-ReLU activations (kept images only), for backward
  int input_height = 0, input_width = 0;
  // The last forward's images that ran the residual branch (a keep mask's 1s); all_kept: every
  // image did, and the batch was not split.
  bool all_kept = true;
  std::vector<int> kept;

  bool identity() const { return stride == 1 && in_channels == out_channels; }
};

struct Exit {
  int after_stage = 0;
  bool has_conv = false;
  CimConv conv;
  Norm norm;
  CimConv fc;
  FeatureMap head;  // post-ReLU output of the head's conv (or the stage output's shape)
  int pooled_height = 0, pooled_width = 0;
};

}  // namespace

struct TrainableResNet::Modules {
  CimConv stem;
  Norm stem_norm;
  FeatureMap stem_output;
  std::vector<Block> blocks;
  std::vector<Exit> exits;
  CimConv fc;
  int final_height = 0, final_width = 0;
  std::vector<CimConv*> cim_layers;  // forward order
  std::vector<Norm*> norms;
  bool trained = false, frozen = false;  // what the last forward() did
};

TrainableResNet::TrainableResNet(const ResNetArch& arch)
    : arch_(arch), modules_(std::make_unique<Modules>()) {
  arch_.validate();
  // Threads split the convolutions into fixed chunks and each chunk's GEMM must run on its own
  // thread only: results then do not depend on the thread count.
  openblas_set_num_threads(1);
  Modules& m = *modules_;
  auto add_parameter = [&](const std::string& name, std::vector<int64_t> shape, bool decay,
                           bool backbone) {
    Parameter p;
    p.name = name;
    p.shape = std::move(shape);
    p.value.assign(size_t(Tensor::element_count(p.shape)), 0.0f);
    p.grad.assign(p.value.size(), 0.0f);
    p.momentum.assign(p.value.size(), 0.0f);
    p.weight_decay = decay;
    p.backbone = backbone;
    parameters_.push_back(std::move(p));
    return int(parameters_.size()) - 1;
  };
  auto make_conv = [&](CimConv& conv, const std::string& name, int out, int in, int kernel,
                       int stride, int pad, bool is_fc, bool backbone) {
    conv.name = name;
    conv.geometry = ConvGeometry{in, out, kernel, stride, pad};
    conv.weight = is_fc
                      ? add_parameter(name + ".weight", {out, in}, true, backbone)
                      : add_parameter(name + ".weight", {out, in, kernel, kernel}, true, backbone);
    if (is_fc) conv.bias = add_parameter(name + ".bias", {out}, false, backbone);
    conv.range = add_parameter(name + ".input_range", {1}, false, backbone);
    parameters_[conv.range].value[0] = 1.0f;
    parameters_[conv.range].trainable = false;
  };
  auto make_norm = [&](Norm& norm, const std::string& name, int channels, bool backbone) {
    norm.name = name;
    norm.gamma = add_parameter(name + ".weight", {channels}, false, backbone);
    norm.beta = add_parameter(name + ".bias", {channels}, false, backbone);
    norm.running_mean.assign(channels, 0.0f);
    norm.running_var.assign(channels, 1.0f);
  };

  const int k = arch_.kernel, pad = k / 2, n = arch_.blocks_per_stage();
  int h = arch_.input_height, w = arch_.input_width;
  make_conv(m.stem, "conv1", arch_.width, arch_.in_channels, k, 1, pad, false, true);
  make_norm(m.stem_norm, "bn1", arch_.width, true);
  m.cim_layers.push_back(&m.stem);
  m.norms.push_back(&m.stem_norm);
  m.blocks.resize(size_t(3 * n));
  m.exits.reserve(arch_.exits.size());
  int channels = arch_.width;
  for (int stage = 1; stage <= 3; ++stage) {
    const int out = arch_.width << (stage - 1);
    for (int b = 0; b < n; ++b) {
      Block& block = m.blocks[size_t((stage - 1) * n + b)];
      const std::string prefix = "layer" + std::to_string(stage) + "." + std::to_string(b);
      block.in_channels = channels;
      block.out_channels = out;
      block.stride = (stage > 1 && b == 0) ? 2 : 1;
      make_conv(block.conv1, prefix + ".conv1", out, channels, k, block.stride, pad, false, true);
      make_norm(block.bn1, prefix + ".bn1", out, true);
      make_conv(block.conv2, prefix + ".conv2", out, out, k, 1, pad, false, true);
      make_norm(block.bn2, prefix + ".bn2", out, true);
      m.cim_layers.push_back(&block.conv1);
      m.cim_layers.push_back(&block.conv2);
      m.norms.push_back(&block.bn1);
      m.norms.push_back(&block.bn2);
      block.projection = arch_.shortcut == 'B' && !block.identity();
      if (block.projection) {
        make_conv(block.shortcut_conv, prefix + ".shortcut.conv", out, channels, 1, block.stride, 0,
                  false, true);
        make_norm(block.shortcut_norm, prefix + ".shortcut.bn", out, true);
        m.cim_layers.push_back(&block.shortcut_conv);
        m.norms.push_back(&block.shortcut_norm);
      }
      block.padding_before = arch_.shortcut_padding == "split" ? (out - channels) / 2 : 0;
      h = block.conv1.geometry.output_size(h);
      w = block.conv1.geometry.output_size(w);
      channels = out;
    }
    if (std::find(arch_.exits.begin(), arch_.exits.end(), stage) != arch_.exits.end()) {
      const std::string prefix = "exit" + std::to_string(stage);
      m.exits.emplace_back();
      Exit& exit = m.exits.back();
      exit.after_stage = stage;
      exit.has_conv = arch_.exit_head.type == "conv";
      int head_channels = channels;
      if (exit.has_conv) {
        head_channels = arch_.exit_head.channels > 0 ? arch_.exit_head.channels : channels;
        make_conv(exit.conv, prefix + ".conv", head_channels, channels, arch_.exit_head.kernel,
                  arch_.exit_head.stride, arch_.exit_head.kernel / 2, false, false);
        make_norm(exit.norm, prefix + ".bn", head_channels, false);
        m.cim_layers.push_back(&exit.conv);
        m.norms.push_back(&exit.norm);
      }
      make_conv(exit.fc, prefix + ".fc", arch_.num_classes, head_channels, 1, 1, 0, true, false);
      m.cim_layers.push_back(&exit.fc);
    }
  }
  make_conv(m.fc, "fc", arch_.num_classes, channels, 1, 1, 0, true, true);
  m.cim_layers.push_back(&m.fc);
  for (size_t i = 0; i < m.cim_layers.size(); ++i) {
    m.cim_layers[i]->index = int(i);
    cim_layer_names_.push_back(m.cim_layers[i]->name);
  }
}

TrainableResNet::~TrainableResNet() = default;

void TrainableResNet::initialise(uint64_t seed) {
  std::mt19937_64 rng(seed);
  for (CimConv* conv : modules_->cim_layers) {
    Parameter& w = parameters_[conv->weight];
    const ConvGeometry& g = conv->geometry;
    const bool is_fc = conv->bias >= 0;
    if (is_fc) {
      const double bound = 1.0 / std::sqrt(double(g.in_channels));
      for (float& v : w.value) v = float(uniform(rng, -bound, bound));
      for (float& v : parameters_[conv->bias].value) v = float(uniform(rng, -bound, bound));
    } else {
      const double stddev = std::sqrt(2.0 / (double(g.out_channels) * g.kernel * g.kernel));
      for (float& v : w.value) v = float(stddev * standard_normal(rng));
    }
  }
  for (Norm* norm : modules_->norms) {
    std::fill(parameters_[norm->gamma].value.begin(), parameters_[norm->gamma].value.end(), 1.0f);
    std::fill(parameters_[norm->beta].value.begin(), parameters_[norm->beta].value.end(), 0.0f);
    std::fill(norm->running_mean.begin(), norm->running_mean.end(), 0.0f);
    std::fill(norm->running_var.begin(), norm->running_var.end(), 1.0f);
  }
  for (Parameter& p : parameters_) std::fill(p.momentum.begin(), p.momentum.end(), 0.0f);
}

Parameter& TrainableResNet::parameter(const std::string& name) {
  for (Parameter& p : parameters_)
    if (p.name == name) return p;
  throw std::out_of_range("no parameter '" + name + "'");
}

std::map<std::string, float> TrainableResNet::input_ranges() const {
  std::map<std::string, float> ranges;
  for (const CimConv* conv : modules_->cim_layers)
    ranges[conv->name] = parameters_[conv->range].value[0];
  return ranges;
}

void TrainableResNet::set_input_range(const std::string& layer, float a_max) {
  for (CimConv* conv : modules_->cim_layers)
    if (conv->name == layer) {
      parameters_[conv->range].value[0] = a_max;
      return;
    }
  throw std::out_of_range("no CIM layer '" + layer + "'");
}

void TrainableResNet::set_ranges_trainable(bool on) {
  for (CimConv* conv : modules_->cim_layers)
    parameters_[conv->range].trainable = on && conv != &modules_->stem;
}

void TrainableResNet::clamp_input_ranges(float minimum) {
  for (CimConv* conv : modules_->cim_layers) {
    float& a_max = parameters_[conv->range].value[0];
    a_max = std::max(a_max, minimum);
  }
}

std::map<std::string, Tensor> TrainableResNet::export_tensors() const {
  std::map<std::string, Tensor> tensors;
  for (const Parameter& p : parameters_) {
    if (p.shape == std::vector<int64_t>{1} && p.name.size() > 12 &&
        p.name.compare(p.name.size() - 12, 12, ".input_range") == 0)
      continue;  // ranges go to the metadata
    Tensor t(p.shape);
    t.data = p.value;
    tensors[p.name] = std::move(t);
  }
  for (const Norm* norm : modules_->norms) {
    const int64_t c = int64_t(norm->running_mean.size());
    Tensor mean({c}), var({c});
    mean.data = norm->running_mean;
    var.data = norm->running_var;
    tensors[norm->name + ".running_mean"] = std::move(mean);
    tensors[norm->name + ".running_var"] = std::move(var);
  }
  return tensors;
}

std::vector<std::string> TrainableResNet::import_tensors(
    const std::map<std::string, Tensor>& tensors) {
  std::vector<std::string> missing;
  auto copy = [&](const std::string& name, const std::vector<int64_t>& shape,
                  std::vector<float>& into) {
    auto it = tensors.find(name);
    if (it == tensors.end()) {
      missing.push_back(name);
      return;
    }
    if (it->second.shape != shape)
      throw UserError("tensor '" + name + "' has shape " + it->second.shape_string() +
                      " but this network needs " + Tensor(shape).shape_string() +
                      ": use the same --depth, --kernel, --width and data as that model");
    into = it->second.data;
  };
  const std::map<std::string, Tensor> ours = export_tensors();
  for (Parameter& p : parameters_)
    if (ours.count(p.name)) copy(p.name, p.shape, p.value);
  for (Norm* norm : modules_->norms) {
    const std::vector<int64_t> shape{int64_t(norm->running_mean.size())};
    copy(norm->name + ".running_mean", shape, norm->running_mean);
    copy(norm->name + ".running_var", shape, norm->running_var);
  }
  return missing;
}

std::vector<FeatureMap> TrainableResNet::forward(const float* images, int n,
                                                 const ForwardOptions& o) {
  Modules& m = *modules_;
  std::vector<Parameter>& p = parameters_;
  const bool backbone_training = o.training && !o.frozen_backbone;
  const bool update = o.update_running_stats;
  m.trained = o.training;
  m.frozen = o.frozen_backbone;

  auto conv_norm = [&](CimConv& conv, Norm& norm, const FeatureMap& in, bool training) {
    FeatureMap y = conv.forward(in, o, p, training);
    norm.forward(y, p, training, update);
    return y;
  };

  FeatureMap x = from_images(images, n, arch_.in_channels, arch_.input_height, arch_.input_width);
  x = conv_norm(m.stem, m.stem_norm, x, backbone_training);
  relu_forward(x);
  m.stem_output = backbone_training ? x : FeatureMap();

  std::vector<FeatureMap> logits;
  const int per_stage = arch_.blocks_per_stage();
  size_t next_exit = 0;
  for (size_t b = 0; b < m.blocks.size(); ++b) {
    Block& block = m.blocks[b];
    const bool training = backbone_training;
    block.input_height = x.height;
    block.input_width = x.width;
    block.kept.clear();
    for (int img = 0; img < n; ++img)
      if (!o.keep || o.keep[size_t(img) * m.blocks.size() + b]) block.kept.push_back(img);
    block.all_kept = int(block.kept.size()) == n;
    FeatureMap skip;
    if (block.projection)
      skip = conv_norm(block.shortcut_conv, block.shortcut_norm, x, training);
    else if (!block.identity())
      skip = shortcut_a_forward(x, block.out_channels, block.stride, block.padding_before);
    const FeatureMap& shortcut = block.projection || !block.identity() ? skip : x;
    FeatureMap y;
    if (block.kept.empty()) {
      y = shortcut;
      block.hidden = FeatureMap();
      block.output = FeatureMap();
    } else {
      const FeatureMap kept_input = block.all_kept ? FeatureMap() : gather_images(x, block.kept);
      FeatureMap hidden =
          conv_norm(block.conv1, block.bn1, block.all_kept ? x : kept_input, training);
      relu_forward(hidden);
      FeatureMap residual = conv_norm(block.conv2, block.bn2, hidden, training);
      block.hidden = training ? std::move(hidden) : FeatureMap();
      const FeatureMap kept_shortcut =
          block.all_kept ? FeatureMap() : gather_images(shortcut, block.kept);
      const FeatureMap& added = block.all_kept ? shortcut : kept_shortcut;
      for (size_t i = 0; i < residual.size(); ++i) residual.data[i] += added.data[i];
      relu_forward(residual);
      block.output = training ? residual : FeatureMap();
      if (block.all_kept) {
        y = std::move(residual);
      } else {
        // Skipped images take the shortcut alone, without the block's ReLU (BlockDrop).
        y = shortcut;
        scatter_images(residual, block.kept, y);
      }
    }
    x = std::move(y);

    const bool stage_end = (int(b) + 1) % per_stage == 0;
    if (stage_end && next_exit < m.exits.size() &&
        m.exits[next_exit].after_stage == (int(b) + 1) / per_stage) {
      Exit& exit = m.exits[next_exit++];
      FeatureMap head = x;
      if (exit.has_conv) {
        head = conv_norm(exit.conv, exit.norm, x, o.training);
        relu_forward(head);
      }
      exit.pooled_height = head.height;
      exit.pooled_width = head.width;
      logits.push_back(exit.fc.forward(global_average_pool(head), o, p, o.training));
      exit.head = o.training && exit.has_conv ? std::move(head) : FeatureMap();
    }
  }
  m.final_height = x.height;
  m.final_width = x.width;
  logits.push_back(m.fc.forward(global_average_pool(x), o, p, backbone_training));
  return logits;
}

void TrainableResNet::backward(const std::vector<FeatureMap>& dlogits) {
  Modules& m = *modules_;
  std::vector<Parameter>& p = parameters_;
  if (!m.trained) throw std::logic_error("backward() needs a training forward() first");
  if (dlogits.size() != m.exits.size() + 1)
    throw std::logic_error("backward() needs one logits gradient per exit");
  for (Parameter& param : p) std::fill(param.grad.begin(), param.grad.end(), 0.0f);
  const bool backbone = !m.frozen;

  FeatureMap dx;
  if (backbone)
    dx = global_average_pool_backward(m.fc.backward(dlogits.back(), true, p), m.final_height,
                                      m.final_width);
  const int per_stage = arch_.blocks_per_stage();
  int next_exit = int(m.exits.size()) - 1;
  for (int b = int(m.blocks.size()) - 1; b >= 0; --b) {
    // The exit reading this block's output adds its gradient to that of the later blocks.
    const bool stage_end = (b + 1) % per_stage == 0;
    if (stage_end && next_exit >= 0 && m.exits[next_exit].after_stage == (b + 1) / per_stage) {
      Exit& exit = m.exits[next_exit];
      FeatureMap d_head =
          global_average_pool_backward(exit.fc.backward(dlogits[size_t(next_exit)], true, p),
                                       exit.pooled_height, exit.pooled_width);
      if (exit.has_conv) {
        relu_backward(exit.head, d_head);
        exit.norm.backward(d_head, p);
        d_head = exit.conv.backward(d_head, backbone, p);
      }
      if (backbone)
        for (size_t i = 0; i < dx.size(); ++i) dx.data[i] += d_head.data[i];
      --next_exit;
    }
    if (!backbone) continue;
    Block& block = m.blocks[size_t(b)];
    // The residual branch's backward pass on its (kept) images: d_out in, d(input) out.
    auto branch_backward = [&](FeatureMap& d_out) {
      block.bn2.backward(d_out, p);
      FeatureMap d_hidden = block.conv2.backward(d_out, true, p);
      relu_backward(block.hidden, d_hidden);
      block.bn1.backward(d_hidden, p);
      return block.conv1.backward(d_hidden, true, p);
    };
    // d_skip reaches the shortcut's output and d_input the block's input, every image. A
    // skipped image's gradient goes to its shortcut alone, past the block's ReLU.
    FeatureMap d_skip, d_input;
    if (block.all_kept) {
      relu_backward(block.output, dx);
      d_skip = dx;
      d_input = branch_backward(dx);
    } else {
      d_input = FeatureMap(block.in_channels, dx.images, block.input_height, block.input_width);
      if (!block.kept.empty()) {
        FeatureMap d_out = gather_images(dx, block.kept);
        relu_backward(block.output, d_out);
        scatter_images(d_out, block.kept, dx);
        scatter_images(branch_backward(d_out), block.kept, d_input);
      }
      d_skip = std::move(dx);
    }
    if (block.projection) {
      block.shortcut_norm.backward(d_skip, p);
      const FeatureMap d_short = block.shortcut_conv.backward(d_skip, true, p);
      for (size_t i = 0; i < d_input.size(); ++i) d_input.data[i] += d_short.data[i];
    } else if (block.identity()) {
      for (size_t i = 0; i < d_input.size(); ++i) d_input.data[i] += d_skip.data[i];
    } else {
      shortcut_a_backward(d_skip, block.stride, block.padding_before, d_input);
    }
    dx = std::move(d_input);
  }
  if (!backbone) return;
  relu_backward(m.stem_output, dx);
  m.stem_norm.backward(dx, p);
  m.stem.backward(dx, false, p);
}

std::vector<std::vector<float>> TrainableResNet::predict(const float* images, int n,
                                                         const ForwardOptions& options) {
  std::vector<std::vector<float>> out;
  for (const FeatureMap& logits : forward(images, n, options))
    out.push_back(logits_row_major(logits));
  return out;
}

}  // namespace cimsweep::train
