// Labelled image data sets in memory, and the readers for the formats users have:
// CIFAR-10 binary batches, image folders (JPEG/PNG via stb), IDX and IDX.gz (MNIST, Fashion-MNIST).
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace cimsweep {

struct Dataset {
  int channels = 0;  // 1 (grey) or 3 (RGB)
  int height = 0;
  int width = 0;
  int num_classes = 0;
  std::vector<uint8_t> pixels;           // size() * channels * height * width, each image CHW
  std::vector<int32_t> labels;           // in [0, num_classes)
  std::vector<std::string> class_names;  // may be empty
  std::string description;               // e.g. "IDX /usr/share/datasets/fashion-mnist (t10k)"
  // Image folders: every image's "<class folder>/<file name>" (empty for the other formats).
  std::vector<std::string> image_names;
  // A subset (select_images): where each image stands in the reader's order of the whole data
  // set. Empty: image i is the reader's image i.
  std::vector<size_t> reader_indices;

  size_t size() const { return labels.size(); }
  size_t reader_index(size_t i) const { return reader_indices.empty() ? i : reader_indices[i]; }
  size_t image_elements() const { return size_t(channels) * height * width; }
  const uint8_t* image(size_t i) const { return pixels.data() + i * image_elements(); }
};

// Reads `path`, detecting the format:
//  - a directory holding IDX files ({train,t10k}-images-idx3-ubyte[.gz] + labels), or an
//    images IDX file whose labels file sits beside it;
//  - a CIFAR-10 binary file (*.bin) or a directory holding data_batch_{1..5}.bin / test_batch.bin
//    (possibly inside cifar-10-batches-bin/);
//  - an image-folder directory: one sub-directory per class (class index = sorted name order),
//    JPEG/PNG/BMP images, all the same size; possibly with train/ and test/ sub-directories.
// `split` is "test" or "train" and picks the files or sub-directory where the format has both.
// Throws UserError with a one-line message on a missing path, unknown layout, truncated or corrupt
// file, or inconsistent image sizes.
Dataset load_dataset(const std::string& path, const std::string& split);

// The first `limit` images taken class-balanced: round-robin over classes in label order, each
// class contributing its images in file order, so that every class gets floor or ceil of
// limit / num_classes images when it has enough. limit == 0 or >= size() returns everything.
Dataset balanced_subset(const Dataset& data, size_t limit);

// load_dataset, then its balanced_subset of `limit` images (0: every image); the subset's
// description names it.
Dataset load_balanced(const std::string& path, const std::string& split, long long limit);

// The images `which` (indices into data, in that order) as a data set of their own.
Dataset select_images(const Dataset& data, const std::vector<size_t>& which,
                      std::string description);

}  // namespace cimsweep
