#include "train/cuda/network_cuda.h"

#include <algorithm>
#include <map>
#include <stdexcept>
#include <string>

#include "common/errors.h"

namespace cimsweep::train::gpu {
namespace {

bool is_range(const Parameter& p) {
  return p.name.size() > 12 && p.name.compare(p.name.size() - 12, 12, ".input_range") == 0;
}

// A parameter's GPU copy (empty for the input ranges, which stay on the host).
struct DeviceParameter {
  DeviceVector<float> value, grad, momentum;
};

struct Context {
  CudaTrainOps& ops;
  std::vector<Parameter>& host;
  std::vector<DeviceParameter>& dev;
};

// network.cpp's CimConv on the GPU.
struct GConv {
  std::string name;
  ConvGeometry geometry;
  int weight = -1, bias = -1, range = -1;
  DeviceMap input_used;
  DeviceVector<uint8_t> region, pass;
  DeviceVector<float> weight_q;
  const float* weight_used = nullptr;
  bool quantised = false, masked = false;

  DeviceMap forward(const DeviceMap& x, const ForwardOptions& o, Context& c, bool training) {
    CudaTrainOps& ops = c.ops;
    DeviceParameter& w = c.dev[size_t(weight)];
    const size_t count = w.value.size();
    quantised = o.quant.enabled;
    masked = false;
    DeviceMap input;
    if (quantised) {
      input = DeviceMap(x.channels, x.images, x.height, x.width);
      if (training) region.resize(x.size());
      ops.quantise_inputs(x.data.data(), x.size(), c.host[size_t(range)].value[0],
                          o.quant.input_bits, input.data.data(),
                          training ? region.data() : nullptr);
      weight_q.resize(count);
      // maxabs passes every weight: no mask to apply.
      masked = training && o.quant.scaling == WeightScaling::kWage;
      if (masked) pass.resize(count);
      ops.quantise_weights(w.value.data(), count, geometry.rows(), o.quant.weight_bits,
                           o.quant.scaling, weight_q.data(), masked ? pass.data() : nullptr);
      weight_used = weight_q.data();
    } else {
      if (training) input = ops.clone(x);
      weight_used = w.value.data();
    }
    const float* bias_values = bias >= 0 ? c.dev[size_t(bias)].value.data() : nullptr;
    DeviceMap y = ops.conv_forward(geometry, weight_used, bias_values,
                                   quantised || training ? input : x);
    input_used = training ? std::move(input) : DeviceMap();
    return y;
  }

  DeviceMap backward(const DeviceMap& dy, bool need_dx, Context& c) {
    CudaTrainOps& ops = c.ops;
    DeviceParameter& w = c.dev[size_t(weight)];
    float* dbias = bias >= 0 ? c.dev[size_t(bias)].grad.data() : nullptr;
    const bool range_learns = quantised && range >= 0 && c.host[size_t(range)].trainable;
    DeviceMap d_input;
    ops.conv_backward(geometry, weight_used, input_used, dy,
                      need_dx || range_learns ? &d_input : nullptr, w.grad.data(), dbias);
    if (masked) ops.mask_gradient(w.grad.data(), pass.data(), w.grad.size());
    if (!quantised) return d_input;
    if (!need_dx && !range_learns) return DeviceMap();
    DeviceMap dx(d_input.channels, d_input.images, d_input.height, d_input.width);
    double d_range = 0;
    ops.quantise_inputs_backward(d_input.data.data(), region.data(), d_input.size(),
                                 dx.data.data(), range_learns ? &d_range : nullptr);
    if (range_learns) c.host[size_t(range)].grad.assign(1, float(d_range));
    return need_dx ? std::move(dx) : DeviceMap();
  }
};

struct GNorm {
  std::string name;
  int gamma = -1, beta = -1;
  DeviceVector<float> running_mean, running_var;
  DeviceBatchNormCache cache;

