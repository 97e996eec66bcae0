// A dense float32 tensor with a row-major shape: the one container used between model files,
// networks and backends.
#pragma once
#include <algorithm>
#include <cstdint>
#include <numeric>
#include <string>
#include <vector>

namespace cimsweep {

struct Tensor {
  std::vector<int64_t> shape;
  std::vector<float> data;

  Tensor() = default;
  explicit Tensor(std::vector<int64_t> s)
      : shape(std::move(s)), data(static_cast<size_t>(element_count(shape)), 0.0f) {}

  static int64_t element_count(const std::vector<int64_t>& s) {
    // A zero dim empties the tensor whatever the others are, and they may overflow (a file may
    // declare [2^62, 2^62, 0]): it is checked before any product is formed.
    if (std::find(s.begin(), s.end(), 0) != s.end()) return 0;
    return std::accumulate(s.begin(), s.end(), int64_t{1}, std::multiplies<int64_t>());
  }
  int64_t numel() const { return element_count(shape); }
  std::string shape_string() const {
    std::string out = "[";
    for (size_t i = 0; i < shape.size(); ++i) out += (i ? ", " : "") + std::to_string(shape[i]);
    return out + "]";
  }
};

}  // namespace cimsweep
