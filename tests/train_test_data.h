// Generated data for the training tests: small greyscale images whose class is the quadrant that
// holds a bright blob, in memory or written as an IDX directory that `cimsweep train --data` reads.
#pragma once
#include <cstdint>
#include <fstream>
#include <random>
#include <string>

#include "host/io/dataset.h"

namespace cimsweep::testing {

// `count` images of size×size pixels, classes 0…3 in turn: a 2×2 blob (200–255) at a random place
// inside quadrant (class / 2, class % 2), on noise (0–60). `classes` < 4 uses the first quadrants.
inline Dataset quadrant_blobs(size_t count, uint32_t seed, int size = 8, int classes = 4) {
  Dataset d;
  d.channels = 1;
  d.height = d.width = size;
  d.num_classes = classes;
  d.description = "quadrant blobs (seed " + std::to_string(seed) + ")";
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> noise(0, 60), bright(200, 255);
  const int half = size / 2;
  std::uniform_int_distribution<int> offset(0, half - 2);
  d.pixels.resize(count * size_t(size) * size);
  for (size_t i = 0; i < count; ++i) {
    const int label = int(i % size_t(classes));
    d.labels.push_back(label);
    uint8_t* image = d.pixels.data() + i * size_t(size) * size;
    for (int p = 0; p < size * size; ++p) image[p] = uint8_t(noise(rng));
    const int y0 = (label / 2) * half + offset(rng), x0 = (label % 2) * half + offset(rng);
    for (int y = y0; y < y0 + 2; ++y)
      for (int x = x0; x < x0 + 2; ++x) image[y * size + x] = uint8_t(bright(rng));
  }
  return d;
}

// Writes `{prefix}-images-idx3-ubyte` and `{prefix}-labels-idx1-ubyte` (uncompressed) into `dir`.
inline void write_idx(const Dataset& d, const std::string& dir, const std::string& prefix) {
  auto be32 = [](std::ofstream& out, uint32_t v) {
    const char bytes[4] = {char(v >> 24), char(v >> 16), char(v >> 8), char(v)};
    out.write(bytes, 4);
  };
  std::ofstream images(dir + "/" + prefix + "-images-idx3-ubyte", std::ios::binary);
  be32(images, 0x00000803);
  be32(images, uint32_t(d.size()));
  be32(images, uint32_t(d.height));
  be32(images, uint32_t(d.width));
  images.write(reinterpret_cast<const char*>(d.pixels.data()), std::streamsize(d.pixels.size()));
  std::ofstream labels(dir + "/" + prefix + "-labels-idx1-ubyte", std::ios::binary);
  be32(labels, 0x00000801);
  be32(labels, uint32_t(d.size()));
  for (int32_t l : d.labels) labels.put(char(l));
}

}  // namespace cimsweep::testing