  void forward(DeviceMap& x, Context& c, bool training, bool update) {
    const float* g = c.dev[size_t(gamma)].value.data();
    const float* b = c.dev[size_t(beta)].value.data();
    if (training)
      c.ops.batchnorm_train_forward(g, b, x, cache, update ? running_mean.data() : nullptr,
                                    update ? running_var.data() : nullptr);
    else
      c.ops.batchnorm_eval_forward(g, b, running_mean.data(), running_var.data(), x);
  }
  void backward(DeviceMap& dy, Context& c) {
    c.ops.batchnorm_backward(c.dev[size_t(gamma)].value.data(), cache, dy,
                             c.dev[size_t(gamma)].grad.data(), c.dev[size_t(beta)].grad.data());
  }
};

struct GBlock {
  int in_channels = 0, out_channels = 0, stride = 1;
  GConv conv1, conv2;
  GNorm bn1, bn2;
  bool projection = false;
  GConv shortcut_conv;
  GNorm shortcut_norm;
  int padding_before = 0;
  DeviceMap hidden, output;
  bool identity() const { return stride == 1 && in_channels == out_channels; }
};

struct GExit {
  int after_stage = 0;
  bool has_conv = false;
  GConv conv;
  GNorm norm;
  GConv fc;
  DeviceMap head;
  int pooled_height = 0, pooled_width = 0;
};

}  // namespace

struct CudaResNet::Modules {
  std::vector<DeviceParameter> dev;
  GConv stem;
  GNorm stem_norm;
  DeviceMap stem_output;
  std::vector<GBlock> blocks;
  std::vector<GExit> exits;
  GConv fc;
  int final_height = 0, final_width = 0;
  std::vector<GNorm*> norms;
  bool trained = false, frozen = false;
};

CudaResNet::CudaResNet(TrainableResNet& net, CudaTrainOps& ops)
    : net_(net), ops_(ops), m_(std::make_unique<Modules>()) {
  const ResNetArch& arch = net.arch();
  std::map<std::string, int> index;
  for (size_t i = 0; i < net.parameters().size(); ++i)
    index[net.parameters()[i].name] = int(i);
  auto find = [&](const std::string& name) {
    auto it = index.find(name);
    if (it == index.end()) throw std::logic_error("CudaResNet: no parameter '" + name + "'");
    return it->second;
  };
  auto make_conv = [&](GConv& conv, const std::string& name, int out, int in, int kernel,
                       int stride, int pad, bool is_fc) {
    conv.name = name;
    conv.geometry = ConvGeometry{in, out, kernel, stride, pad};
    conv.weight = find(name + ".weight");
    conv.bias = is_fc ? find(name + ".bias") : -1;
    conv.range = find(name + ".input_range");
  };
  Modules& m = *m_;
  auto make_norm = [&](GNorm& norm, const std::string& name) {
    norm.name = name;
    norm.gamma = find(name + ".weight");
    norm.beta = find(name + ".bias");
  };
  // The same construction as TrainableResNet's (network.cpp).
  const int k = arch.kernel, pad = k / 2, n = arch.blocks_per_stage();
  make_conv(m.stem, "conv1", arch.width, arch.in_channels, k, 1, pad, false);
  make_norm(m.stem_norm, "bn1");
  m.blocks.resize(size_t(3 * n));
  m.exits.reserve(arch.exits.size());
  int channels = arch.width;
  for (int stage = 1; stage <= 3; ++stage) {
    const int out = arch.width << (stage - 1);
    for (int b = 0; b < n; ++b) {
      GBlock& block = m.blocks[size_t((stage - 1) * n + b)];
      const std::string prefix = "layer" + std::to_string(stage) + "." + std::to_string(b);
      block.in_channels = channels;
      block.out_channels = out;
      block.stride = (stage > 1 && b == 0) ? 2 : 1;
      make_conv(block.conv1, prefix + ".conv1", out, channels, k, block.stride, pad, false);
      make_norm(block.bn1, prefix + ".bn1");
      make_conv(block.conv2, prefix + ".conv2", out, out, k, 1, pad, false);
      make_norm(block.bn2, prefix + ".bn2");
      block.projection = arch.shortcut == 'B' && !block.identity();
      if (block.projection) {
        make_conv(block.shortcut_conv, prefix + ".shortcut.conv", out, channels, 1, block.stride,
                  0, false);
        make_norm(block.shortcut_norm, prefix + ".shortcut.bn");
      }
      block.padding_before = arch.shortcut_padding == "split" ? (out - channels) / 2 : 0;
      channels = out;
    }
    if (std::find(arch.exits.begin(), arch.exits.end(), stage) != arch.exits.end()) {
      const std::string prefix = "exit" + std::to_string(stage);
      m.exits.emplace_back();
      GExit& exit = m.exits.back();
      exit.after_stage = stage;
      exit.has_conv = arch.exit_head.type == "conv";
      int head_channels = channels;
      if (exit.has_conv) {
        head_channels = arch.exit_head.channels > 0 ? arch.exit_head.channels : channels;
        make_conv(exit.conv, prefix + ".conv", head_channels, channels, arch.exit_head.kernel,
                  arch.exit_head.stride, arch.exit_head.kernel / 2, false);
        make_norm(exit.norm, prefix + ".bn");
      }
      make_conv(exit.fc, prefix + ".fc", arch.num_classes, head_channels, 1, 1, 0, true);
    }
  }
  make_conv(m.fc, "fc", arch.num_classes, channels, 1, 1, 0, true);
  m.norms.push_back(&m.stem_norm);
  for (GBlock& block : m.blocks) {
    m.norms.push_back(&block.bn1);
    m.norms.push_back(&block.bn2);
    if (block.projection) m.norms.push_back(&block.shortcut_norm);
  }
  for (GExit& exit : m.exits)
    if (exit.has_conv) m.norms.push_back(&exit.norm);
  m.dev.resize(net.parameters().size());
  upload();
}

CudaResNet::~CudaResNet() = default;

void CudaResNet::upload() {
  std::vector<Parameter>& host = net_.parameters();
  for (size_t i = 0; i < host.size(); ++i) {
    if (is_range(host[i])) continue;
    DeviceParameter& d = m_->dev[i];
    d.value.upload(host[i].value);
    d.grad.resize(host[i].value.size());
    std::vector<float> momentum = host[i].momentum;
    momentum.resize(host[i].value.size(), 0.0f);
    d.momentum.upload(momentum);
  }
  const std::map<std::string, Tensor> tensors = net_.export_tensors();
  for (GNorm* norm : m_->norms) {
    norm->running_mean.upload(tensors.at(norm->name + ".running_mean").data);
    norm->running_var.upload(tensors.at(norm->name + ".running_var").data);
  }
}

void CudaResNet::download() {
  std::vector<Parameter>& host = net_.parameters();
  for (size_t i = 0; i < host.size(); ++i) {
    if (is_range(host[i])) continue;
    const DeviceParameter& d = m_->dev[i];
    host[i].value = d.value.download();
    host[i].grad = d.grad.download();
    host[i].momentum = d.momentum.download();
  }
  std::map<std::string, Tensor> tensors = net_.export_tensors();
  for (GNorm* norm : m_->norms) {
    tensors.at(norm->name + ".running_mean").data = norm->running_mean.download();
    tensors.at(norm->name + ".running_var").data = norm->running_var.download();
  }
  net_.import_tensors(tensors);
}

std::vector<DeviceMap> CudaResNet::forward(const float* images, int n,
                                           const ForwardOptions& options) {
  const ResNetArch& a = net_.arch();
  return forward(ops_.upload_images(images, n, a.in_channels, a.input_height, a.input_width),
                 options);
}

std::vector<DeviceMap> CudaResNet::forward(const DeviceMap& images, const ForwardOptions& o) {
  if (o.noise_sigma > 0)
    throw UserError("noise-aware training (--train-noise) runs on the CPU only so far: use "
                    "--device cpu");
  if (o.observe_input)
    throw std::logic_error("CudaResNet: input observation (calibration) runs on the CPU network");
  Modules& m = *m_;
  Context c{ops_, net_.parameters(), m.dev};
  const bool backbone_training = o.training && !o.frozen_backbone;
  const bool update = o.update_running_stats;
  m.trained = o.training;
  m.frozen = o.frozen_backbone;
  auto conv_norm = [&](GConv& conv, GNorm& norm, const DeviceMap& in, bool training) {
    DeviceMap y = conv.forward(in, o, c, training);
    norm.forward(y, c, training, update);
    return y;
  };

  DeviceMap x = conv_norm(m.stem, m.stem_norm, images, backbone_training);
  ops_.relu_forward(x);
  m.stem_output = backbone_training ? ops_.clone(x) : DeviceMap();

  std::vector<DeviceMap> logits;
  const int per_stage = net_.arch().blocks_per_stage();
  size_t next_exit = 0;
  for (size_t b = 0; b < m.blocks.size(); ++b) {
    GBlock& block = m.blocks[b];
    const bool training = backbone_training;
    DeviceMap hidden = conv_norm(block.conv1, block.bn1, x, training);
    ops_.relu_forward(hidden);
    DeviceMap y = conv_norm(block.conv2, block.bn2, hidden, training);
    block.hidden = training ? std::move(hidden) : DeviceMap();
    if (block.projection) {
      const DeviceMap skip = conv_norm(block.shortcut_conv, block.shortcut_norm, x, training);
      ops_.add_inplace(y, skip);
    } else if (block.identity()) {
      ops_.add_inplace(y, x);
    } else {
      const DeviceMap skip =
          ops_.shortcut_a_forward(x, block.out_channels, block.stride, block.padding_before);
      ops_.add_inplace(y, skip);
    }
    ops_.relu_forward(y);
    block.output = training ? ops_.clone(y) : DeviceMap();
    x = std::move(y);

    const bool stage_end = (int(b) + 1) % per_stage == 0;
    if (stage_end && next_exit < m.exits.size() &&
        m.exits[next_exit].after_stage == (int(b) + 1) / per_stage) {
      GExit& exit = m.exits[next_exit++];
      DeviceMap head;
      if (exit.has_conv) {
        head = conv_norm(exit.conv, exit.norm, x, o.training);
        ops_.relu_forward(head);
      }
      const DeviceMap& pooled_from = exit.has_conv ? head : x;
      exit.pooled_height = pooled_from.height;
      exit.pooled_width = pooled_from.width;
      logits.push_back(exit.fc.forward(ops_.global_average_pool(pooled_from), o, c, o.training));
      exit.head = o.training && exit.has_conv ? std::move(head) : DeviceMap();
    }
  }
  m.final_height = x.height;
  m.final_width = x.width;
  logits.push_back(m.fc.forward(ops_.global_average_pool(x), o, c, backbone_training));
  return logits;
}

void CudaResNet::backward(const std::vector<DeviceMap>& dlogits) {
  Modules& m = *m_;
  Context c{ops_, net_.parameters(), m.dev};
  if (!m.trained) throw std::logic_error("backward() needs a training forward() first");
  if (dlogits.size() != m.exits.size() + 1)
    throw std::logic_error("backward() needs one logits gradient per exit");
  for (size_t i = 0; i < m.dev.size(); ++i) {
    if (is_range(c.host[i]))
      std::fill(c.host[i].grad.begin(), c.host[i].grad.end(), 0.0f);
    else
      m.dev[i].grad.resize(m.dev[i].grad.size());  // zeroed
  }
  const bool backbone = !m.frozen;

  DeviceMap dx;
  if (backbone)
    dx = ops_.global_average_pool_backward(m.fc.backward(dlogits.back(), true, c), m.final_height,
                                           m.final_width);
  const int per_stage = net_.arch().blocks_per_stage();
  int next_exit = int(m.exits.size()) - 1;
  for (int b = int(m.blocks.size()) - 1; b >= 0; --b) {
    const bool stage_end = (b + 1) % per_stage == 0;
    if (stage_end && next_exit >= 0 && m.exits[size_t(next_exit)].after_stage == (b + 1) / per_stage) {
      GExit& exit = m.exits[size_t(next_exit)];
      DeviceMap d_head = ops_.global_average_pool_backward(
          exit.fc.backward(dlogits[size_t(next_exit)], true, c), exit.pooled_height,
          exit.pooled_width);
      if (exit.has_conv) {
        ops_.relu_backward(exit.head, d_head);
        exit.norm.backward(d_head, c);
        d_head = exit.conv.backward(d_head, backbone, c);
      }
      if (backbone) ops_.add_inplace(dx, d_head);
      --next_exit;
    }
    if (!backbone) continue;
    GBlock& block = m.blocks[size_t(b)];
    ops_.relu_backward(block.output, dx);
    DeviceMap d_skip = ops_.clone(dx);
    block.bn2.backward(dx, c);
    DeviceMap d_hidden = block.conv2.backward(dx, true, c);
    ops_.relu_backward(block.hidden, d_hidden);
    block.bn1.backward(d_hidden, c);
    DeviceMap d_input = block.conv1.backward(d_hidden, true, c);
    if (block.projection) {
      block.shortcut_norm.backward(d_skip, c);
      const DeviceMap d_short = block.shortcut_conv.backward(d_skip, true, c);
      ops_.add_inplace(d_input, d_short);
    } else if (block.identity()) {
      ops_.add_inplace(d_input, d_skip);
    } else {
      ops_.shortcut_a_backward(d_skip, block.stride, block.padding_before, d_input);
    }
    dx = std::move(d_input);
  }
  if (!backbone) return;
  ops_.relu_backward(m.stem_output, dx);
  m.stem_norm.backward(dx, c);
  m.stem.backward(dx, false, c);
}

void CudaResNet::sgd_step(const SgdSettings& settings, double lr) {
  std::vector<Parameter>& host = net_.parameters();
  for (size_t i = 0; i < host.size(); ++i) {
    Parameter& p = host[i];
    if (!p.trainable) continue;
    if (is_range(p)) {
      // One float on the host, by optimizer.cpp itself.
      std::vector<Parameter> one(1, p);
      train::sgd_step(one, settings, lr);
      p.value = one[0].value;
      p.momentum = one[0].momentum;
      continue;
    }
    DeviceParameter& d = m_->dev[i];
    ops_.sgd_update(d.value.data(), d.grad.data(), d.momentum.data(), d.value.size(),
                    p.weight_decay, settings, lr);
  }
}

}  // namespace cimsweep::train::gpu
