#include "train/layers.h"

#include "common/errors.h"

#include <cblas.h>
#include <omp.h>

#include <dnnl.hpp>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>

namespace cimsweep::train {
namespace {

// GEMM columns (output positions) per work chunk. Fixed, never derived from the thread count, so
// that every chunk, and so every partial sum, is the same however many threads run.
constexpr int kChunkColumns = 2048;

int images_per_chunk(int out_h, int out_w) {
  return std::max(1, kChunkColumns / std::max(1, out_h * out_w));
}

// The FC layer (a 1×1 map) and, in fp32, any 1×1, stride-1, unpadded convolution are plain GEMMs
// of the channel-major map: OpenBLAS, no copies. Every other convolution runs on oneDNN (bf16
// 1×1 convolutions too, so that --precision bf16 covers every convolution; the FC stays fp32).
bool is_pointwise(const ConvGeometry& g) {
  return g.kernel == 1 && g.stride == 1 && g.pad == 0;
}

using dnnl::memory;
using Tag = memory::format_tag;
using Dt = memory::data_type;

const dnnl::engine& cpu_engine() {
  static const dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

dnnl::reorder make_reorder(const memory::desc& from, const memory::desc& to) {
  return dnnl::reorder(dnnl::reorder::primitive_desc(cpu_engine(), from, cpu_engine(), to));
}

// `count` images of a channel-major map of `total` images, as oneDNN's logical [N, C, H, W]:
// image stride H·W, channel stride total·H·W. Chunk k's data starts k·per_chunk·H·W floats in.
memory::desc channel_major_view(int count, int channels, int total, int h, int w) {
  return memory::desc({count, channels, h, w}, Dt::f32,
                      {memory::dim(h) * w, memory::dim(total) * h * w, w, 1});
}

// Everything one chunk size needs: the convolution primitives (forward, backward-data,
// backward-weights) with the layouts oneDNN picks for this CPU (format `any`: blocked nChw8c on
// AVX2), and the reorders between those layouts and the channel-major views.
//
// Determinism: each primitive is created while OpenMP reports one thread, so oneDNN sizes its
// work split (in particular the minibatch reduction of the weight gradient) for one thread on
// every machine setting, and each chunk executes on one thread inside our own parallel loop
// (oneDNN runs sequentially inside an OpenMP parallel region). The result of a chunk therefore
// does not depend on the thread count, and chunks are summed in chunk order as before.
struct ConvPrimitives {
  dnnl::convolution_forward::primitive_desc forward;
  dnnl::convolution_backward_data::primitive_desc backward_data;
  dnnl::convolution_backward_weights::primitive_desc backward_weights;
  dnnl::convolution_forward run_forward;
  dnnl::convolution_backward_data run_backward_data;
  dnnl::convolution_backward_weights run_backward_weights;
  memory::desc x_view, y_view;
  dnnl::reorder x_to_forward, forward_to_y, x_to_weights_src, y_to_weights_dy, y_to_data_dy,
      data_dx_to_x, weights_grad_to_plain;
  size_t scratchpad_bytes = 0;

  ConvPrimitives(const ConvGeometry& g, ConvPrecision precision, int count, int total, int h, int w,
                 int out_h, int out_w, bool need_backward) {
    const dnnl::engine& engine = cpu_engine();
    const memory::dims strides{g.stride, g.stride}, pad{g.pad, g.pad};
    // Right/bottom padding that makes oneDNN's output size equal ours (floor division).
    const memory::dims pad_r{(out_h - 1) * g.stride + g.kernel - h - g.pad,
                             (out_w - 1) * g.stride + g.kernel - w - g.pad};
    // bf16: the convolution reads its input, weights and output gradient in bf16 (rounded by the
    // reorders from our fp32 maps) and accumulates and writes in fp32: outputs, input and weight
    // gradients stay fp32, as do the master weights, batch norm and the loss.
    const Dt operand = precision == ConvPrecision::kBf16 ? Dt::bf16 : Dt::f32;
    const memory::desc src_any({count, g.in_channels, h, w}, operand, Tag::any);
    const memory::desc dst_any({count, g.out_channels, out_h, out_w}, Dt::f32, Tag::any);
    const memory::desc diff_dst_any({count, g.out_channels, out_h, out_w}, operand, Tag::any);
    const memory::desc diff_src_any({count, g.in_channels, h, w}, Dt::f32, Tag::any);
    const memory::desc weights_any({g.out_channels, g.in_channels, g.kernel, g.kernel}, operand,
                                   Tag::any);
    const memory::desc diff_weights_any({g.out_channels, g.in_channels, g.kernel, g.kernel},
                                        Dt::f32, Tag::any);
    dnnl::primitive_attr attr;
    attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
    forward = dnnl::convolution_forward::primitive_desc(
        dnnl::convolution_forward::desc(dnnl::prop_kind::forward_training,
                                        dnnl::algorithm::convolution_direct, src_any, weights_any,
                                        dst_any, strides, pad, pad_r),
        attr, engine);
    x_view = channel_major_view(count, g.in_channels, total, h, w);
    y_view = channel_major_view(count, g.out_channels, total, out_h, out_w);
    x_to_forward = make_reorder(x_view, forward.src_desc());
    forward_to_y = make_reorder(forward.dst_desc(), y_view);
    run_forward = dnnl::convolution_forward(forward);
    scratchpad_bytes = forward.scratchpad_desc().get_size();
    if (!need_backward) return;
    backward_data = dnnl::convolution_backward_data::primitive_desc(
        dnnl::convolution_backward_data::desc(dnnl::algorithm::convolution_direct, diff_src_any,
                                              weights_any, diff_dst_any, strides, pad, pad_r),
        attr, engine, forward);
    backward_weights = dnnl::convolution_backward_weights::primitive_desc(
        dnnl::convolution_backward_weights::desc(dnnl::algorithm::convolution_direct, src_any,
                                                 diff_weights_any, diff_dst_any, strides, pad,
                                                 pad_r),
        attr, engine, forward);
    x_to_weights_src = make_reorder(x_view, backward_weights.src_desc());
    y_to_weights_dy = make_reorder(y_view, backward_weights.diff_dst_desc());
    y_to_data_dy = make_reorder(y_view, backward_data.diff_dst_desc());
    data_dx_to_x = make_reorder(backward_data.diff_src_desc(), x_view);
    weights_grad_to_plain = make_reorder(
        backward_weights.diff_weights_desc(),
        memory::desc({g.out_channels, g.in_channels, g.kernel, g.kernel}, Dt::f32, Tag::oihw));
    run_backward_data = dnnl::convolution_backward_data(backward_data);
    run_backward_weights = dnnl::convolution_backward_weights(backward_weights);
    scratchpad_bytes = std::max({scratchpad_bytes, backward_data.scratchpad_desc().get_size(),
                                 backward_weights.scratchpad_desc().get_size()});
  }
};

// Creates the primitives for the full chunks and for the last, shorter one (if any) with OpenMP
// reporting one thread (see ConvPrimitives), then restores the thread count.
struct ChunkPlan {
  int per_chunk = 1, chunks = 0, tail = 0;
  std::vector<ConvPrimitives> sizes;  // [0]: per_chunk images; [1]: the tail, when there is one

  ChunkPlan(const ConvGeometry& g, ConvPrecision precision, const FeatureMap& x, int out_h,
            int out_w, bool need_backward) {
    const int n = x.images;
    per_chunk = std::min(n, images_per_chunk(out_h, out_w));
    chunks = (n + per_chunk - 1) / per_chunk;
    tail = n - (chunks - 1) * per_chunk;
    const int threads = omp_get_max_threads();
    omp_set_num_threads(1);
    try {
      sizes.emplace_back(g, precision, per_chunk, n, x.height, x.width, out_h, out_w,
                         need_backward);
      if (tail != per_chunk)
        sizes.emplace_back(g, precision, tail, n, x.height, x.width, out_h, out_w, need_backward);
    } catch (...) {
      omp_set_num_threads(threads);
      throw;
    }
    omp_set_num_threads(threads);
  }
  int first(int chunk) const { return chunk * per_chunk; }
  size_t scratchpad_bytes() const {
    size_t bytes = 0;
    for (const ConvPrimitives& p : sizes) bytes = std::max(bytes, p.scratchpad_bytes);
    return bytes;
  }
  const ConvPrimitives& of(int chunk) const {
    return chunk == chunks - 1 && tail != per_chunk ? sizes[1] : sizes[0];
  }
};

// The plans made so far, by everything they depend on: setting primitives up costs more than
// running them on a small chunk, and a training run asks for the same few shapes every step.
const ChunkPlan& chunk_plan(const ConvGeometry& g, ConvPrecision precision, const FeatureMap& x,
                            int out_h, int out_w, bool need_backward) {
  using Key = std::array<int, 11>;
  static std::mutex mutex;
  static std::map<Key, std::unique_ptr<const ChunkPlan>> plans;
  const Key key{g.in_channels,        g.out_channels, g.kernel, g.stride, g.pad,
                int(precision),       x.images,       x.height, x.width,  need_backward,
                out_h * 65536 + out_w};
  const std::lock_guard<std::mutex> lock(mutex);
  auto& plan = plans[key];
  if (!plan) plan = std::make_unique<const ChunkPlan>(g, precision, x, out_h, out_w, need_backward);
  return *plan;
}

// The weights [out, in, k, k] in the layout a primitive wants (a copy when it differs).
memory weights_for(const memory::desc& wanted, const ConvGeometry& g, const float* weight) {
  const dnnl::engine& engine = cpu_engine();
  const memory::desc plain({g.out_channels, g.in_channels, g.kernel, g.kernel}, Dt::f32, Tag::oihw);
  memory user(plain, engine, const_cast<float*>(weight));
  if (wanted == plain) return user;
  memory out(wanted, engine);
  dnnl::stream stream(engine);
  dnnl::reorder(user, out).execute(stream, user, out);
  stream.wait();
  return out;
}

// Per-thread execution state: a stream and the user-managed scratchpad.
struct ThreadContext {
  dnnl::stream stream{cpu_engine()};
  memory scratchpad;
  ThreadContext(size_t bytes)
      : scratchpad(memory::desc({memory::dim(std::max<size_t>(bytes, 1))}, Dt::u8, Tag::a),
                   cpu_engine()) {}
};

// Views one chunk of a channel-major map as a oneDNN memory (no copy).
memory chunk_memory(const memory::desc& view, const FeatureMap& map, int first) {
  return memory(view, cpu_engine(),
                const_cast<float*>(map.data.data()) + size_t(first) * map.plane());
}

void sgemm_pointwise_forward(const ConvGeometry& g, const float* weight, const FeatureMap& x,
                             FeatureMap& y) {
  const int per_chunk = images_per_chunk(x.height, x.width);
  const int chunks = (x.images + per_chunk - 1) / per_chunk;
#pragma omp parallel for schedule(dynamic) if (chunks > 1)
  for (int chunk = 0; chunk < chunks; ++chunk) {
    const int first = chunk * per_chunk, count = std::min(per_chunk, x.images - first);
    const size_t offset = size_t(first) * x.plane();
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, g.out_channels,
                int(size_t(count) * x.plane()), g.in_channels, 1.0f, weight, g.in_channels,
                x.data.data() + offset, int(x.channel_size()), 0.0f, y.data.data() + offset,
                int(y.channel_size()));
  }
}

}  // namespace

std::string convolution_isa() {
  switch (dnnl::get_effective_cpu_isa()) {
    case dnnl::cpu_isa::sse41:
      return "sse41";
    case dnnl::cpu_isa::avx:
      return "avx";
    case dnnl::cpu_isa::avx2:
      return "avx2";
    case dnnl::cpu_isa::avx2_vnni:
      return "avx2_vnni";
    case dnnl::cpu_isa::avx512_core:
      return "avx512_core";
    case dnnl::cpu_isa::avx512_core_vnni:
      return "avx512_core_vnni";
    case dnnl::cpu_isa::avx512_core_bf16:
      return "avx512_core_bf16";
    case dnnl::cpu_isa::avx512_core_amx:
      return "avx512_core_amx";
    default:
      return "other";
  }
}

bool cpu_has_bf16_convolutions() {
  const std::string isa = convolution_isa();
  return isa == "avx512_core_bf16" || isa == "avx512_core_amx";
}

ConvPrecision parse_cpu_precision(const std::string& precision) {
  if (precision == "fp32") return ConvPrecision::kFp32;
  if (precision != "bf16") throw UserError("--precision '" + precision + "' must be fp32 or bf16");
  if (!cpu_has_bf16_convolutions())
    throw UserError("--precision bf16 needs a CPU with AVX-512 BF16 and this one has " +
                    convolution_isa() + " (oneDNN): use --precision fp32");
  return ConvPrecision::kBf16;
}

FeatureMap from_images(const float* images, int n, int c, int h, int w) {
  FeatureMap x(c, n, h, w);
  const size_t plane = size_t(h) * w;
  for (int img = 0; img < n; ++img)
    for (int ch = 0; ch < c; ++ch)
      std::copy_n(images + (size_t(img) * c + ch) * plane, plane,
                  x.data.begin() + (size_t(ch) * n + img) * plane);
  return x;
}

std::vector<float> logits_row_major(const FeatureMap& logits) {
  std::vector<float> out(size_t(logits.images) * logits.channels);
  for (int c = 0; c < logits.channels; ++c)
    for (int img = 0; img < logits.images; ++img)
      out[size_t(img) * logits.channels + c] = logits.data[size_t(c) * logits.images + img];
  return out;
}

FeatureMap conv_forward(const ConvGeometry& g, const float* weight, const float* bias,
                        const FeatureMap& x, ConvPrecision precision) {
  const int out_h = g.output_size(x.height), out_w = g.output_size(x.width), n = x.images;
  FeatureMap y(g.out_channels, n, out_h, out_w);
  if (is_pointwise(g) && (precision == ConvPrecision::kFp32 || x.plane() == 1)) {
    sgemm_pointwise_forward(g, weight, x, y);
  } else if (n > 0) {
    const ChunkPlan& plan = chunk_plan(g, precision, x, out_h, out_w, false);
    const memory weights = weights_for(plan.sizes[0].forward.weights_desc(), g, weight);
#pragma omp parallel if (plan.chunks > 1)
    {
      ThreadContext context(plan.scratchpad_bytes());
#pragma omp for schedule(dynamic)
      for (int chunk = 0; chunk < plan.chunks; ++chunk) {
        const ConvPrimitives& p = plan.of(chunk);
        memory x_chunk = chunk_memory(p.x_view, x, plan.first(chunk));
        memory y_chunk = chunk_memory(p.y_view, y, plan.first(chunk));
        memory src(p.forward.src_desc(), cpu_engine()), dst(p.forward.dst_desc(), cpu_engine());
        p.x_to_forward.execute(context.stream, x_chunk, src);
        p.run_forward.execute(context.stream, {{DNNL_ARG_SRC, src},
                                               {DNNL_ARG_WEIGHTS, weights},
                                               {DNNL_ARG_DST, dst},
                                               {DNNL_ARG_SCRATCHPAD, context.scratchpad}});
        p.forward_to_y.execute(context.stream, dst, y_chunk);
        context.stream.wait();
      }
    }
  }
  if (bias) {
    const size_t ld_y = y.channel_size();
    for (int o = 0; o < g.out_channels; ++o) {
      float* p = y.data.data() + size_t(o) * ld_y;
      for (size_t i = 0; i < ld_y; ++i) p[i] += bias[o];
    }
  }
  return y;
}

void conv_backward(const ConvGeometry& g, const float* weight, const FeatureMap& x,
                   const FeatureMap& dy, FeatureMap* dx, float* dweight, float* dbias,
                   ConvPrecision precision) {
  const int n = x.images;
  const size_t weights = size_t(g.out_channels) * g.rows();
  if (dx) *dx = FeatureMap(x.channels, x.images, x.height, x.width);
  std::vector<float> partial;  // per-chunk weight gradients, summed in chunk order below
  int chunks = 0;
  if (is_pointwise(g) && (precision == ConvPrecision::kFp32 || x.plane() == 1)) {
    const int per_chunk = images_per_chunk(x.height, x.width);
    chunks = (n + per_chunk - 1) / per_chunk;
    partial.resize(size_t(chunks) * weights);
    const size_t ld = x.channel_size(), ld_dy = dy.channel_size();
#pragma omp parallel for schedule(dynamic) if (chunks > 1)
    for (int chunk = 0; chunk < chunks; ++chunk) {
      const int first = chunk * per_chunk, count = std::min(per_chunk, n - first);
      const int cols = int(size_t(count) * x.plane());
      const size_t offset = size_t(first) * x.plane();
      // dW (this chunk) = dy · xᵀ; dx = Wᵀ · dy (chunks own disjoint images).
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, g.out_channels, g.in_channels, cols,
                  1.0f, dy.data.data() + offset, int(ld_dy), x.data.data() + offset, int(ld), 0.0f,
                  partial.data() + size_t(chunk) * weights, g.in_channels);
      if (dx)
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, g.in_channels, cols, g.out_channels,
                    1.0f, weight, g.in_channels, dy.data.data() + offset, int(ld_dy), 0.0f,
                    dx->data.data() + offset, int(ld));
    }
  } else if (n > 0) {
    const ChunkPlan& plan = chunk_plan(g, precision, x, dy.height, dy.width, true);
    chunks = plan.chunks;
    partial.resize(size_t(chunks) * weights);
    const memory weights_data =
        dx ? weights_for(plan.sizes[0].backward_data.weights_desc(), g, weight) : memory();
    const memory::desc plain_weights({g.out_channels, g.in_channels, g.kernel, g.kernel}, Dt::f32,
                                     Tag::oihw);
#pragma omp parallel if (chunks > 1)
    {
      ThreadContext context(plan.scratchpad_bytes());
#pragma omp for schedule(dynamic)
      for (int chunk = 0; chunk < chunks; ++chunk) {
        const ConvPrimitives& p = plan.of(chunk);
        const dnnl::engine& engine = cpu_engine();
        memory x_chunk = chunk_memory(p.x_view, x, plan.first(chunk));
        memory dy_chunk = chunk_memory(p.y_view, dy, plan.first(chunk));
        // dW (this chunk), written in oneDNN's layout, then as [out, in, k, k] into `partial`.
        const auto& bw = p.backward_weights;
        memory src(bw.src_desc(), engine), diff_dst(bw.diff_dst_desc(), engine),
            diff_weights(bw.diff_weights_desc(), engine);
        memory chunk_dweight(plain_weights, engine, partial.data() + size_t(chunk) * weights);
        p.x_to_weights_src.execute(context.stream, x_chunk, src);
        p.y_to_weights_dy.execute(context.stream, dy_chunk, diff_dst);
        p.run_backward_weights.execute(context.stream, {{DNNL_ARG_SRC, src},
                                                        {DNNL_ARG_DIFF_DST, diff_dst},
                                                        {DNNL_ARG_DIFF_WEIGHTS, diff_weights},
                                                        {DNNL_ARG_SCRATCHPAD, context.scratchpad}});
        p.weights_grad_to_plain.execute(context.stream, diff_weights, chunk_dweight);
        if (dx) {
          const auto& bd = p.backward_data;
          memory data_dy = diff_dst;
          if (bd.diff_dst_desc() != bw.diff_dst_desc()) {
            data_dy = memory(bd.diff_dst_desc(), engine);
            p.y_to_data_dy.execute(context.stream, dy_chunk, data_dy);
          }
          memory diff_src(bd.diff_src_desc(), engine);
          p.run_backward_data.execute(context.stream, {{DNNL_ARG_DIFF_DST, data_dy},
                                                       {DNNL_ARG_WEIGHTS, weights_data},
                                                       {DNNL_ARG_DIFF_SRC, diff_src},
                                                       {DNNL_ARG_SCRATCHPAD, context.scratchpad}});
          memory dx_chunk = chunk_memory(p.x_view, *dx, plan.first(chunk));
          p.data_dx_to_x.execute(context.stream, diff_src, dx_chunk);
        }
        context.stream.wait();
      }
    }
  }
  // Chunk partial sums in chunk order: the same additions whatever thread computed which chunk.
  if (chunks > 0) {
    std::copy_n(partial.begin(), weights, dweight);
    for (int chunk = 1; chunk < chunks; ++chunk) {
      const float* p = partial.data() + size_t(chunk) * weights;
      for (size_t i = 0; i < weights; ++i) dweight[i] += p[i];
    }
  } else {
    std::fill_n(dweight, weights, 0.0f);
  }
  if (dbias) {
    const size_t ld_dy = dy.channel_size();
    for (int o = 0; o < g.out_channels; ++o) {
      double sum = 0;
      const float* p = dy.data.data() + size_t(o) * ld_dy;
      for (size_t i = 0; i < ld_dy; ++i) sum += p[i];
      dbias[o] = float(sum);
    }
  }
}

