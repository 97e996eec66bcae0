#include "train/layers.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <cstring>

namespace cimsweep::train {
namespace {

// GEMM columns (output positions) per work chunk. Fixed, never derived from the thread count, so
// that every chunk, and so every partial sum, is the same however many threads run.
constexpr int kChunkColumns = 2048;

int images_per_chunk(int out_h, int out_w) {
  return std::max(1, kChunkColumns / std::max(1, out_h * out_w));
}

// A 1×1, stride-1, unpadded convolution reads its input as the GEMM operand directly.
bool is_pointwise(const ConvGeometry& g) {
  return g.kernel == 1 && g.stride == 1 && g.pad == 0;
}

// col[(c, ky, kx), (image, oy, ox)] for images first … first+count−1.
void im2col(const ConvGeometry& g, const FeatureMap& x, int first, int count, int out_h, int out_w,
            float* col) {
  const int k = g.kernel, h = x.height, w = x.width;
  const size_t cols = size_t(count) * out_h * out_w;
  for (int c = 0; c < g.in_channels; ++c)
    for (int ky = 0; ky < k; ++ky)
      for (int kx = 0; kx < k; ++kx) {
        float* out = col + size_t((c * k + ky) * k + kx) * cols;
        // The output columns whose input column ix = ox·stride − pad + kx lies inside the image.
        const int ox_begin = std::clamp((g.pad - kx + g.stride - 1) / g.stride, 0, out_w);
        const int ox_end = std::clamp((w + g.pad - kx + g.stride - 1) / g.stride, ox_begin, out_w);
        for (int img = first; img < first + count; ++img) {
          const float* plane = x.data.data() + (size_t(c) * x.images + img) * x.plane();
          for (int oy = 0; oy < out_h; ++oy, out += out_w) {
            const int iy = oy * g.stride - g.pad + ky;
            if (iy < 0 || iy >= h) {
              std::fill(out, out + out_w, 0.0f);
              continue;
            }
            const float* in_row = plane + size_t(iy) * w;
            std::fill(out, out + ox_begin, 0.0f);
            if (g.stride == 1) {
              std::memcpy(out + ox_begin, in_row + ox_begin - g.pad + kx,
                          sizeof(float) * size_t(ox_end - ox_begin));
            } else {
              for (int ox = ox_begin; ox < ox_end; ++ox)
                out[ox] = in_row[ox * g.stride - g.pad + kx];
            }
            std::fill(out + ox_end, out + out_w, 0.0f);
          }
        }
      }
}

// The adjoint of im2col: dx[c, image, iy, ix] += dcol[(c, ky, kx), (image, oy, ox)].
void col2im(const ConvGeometry& g, const float* col, int first, int count, int out_h, int out_w,
            FeatureMap& dx) {
  const int k = g.kernel, h = dx.height, w = dx.width;
  const size_t cols = size_t(count) * out_h * out_w;
  for (int c = 0; c < g.in_channels; ++c)
    for (int ky = 0; ky < k; ++ky)
      for (int kx = 0; kx < k; ++kx) {
        const float* in = col + size_t((c * k + ky) * k + kx) * cols;
        const int ox_begin = std::clamp((g.pad - kx + g.stride - 1) / g.stride, 0, out_w);
        const int ox_end = std::clamp((w + g.pad - kx + g.stride - 1) / g.stride, ox_begin, out_w);
        for (int img = first; img < first + count; ++img) {
          float* plane = dx.data.data() + (size_t(c) * dx.images + img) * dx.plane();
          for (int oy = 0; oy < out_h; ++oy, in += out_w) {
            const int iy = oy * g.stride - g.pad + ky;
            if (iy < 0 || iy >= h) continue;
            float* out_row = plane + size_t(iy) * w;
            for (int ox = ox_begin; ox < ox_end; ++ox)
              out_row[ox * g.stride - g.pad + kx] += in[ox];
          }
        }
      }
}

}  // namespace

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
                        const FeatureMap& x) {
  const int out_h = g.output_size(x.height), out_w = g.output_size(x.width), n = x.images;
  FeatureMap y(g.out_channels, n, out_h, out_w);
  const int per_chunk = images_per_chunk(out_h, out_w);
  const int chunks = (n + per_chunk - 1) / per_chunk;
  const int rows = g.rows();
  const size_t ld_y = y.channel_size(), positions = size_t(out_h) * out_w;
  const bool pointwise = is_pointwise(g);
#pragma omp parallel if (chunks > 1)
  {
    std::vector<float> col;
#pragma omp for schedule(dynamic)
    for (int chunk = 0; chunk < chunks; ++chunk) {
      const int first = chunk * per_chunk, count = std::min(per_chunk, n - first);
      const size_t cols = size_t(count) * positions;
      const float* operand;
      size_t ld_operand;
      if (pointwise) {
        operand = x.data.data() + size_t(first) * positions;
        ld_operand = x.channel_size();
      } else {
        col.resize(size_t(rows) * cols);
        im2col(g, x, first, count, out_h, out_w, col.data());
        operand = col.data();
        ld_operand = cols;
      }
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, g.out_channels, int(cols), rows, 1.0f,
                  weight, rows, operand, int(ld_operand), 0.0f,
                  y.data.data() + size_t(first) * positions, int(ld_y));
    }
  }
  if (bias) {
    for (int o = 0; o < g.out_channels; ++o) {
      float* p = y.data.data() + size_t(o) * ld_y;
      for (size_t i = 0; i < ld_y; ++i) p[i] += bias[o];
    }
  }
  return y;
}