void batchnorm_train_forward(const float* gamma, const float* beta, FeatureMap& x,
                             BatchNormCache& cache, float* running_mean, float* running_var) {
  const size_t count = x.channel_size();
  cache.normalised.resize(x.size());
  cache.inv_std.resize(size_t(x.channels));
#pragma omp parallel for schedule(static) if (x.size() >= (size_t(1) << 15))
  for (int c = 0; c < x.channels; ++c) {
    float* p = x.data.data() + size_t(c) * count;
    float* normalised = cache.normalised.data() + size_t(c) * count;
    double sum = 0;
    for (size_t i = 0; i < count; ++i) sum += p[i];
    const double mean = sum / double(count);
    double squares = 0;
    for (size_t i = 0; i < count; ++i) squares += (p[i] - mean) * (p[i] - mean);
    const double variance = squares / double(count);
    const float inv_std = float(1.0 / std::sqrt(variance + double(kBatchNormEps)));
    cache.inv_std[c] = inv_std;
    const float m = float(mean);
    for (size_t i = 0; i < count; ++i) {
      normalised[i] = (p[i] - m) * inv_std;
      p[i] = gamma[c] * normalised[i] + beta[c];
    }
    if (running_mean && running_var) {
      const double unbiased = count > 1 ? squares / double(count - 1) : variance;
      running_mean[c] =
          float((1.0 - kBatchNormMomentum) * running_mean[c] + double(kBatchNormMomentum) * mean);
      running_var[c] = float((1.0 - kBatchNormMomentum) * running_var[c] +
                             double(kBatchNormMomentum) * unbiased);
    }
  }
}

void batchnorm_eval_forward(const float* gamma, const float* beta, const float* running_mean,
                            const float* running_var, FeatureMap& x) {
  const size_t count = x.channel_size();
#pragma omp parallel for schedule(static) if (x.size() >= (size_t(1) << 15))
  for (int c = 0; c < x.channels; ++c) {
    const float scale = gamma[c] / std::sqrt(running_var[c] + kBatchNormEps);
    const float shift = beta[c] - running_mean[c] * scale;
    float* p = x.data.data() + size_t(c) * count;
    for (size_t i = 0; i < count; ++i) p[i] = p[i] * scale + shift;
  }
}

void batchnorm_backward(const float* gamma, const BatchNormCache& cache, FeatureMap& dy,
                        float* dgamma, float* dbeta) {
  const size_t count = dy.channel_size();
#pragma omp parallel for schedule(static) if (dy.size() >= (size_t(1) << 15))
  for (int c = 0; c < dy.channels; ++c) {
    float* d = dy.data.data() + size_t(c) * count;
    const float* normalised = cache.normalised.data() + size_t(c) * count;
    double sum = 0, dot = 0;
    for (size_t i = 0; i < count; ++i) {
      sum += d[i];
      dot += double(d[i]) * normalised[i];
    }
    dgamma[c] = float(dot);
    dbeta[c] = float(sum);
    // dx = γ·inv_std/M · (M·dy − Σdy − x̂·Σ(dy·x̂))
    const float scale = float(double(gamma[c]) * cache.inv_std[c] / double(count));
    const float mean_d = float(sum), mean_dot = float(dot), m = float(count);
    for (size_t i = 0; i < count; ++i)
      d[i] = scale * (m * d[i] - mean_d - normalised[i] * mean_dot);
  }
}