void conv_backward(const ConvGeometry& g, const float* weight, const FeatureMap& x,
                   const FeatureMap& dy, FeatureMap* dx, float* dweight, float* dbias) {
  const int out_h = dy.height, out_w = dy.width, n = x.images, rows = g.rows();
  const int per_chunk = images_per_chunk(out_h, out_w);
  const int chunks = (n + per_chunk - 1) / per_chunk;
  const size_t ld_dy = dy.channel_size(), positions = size_t(out_h) * out_w;
  const size_t weights = size_t(g.out_channels) * rows;
  const bool pointwise = is_pointwise(g);
  if (dx) *dx = FeatureMap(x.channels, x.images, x.height, x.width);
  std::vector<float> partial(size_t(chunks) * weights);
#pragma omp parallel if (chunks > 1)
  {
    std::vector<float> col, dcol;
#pragma omp for schedule(dynamic)
    for (int chunk = 0; chunk < chunks; ++chunk) {
      const int first = chunk * per_chunk, count = std::min(per_chunk, n - first);
      const size_t cols = size_t(count) * positions;
      const float* dy_chunk = dy.data.data() + size_t(first) * positions;
      const float* operand;
      size_t ld_operand;
      if (pointwise) {
        operand = x.data.data() + size_t(first) * positions;
        ld_operand = x.channel_size();
      } else {
        col.resize(size_t(rows) * cols);
        im2col(g, x, first, count, out_h, out_w, col.data());
        operand = col.data();
        ld_operand = cols;
      }
      // dW (this chunk) = dy · colᵀ
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, g.out_channels, rows, int(cols), 1.0f,
                  dy_chunk, int(ld_dy), operand, int(ld_operand), 0.0f,
                  partial.data() + size_t(chunk) * weights, rows);
      if (!dx) continue;
      // dcol = Wᵀ · dy, then scattered back onto the input (chunks own disjoint images).
      if (pointwise) {
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, rows, int(cols), g.out_channels, 1.0f,
                    weight, rows, dy_chunk, int(ld_dy), 0.0f,
                    dx->data.data() + size_t(first) * positions, int(dx->channel_size()));
      } else {
        dcol.resize(size_t(rows) * cols);
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, rows, int(cols), g.out_channels, 1.0f,
                    weight, rows, dy_chunk, int(ld_dy), 0.0f, dcol.data(), int(cols));
        col2im(g, dcol.data(), first, count, out_h, out_w, *dx);
      }
    }
  }
  // Chunk partial sums in chunk order: the same additions whatever thread computed which chunk.
  std::copy_n(partial.begin(), weights, dweight);
  for (int chunk = 1; chunk < chunks; ++chunk) {
    const float* p = partial.data() + size_t(chunk) * weights;
    for (size_t i = 0; i < weights; ++i) dweight[i] += p[i];
  }
  if (dbias) {
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