void relu_forward(FeatureMap& x) {
  float* p = x.data.data();
  const long long size = (long long)x.size();
#pragma omp parallel for schedule(static) if (size >= (1 << 16))
  for (long long i = 0; i < size; ++i) p[i] = p[i] > 0.0f ? p[i] : 0.0f;
}

void relu_backward(const FeatureMap& y, FeatureMap& dy) {
  const float* out = y.data.data();
  float* d = dy.data.data();
  const long long size = (long long)dy.size();
#pragma omp parallel for schedule(static) if (size >= (1 << 16))
  for (long long i = 0; i < size; ++i) d[i] = out[i] > 0.0f ? d[i] : 0.0f;
}

FeatureMap shortcut_a_forward(const FeatureMap& x, int out_channels, int stride, int before) {
  const int oh = (x.height + stride - 1) / stride, ow = (x.width + stride - 1) / stride;
  FeatureMap y(out_channels, x.images, oh, ow);
  for (int c = 0; c < x.channels; ++c)
    for (int img = 0; img < x.images; ++img) {
      const float* in = x.data.data() + (size_t(c) * x.images + img) * x.plane();
      float* out = y.data.data() + (size_t(before + c) * y.images + img) * y.plane();
      for (int i = 0; i < oh; ++i)
        for (int j = 0; j < ow; ++j)
          out[size_t(i) * ow + j] = in[size_t(i) * stride * x.width + size_t(j) * stride];
    }
  return y;
}

void shortcut_a_backward(const FeatureMap& dy, int stride, int before, FeatureMap& dx) {
  const int oh = dy.height, ow = dy.width;
  for (int c = 0; c < dx.channels; ++c)
    for (int img = 0; img < dx.images; ++img) {
      const float* in = dy.data.data() + (size_t(before + c) * dy.images + img) * dy.plane();
      float* out = dx.data.data() + (size_t(c) * dx.images + img) * dx.plane();
      for (int i = 0; i < oh; ++i)
        for (int j = 0; j < ow; ++j)
          out[size_t(i) * stride * dx.width + size_t(j) * stride] += in[size_t(i) * ow + j];
    }
}

FeatureMap global_average_pool(const FeatureMap& x) {
  FeatureMap y(x.channels, x.images, 1, 1);
  const size_t plane = x.plane();
  for (size_t i = 0; i < y.size(); ++i) {
    double sum = 0;
    const float* p = x.data.data() + i * plane;
    for (size_t k = 0; k < plane; ++k) sum += p[k];
    y.data[i] = float(sum / double(plane));
  }
  return y;
}

FeatureMap global_average_pool_backward(const FeatureMap& dy, int height, int width) {
  FeatureMap dx(dy.channels, dy.images, height, width);
  const size_t plane = dx.plane();
  const float inv = 1.0f / float(plane);
  for (size_t i = 0; i < dy.size(); ++i)
    std::fill_n(dx.data.begin() + i * plane, plane, dy.data[i] * inv);
  return dx;
}

double softmax_cross_entropy(const FeatureMap& logits, const int32_t* labels, float weight,
                             FeatureMap& dlogits, int* correct) {
  const int n = logits.images, classes = logits.channels;
  dlogits = FeatureMap(classes, n, 1, 1);
  double loss = 0;
  int right = 0;
  std::vector<double> p(classes);
  for (int img = 0; img < n; ++img) {
    auto z = [&](int c) { return double(logits.data[size_t(c) * n + img]); };
    int best = 0;
    for (int c = 1; c < classes; ++c)
      if (z(c) > z(best)) best = c;
    right += best == labels[img];
    double sum = 0;
    for (int c = 0; c < classes; ++c) sum += (p[c] = std::exp(z(c) - z(best)));
    loss += std::log(sum) + z(best) - z(labels[img]);
    for (int c = 0; c < classes; ++c) {
      const double target = c == labels[img] ? 1.0 : 0.0;
      dlogits.data[size_t(c) * n + img] = float(double(weight) * (p[c] / sum - target) / n);
    }
  }
  if (correct) *correct = right;
  return n > 0 ? loss / n : 0.0;
}

}  // namespace cimsweep::train
