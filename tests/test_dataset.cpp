// Data set readers: every format is written here from random pixels, read back and compared
// exactly (JPEG, being lossy, only for shape); every user mistake must give a one-line UserError
// naming the path.
#include "host/io/dataset.h"

#include <gtest/gtest.h>
#include <stb/stb_image_write.h>
#include <zlib.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iostream>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "common/errors.h"
#include "tests/test_util.h"

namespace cimsweep {
namespace {

namespace fs = std::filesystem;
using testing::TempDir;
using testing::test_seed;

constexpr size_t kCifarImageBytes = 3 * 32 * 32;

std::vector<uint8_t> random_bytes(std::mt19937& rng, size_t count) {
  std::uniform_int_distribution<int> byte(0, 255);
  std::vector<uint8_t> bytes(count);
  for (uint8_t& b : bytes) b = uint8_t(byte(rng));
  return bytes;
}

std::vector<int32_t> random_labels(std::mt19937& rng, size_t count, int num_classes) {
  std::uniform_int_distribution<int> label(0, num_classes - 1);
  std::vector<int32_t> labels(count);
  for (int32_t& l : labels) l = label(rng);
  return labels;
}

void write_bytes(const std::string& path, const std::vector<uint8_t>& bytes) {
  std::ofstream out(path, std::ios::binary);
  out.write(reinterpret_cast<const char*>(bytes.data()), std::streamsize(bytes.size()));
  ASSERT_TRUE(out.good()) << path;
}

// Images and labels as the reader should return them; pixels CHW per image.
struct Expected {
  std::vector<uint8_t> pixels;
  std::vector<int32_t> labels;
};

Expected random_cifar(std::mt19937& rng, size_t count) {
  return {random_bytes(rng, count * kCifarImageBytes), random_labels(rng, count, 10)};
}

// The CIFAR-10 binary record layout is label byte + R, G, B planes: the same as CHW.
std::vector<uint8_t> cifar_records(const Expected& images) {
  std::vector<uint8_t> records;
  for (size_t i = 0; i < images.labels.size(); ++i) {
    records.push_back(uint8_t(images.labels[i]));
    records.insert(records.end(), images.pixels.begin() + i * kCifarImageBytes,
                   images.pixels.begin() + (i + 1) * kCifarImageBytes);
  }
  return records;
}

Expected concat(const std::vector<Expected>& parts) {
  Expected all;
  for (const Expected& part : parts) {
    all.pixels.insert(all.pixels.end(), part.pixels.begin(), part.pixels.end());
    all.labels.insert(all.labels.end(), part.labels.begin(), part.labels.end());
  }
  return all;
}

std::vector<uint8_t> big_endian(uint32_t value) {
  return {uint8_t(value >> 24), uint8_t(value >> 16), uint8_t(value >> 8), uint8_t(value)};
}

// An IDX file: magic, dimensions, then the bytes; gzip-compressed when the name ends with .gz.
void write_idx(const std::string& path, uint32_t magic, const std::vector<uint32_t>& dims,
               const std::vector<uint8_t>& body) {
  std::vector<uint8_t> bytes = big_endian(magic);
  for (uint32_t dim : dims) {
    const std::vector<uint8_t> word = big_endian(dim);
    bytes.insert(bytes.end(), word.begin(), word.end());
  }
  bytes.insert(bytes.end(), body.begin(), body.end());
  if (path.size() > 3 && path.compare(path.size() - 3, 3, ".gz") == 0) {
    gzFile file = gzopen(path.c_str(), "wb");
    ASSERT_NE(file, nullptr) << path;
    ASSERT_EQ(gzwrite(file, bytes.data(), unsigned(bytes.size())), int(bytes.size()));
    ASSERT_EQ(gzclose(file), Z_OK);
  } else {
    write_bytes(path, bytes);
  }
}

void write_idx_pair(const std::string& images_path, const std::string& labels_path,
                    const Expected& images, uint32_t height, uint32_t width) {
  std::vector<uint8_t> labels(images.labels.begin(), images.labels.end());
  write_idx(images_path, 0x803, {uint32_t(images.labels.size()), height, width}, images.pixels);
  write_idx(labels_path, 0x801, {uint32_t(labels.size())}, labels);
}

// Writes a CHW image as PNG (or JPEG), converting to the interleaved layout stb writes.
void write_image(const std::string& path, const uint8_t* chw, int channels, int height, int width) {
  std::vector<uint8_t> hwc(size_t(channels) * height * width);
  const size_t plane = size_t(height) * width;
  for (size_t p = 0; p < plane; ++p) {
    for (int c = 0; c < channels; ++c) hwc[p * channels + c] = chw[c * plane + p];
  }
  const bool jpeg = fs::path(path).extension() == ".jpg";
  const int ok =
      jpeg ? stbi_write_jpg(path.c_str(), width, height, channels, hwc.data(), 90)
           : stbi_write_png(path.c_str(), width, height, channels, hwc.data(), width * channels);
  ASSERT_NE(ok, 0) << path;
}

void expect_same(const Dataset& data, const Expected& expected) {
  ASSERT_EQ(data.size(), expected.labels.size());
  EXPECT_EQ(data.labels, expected.labels);
  ASSERT_EQ(data.pixels.size(), expected.pixels.size());
  // Find the first differing image rather than dumping megabytes of bytes.
  for (size_t i = 0; i < data.size(); ++i) {
    ASSERT_TRUE(std::equal(data.image(i), data.image(i) + data.image_elements(),
                           expected.pixels.begin() + i * data.image_elements()))
        << "pixels of image " << i << " differ";
  }
}

// Runs `load`, requiring a UserError whose one-line message contains every one of `fragments`.
void expect_user_error(const std::function<void()>& load,
                       const std::vector<std::string>& fragments) {
  try {
    load();
    ADD_FAILURE() << "no UserError thrown; expected one mentioning " << fragments.front();
  } catch (const UserError& error) {
    const std::string message = error.what();
    if (std::getenv("CIMSWEEP_SHOW_ERRORS")) std::cout << "  message: " << message << "\n";
    EXPECT_EQ(message.find('\n'), std::string::npos) << "message is not one line: " << message;
    for (const std::string& fragment : fragments) {
      EXPECT_NE(message.find(fragment), std::string::npos)
          << "message lacks '" << fragment << "': " << message;
    }
  }
}

// ------------------------------------------------------------------------------------------------
// CIFAR-10 binary

TEST(CifarBinary, SingleFileRoundTrips) {
  std::mt19937 rng(test_seed(101));
  TempDir dir;
  const Expected images = random_cifar(rng, 33);
  write_bytes(dir.file("test_batch.bin"), cifar_records(images));

  const Dataset data = load_dataset(dir.file("test_batch.bin"), "test");
  EXPECT_EQ(data.channels, 3);
  EXPECT_EQ(data.height, 32);
  EXPECT_EQ(data.width, 32);
  EXPECT_EQ(data.num_classes, 10);
  ASSERT_EQ(data.class_names.size(), 10u);
  EXPECT_EQ(data.class_names[0], "airplane");
  EXPECT_EQ(data.class_names[9], "truck");
  EXPECT_NE(data.description.find("test_batch.bin"), std::string::npos) << data.description;
  expect_same(data, images);
}

TEST(CifarBinary, DirectoryFormsPickTheSplit) {
  std::mt19937 rng(test_seed(102));
  TempDir root;
  const fs::path batches = fs::path(root.path()) / "cifar-10-batches-bin";
  fs::create_directory(batches);
  const Expected test = random_cifar(rng, 7);
  const std::vector<Expected> train = {random_cifar(rng, 5), random_cifar(rng, 11),
                                       random_cifar(rng, 1)};
  write_bytes((batches / "test_batch.bin").string(), cifar_records(test));
  for (size_t b = 0; b < train.size(); ++b) {
    write_bytes((batches / ("data_batch_" + std::to_string(b + 1) + ".bin")).string(),
                cifar_records(train[b]));
  }

  // The directory the official archive extracts into, and the batches directory itself.
  for (const std::string& path : {root.path(), batches.string()}) {
    SCOPED_TRACE(path);
    expect_same(load_dataset(path, "test"), test);
    const Dataset train_data = load_dataset(path, "train");
    expect_same(train_data, concat(train));  // batches 1, 2, 3 in that order
    EXPECT_NE(train_data.description.find("data_batch_3.bin"), std::string::npos);
  }
}

TEST(CifarBinary, ClassNamesComeFromBatchesMeta) {
  std::mt19937 rng(test_seed(103));
  TempDir dir;
  write_bytes(dir.file("test_batch.bin"), cifar_records(random_cifar(rng, 3)));
  // The official file has one name per line and trailing blank lines; CRLF must not leak in.
  testing::write_text(dir.file("batches.meta.txt"),
                      "plane\ncar\nbird\ncat\ndeer\ndog\nfrog\nhorse\nship\r\nlorry\n\n\n");
  const Dataset data = load_dataset(dir.path(), "test");
  const std::vector<std::string> expected = {"plane", "car",  "bird",  "cat",  "deer",
                                             "dog",   "frog", "horse", "ship", "lorry"};
  EXPECT_EQ(data.class_names, expected);
  EXPECT_EQ(data.num_classes, 10);
}

TEST(CifarBinary, MissingSplitIsAnError) {
  std::mt19937 rng(test_seed(104));
  TempDir dir;
  write_bytes(dir.file("data_batch_1.bin"), cifar_records(random_cifar(rng, 2)));
  EXPECT_EQ(load_dataset(dir.path(), "train").size(), 2u);
  expect_user_error([&] { load_dataset(dir.path(), "test"); }, {dir.path(), "test_batch.bin"});
}

TEST(CifarBinary, TruncatedFileIsAnError) {
  std::mt19937 rng(test_seed(105));
  TempDir dir;
  std::vector<uint8_t> records = cifar_records(random_cifar(rng, 4));
  records.resize(records.size() - 100);  // a download cut short inside the last record
  write_bytes(dir.file("test_batch.bin"), records);
  expect_user_error([&] { load_dataset(dir.file("test_batch.bin"), "test"); },
                    {dir.file("test_batch.bin"), "truncated", std::to_string(records.size())});
  expect_user_error([&] { load_dataset(dir.path(), "test"); },
                    {dir.file("test_batch.bin"), "truncated"});
  write_bytes(dir.file("empty.bin"), {});
  expect_user_error([&] { load_dataset(dir.file("empty.bin"), "test"); },
                    {dir.file("empty.bin"), "truncated"});
}

TEST(CifarBinary, LabelOutsideTenClassesIsAnError) {
  std::mt19937 rng(test_seed(106));
  TempDir dir;
  Expected images = random_cifar(rng, 5);
  images.labels[3] = 10;
  write_bytes(dir.file("data.bin"), cifar_records(images));
  expect_user_error([&] { load_dataset(dir.file("data.bin"), "test"); },
                    {dir.file("data.bin"), "label 10", "image 3"});
}

// ------------------------------------------------------------------------------------------------
// IDX

TEST(Idx, RawFilesRoundTripFromDirectoryAndImagesFile) {
  std::mt19937 rng(test_seed(201));
  TempDir dir;
  // 33 images of 5x7 (non-square, so height and width cannot be swapped unnoticed), 7 classes.
  const Expected images = {random_bytes(rng, 33 * 5 * 7), random_labels(rng, 33, 7)};
  write_idx_pair(dir.file("t10k-images-idx3-ubyte"), dir.file("t10k-labels-idx1-ubyte"), images, 5,
                 7);

  for (const std::string& path : {dir.path(), dir.file("t10k-images-idx3-ubyte")}) {
    SCOPED_TRACE(path);
    const Dataset data = load_dataset(path, "test");
    EXPECT_EQ(data.channels, 1);
    EXPECT_EQ(data.height, 5);
    EXPECT_EQ(data.width, 7);
    EXPECT_EQ(data.num_classes, *std::max_element(images.labels.begin(), images.labels.end()) + 1);
    expect_same(data, images);
  }
}

TEST(Idx, GzipFilesRoundTripForTrainSplit) {
  std::mt19937 rng(test_seed(202));
  TempDir dir;
  const Expected train = {random_bytes(rng, 40 * 28 * 28), random_labels(rng, 40, 10)};
  const Expected test = {random_bytes(rng, 9 * 28 * 28), random_labels(rng, 9, 10)};
  write_idx_pair(dir.file("train-images-idx3-ubyte.gz"), dir.file("train-labels-idx1-ubyte.gz"),
                 train, 28, 28);
  // A gunzipped labels file beside a gzip images file is found too.
  write_idx_pair(dir.file("t10k-images-idx3-ubyte.gz"), dir.file("t10k-labels-idx1-ubyte"), test,
                 28, 28);

  const Dataset train_data = load_dataset(dir.path(), "train");
  EXPECT_EQ(train_data.height, 28);
  expect_same(train_data, train);
  EXPECT_NE(train_data.description.find("IDX"), std::string::npos);
  expect_same(load_dataset(dir.path(), "test"), test);
  expect_same(load_dataset(dir.file("t10k-images-idx3-ubyte.gz"), "train"), test);
}

TEST(Idx, OneClassStillMeansTwoClasses) {
  TempDir dir;
  const Expected images = {std::vector<uint8_t>(3 * 2 * 2, 7), {0, 0, 0}};
  write_idx_pair(dir.file("t10k-images-idx3-ubyte"), dir.file("t10k-labels-idx1-ubyte"), images, 2,
                 2);
  EXPECT_EQ(load_dataset(dir.path(), "test").num_classes, 2);
}

TEST(Idx, TruncatedImagesOrLabelsAreErrors) {
  std::mt19937 rng(test_seed(203));
  TempDir dir;
  std::vector<uint8_t> pixels = random_bytes(rng, 10 * 4 * 4);
  const std::vector<uint8_t> labels(10, 1);
  pixels.resize(pixels.size() - 5);
  for (const std::string suffix : {"", ".gz"}) {
    SCOPED_TRACE("suffix '" + suffix + "'");
    const std::string images_path = dir.file("t10k-images-idx3-ubyte" + suffix);
    const std::string labels_path = dir.file("t10k-labels-idx1-ubyte" + suffix);
    write_idx(images_path, 0x803, {10, 4, 4}, pixels);
    write_idx(labels_path, 0x801, {10}, labels);
    expect_user_error([&] { load_dataset(images_path, "test"); },
                      {images_path, "truncated", "160", std::to_string(pixels.size())});

    write_idx(images_path, 0x803, {10, 4, 4}, random_bytes(rng, 160));
    write_idx(labels_path, 0x801, {10}, std::vector<uint8_t>(9, 1));
    expect_user_error([&] { load_dataset(images_path, "test"); }, {labels_path, "truncated"});
    fs::remove(images_path);
    fs::remove(labels_path);
  }
  // A file cut inside its header.
  write_bytes(dir.file("t10k-images-idx3-ubyte"), {0, 0, 8, 3, 0, 0});
  write_idx(dir.file("t10k-labels-idx1-ubyte"), 0x801, {1}, {0});
  expect_user_error([&] { load_dataset(dir.path(), "test"); },
                    {dir.file("t10k-images-idx3-ubyte"), "truncated"});
}

TEST(Idx, BadMagicIsAnError) {
  TempDir dir;
  write_idx(dir.file("t10k-images-idx3-ubyte"), 0x803, {1, 2, 2}, {1, 2, 3, 4});
  write_idx(dir.file("t10k-labels-idx1-ubyte"), 0x803, {1, 1, 1}, {0});  // images magic for labels
  expect_user_error([&] { load_dataset(dir.path(), "test"); },
                    {dir.file("t10k-labels-idx1-ubyte"), "magic", "0x00000801"});

  // An images file with a float type code (0x0d) is not something this reader takes.
  write_idx(dir.file("t10k-images-idx3-ubyte"), 0xd03, {1, 2, 2}, std::vector<uint8_t>(16));
  expect_user_error([&] { load_dataset(dir.path(), "test"); },
                    {dir.file("t10k-images-idx3-ubyte"), "magic", "0x00000d03"});
}

TEST(Idx, LabelCountMustMatchImageCount) {
  std::mt19937 rng(test_seed(204));
  TempDir dir;
  write_idx(dir.file("t10k-images-idx3-ubyte.gz"), 0x803, {6, 3, 3}, random_bytes(rng, 54));
  write_idx(dir.file("t10k-labels-idx1-ubyte.gz"), 0x801, {5}, {0, 1, 2, 3, 4});
  expect_user_error([&] { load_dataset(dir.path(), "test"); },
                    {dir.file("t10k-labels-idx1-ubyte.gz"), "5 labels", "6 images"});
}

TEST(Idx, Label255IsAnError) {
  TempDir dir;
  write_idx(dir.file("t10k-images-idx3-ubyte"), 0x803, {2, 1, 1}, {0, 0});
  write_idx(dir.file("t10k-labels-idx1-ubyte"), 0x801, {2}, {3, 255});
  expect_user_error([&] { load_dataset(dir.path(), "test"); },
                    {dir.file("t10k-labels-idx1-ubyte"), "255"});
}

TEST(Idx, MissingLabelsFileOrWrongSplitIsAnError) {
  TempDir dir;
  write_idx(dir.file("train-images-idx3-ubyte"), 0x803, {1, 1, 1}, {0});
  expect_user_error([&] { load_dataset(dir.file("train-images-idx3-ubyte"), "train"); },
                    {dir.file("train-labels-idx1-ubyte")});
  write_idx(dir.file("train-labels-idx1-ubyte"), 0x801, {1}, {0});
  expect_user_error([&] { load_dataset(dir.path(), "test"); }, {dir.path(), "t10k"});
  expect_user_error([&] { load_dataset(dir.file("train-labels-idx1-ubyte"), "train"); },
                    {dir.file("train-labels-idx1-ubyte"), "labels file"});
}

// ------------------------------------------------------------------------------------------------
// Image folders

// Writes `count_per_class[k]` random PNGs into root/<class_names[k]>/ and returns the images in
// the order the reader should produce: classes by sorted name, files by sorted name.
Expected write_png_folder(std::mt19937& rng, const fs::path& root,
                          const std::vector<std::string>& class_names,
                          const std::vector<int>& count_per_class, int channels, int height,
                          int width) {
  std::map<std::string, std::vector<std::vector<uint8_t>>> by_class;
  for (size_t k = 0; k < class_names.size(); ++k) {
    fs::create_directories(root / class_names[k]);
    for (int i = 0; i < count_per_class[k]; ++i) {
      std::vector<uint8_t> chw = random_bytes(rng, size_t(channels) * height * width);
      char name[32];
      std::snprintf(name, sizeof(name), "%04d.png", i);
      write_image((root / class_names[k] / name).string(), chw.data(), channels, height, width);
      by_class[class_names[k]].push_back(std::move(chw));
    }
  }
  Expected expected;
  int32_t label = 0;
  for (const auto& [name, images] : by_class) {  // std::map iterates in sorted name order
    for (const std::vector<uint8_t>& chw : images) {
      expected.pixels.insert(expected.pixels.end(), chw.begin(), chw.end());
      expected.labels.push_back(label);
    }
    ++label;
  }
  return expected;
}

TEST(ImageFolder, RgbPngsRoundTripInSortedClassOrder) {
  std::mt19937 rng(test_seed(301));
  TempDir dir;
  // Created out of order: class indices must follow sorted names, not creation order.
  const std::vector<std::string> names = {"truck", "airplane", "cat", "bird", "dog", "frog", "emu"};
  const Expected expected =
      write_png_folder(rng, dir.path(), names, {5, 4, 6, 1, 7, 3, 7}, 3, 9, 11);  // 33 images
  const Dataset data = load_dataset(dir.path(), "test");
  EXPECT_EQ(data.channels, 3);
  EXPECT_EQ(data.height, 9);
  EXPECT_EQ(data.width, 11);
  EXPECT_EQ(data.num_classes, 7);
  const std::vector<std::string> sorted = {"airplane", "bird", "cat",  "dog",
                                           "emu",      "frog", "truck"};
  EXPECT_EQ(data.class_names, sorted);
  expect_same(data, expected);
}

TEST(ImageFolder, GreyPngsGiveOneChannel) {
  std::mt19937 rng(test_seed(302));
  TempDir dir;
  const Expected expected = write_png_folder(rng, dir.path(), {"0", "1", "2"}, {2, 3, 4}, 1, 6, 5);
  const Dataset data = load_dataset(dir.path(), "train");
  EXPECT_EQ(data.channels, 1);
  expect_same(data, expected);
}

TEST(ImageFolder, MixedGreyAndColourLoadAsRgb) {
  std::mt19937 rng(test_seed(303));
  TempDir dir;
  fs::create_directories(fs::path(dir.path()) / "a");
  fs::create_directories(fs::path(dir.path()) / "b");
  const int h = 4, w = 3, plane = h * w;
  const std::vector<uint8_t> grey = random_bytes(rng, plane);
  const std::vector<uint8_t> rgba = random_bytes(rng, 4 * plane);
  const std::vector<uint8_t> rgb = random_bytes(rng, 3 * plane);
  write_image(dir.file("a/0.png"), grey.data(), 1, h, w);
  write_image(dir.file("a/1.png"), rgba.data(), 4, h, w);
  write_image(dir.file("b/0.png"), rgb.data(), 3, h, w);

  const Dataset data = load_dataset(dir.path(), "test");
  ASSERT_EQ(data.channels, 3);
  Expected expected;
  for (int c = 0; c < 3; ++c) {  // grey is replicated to R, G and B
    expected.pixels.insert(expected.pixels.end(), grey.begin(), grey.end());
  }
  expected.pixels.insert(expected.pixels.end(), rgba.begin(), rgba.begin() + 3 * plane);
  expected.pixels.insert(expected.pixels.end(), rgb.begin(), rgb.end());
  expected.labels = {0, 0, 1};
  expect_same(data, expected);
}

TEST(ImageFolder, TrainAndTestSubdirectoriesPickTheSplit) {
  std::mt19937 rng(test_seed(304));
  TempDir dir;
  const fs::path root(dir.path());
  const Expected train = write_png_folder(rng, root / "train", {"x", "y"}, {3, 2}, 3, 4, 4);
  const Expected test = write_png_folder(rng, root / "test", {"x", "y"}, {1, 2}, 3, 4, 4);
  expect_same(load_dataset(dir.path(), "train"), train);
  const Dataset test_data = load_dataset(dir.path(), "test");
  expect_same(test_data, test);
  EXPECT_NE(test_data.description.find("test"), std::string::npos);

  // What the CIFAR JPEG archives extract to: only one split present.
  fs::remove_all(root / "train");
  expect_same(load_dataset(dir.path(), "test"), test);
  expect_user_error([&] { load_dataset(dir.path(), "train"); }, {dir.path(), "train"});
}

TEST(ImageFolder, JpegsLoadWithTheRightShape) {
  std::mt19937 rng(test_seed(305));
  TempDir dir;
  for (const std::string cls : {"cat", "dog"}) {
    fs::create_directories(fs::path(dir.path()) / cls);
    for (int i = 0; i < 3; ++i) {
      const std::vector<uint8_t> chw = random_bytes(rng, 3 * 12 * 16);
      write_image(dir.file(cls + "/" + std::to_string(i) + ".jpg"), chw.data(), 3, 12, 16);
    }
  }
  // Files that are not images are ignored.
  testing::write_text(dir.file("cat/notes.txt"), "not an image");
  const Dataset data = load_dataset(dir.path(), "test");
  EXPECT_EQ(data.size(), 6u);
  EXPECT_EQ(data.channels, 3);
  EXPECT_EQ(data.height, 12);
  EXPECT_EQ(data.width, 16);
  EXPECT_EQ(data.pixels.size(), 6u * 3 * 12 * 16);
  EXPECT_EQ(data.labels, (std::vector<int32_t>{0, 0, 0, 1, 1, 1}));
}

TEST(ImageFolder, ImagesOfDifferentSizesAreAnError) {
  std::mt19937 rng(test_seed(306));
  TempDir dir;
  write_png_folder(rng, dir.path(), {"a", "b"}, {2, 2}, 3, 8, 8);
  const std::vector<uint8_t> odd = random_bytes(rng, 3 * 8 * 9);
  write_image(dir.file("b/9.png"), odd.data(), 3, 8, 9);
  expect_user_error([&] { load_dataset(dir.path(), "test"); }, {dir.file("b/9.png"), "8x9"});
}

TEST(ImageFolder, CorruptImageIsAnError) {
  std::mt19937 rng(test_seed(307));
  TempDir dir;
  write_png_folder(rng, dir.path(), {"a", "b"}, {1, 1}, 1, 2, 2);
  testing::write_text(dir.file("a/broken.png"), "this is not a PNG");
  expect_user_error([&] { load_dataset(dir.path(), "test"); }, {dir.file("a/broken.png")});
}

// Regressions (fuzz/fuzz_image_folder): bytes that Debian's stb_image 2.27 mishandles are refused
// before stb sees them, each with a one-line error naming the file.
std::string png_chunk(const std::string& type, const std::string& body) {
  const auto big_endian_text = [](uint32_t value) {
    const std::vector<uint8_t> bytes = big_endian(value);
    return std::string(bytes.begin(), bytes.end());
  };
  const std::string typed = type + body;
  const uLong crc = crc32(0, reinterpret_cast<const Bytef*>(typed.data()), uInt(typed.size()));
  return big_endian_text(uint32_t(body.size())) + typed + big_endian_text(uint32_t(crc));
}

TEST(ImageFolder, BytesStbMishandlesAreRefusedBeforeDecoding) {
  std::mt19937 rng(test_seed(309));
  const auto expect_refused = [&](const std::string& name, const std::string& bytes,
                                  const std::string& fragment) {
    TempDir dir;
    write_png_folder(rng, dir.path(), {"a", "b"}, {1, 1}, 1, 2, 2);
    testing::write_text(dir.file("b/" + name), bytes);
    expect_user_error([&] { load_dataset(dir.path(), "test"); }, {dir.file("b/" + name), fragment});
  };
  // A GIF named .png: stb would pick its GIF decoder by content.
  expect_refused("0x.png", "GIF89a" + std::string(20, '\0'), "not a JPEG, PNG or BMP file");

  // A JPEG whose Huffman table declares 16 × 200 codes: stb 2.27 writes past its 257-byte table.
  TempDir source;
  const std::vector<uint8_t> grey = random_bytes(rng, 8 * 8);
  write_image(source.file("x.jpg"), grey.data(), 1, 8, 8);
  std::string jpeg = testing::read_text(source.file("x.jpg"));
  const size_t dht = jpeg.find("\xff\xc4");
  ASSERT_NE(dht, std::string::npos);
  for (size_t i = 0; i < 16; ++i) jpeg[dht + 5 + i] = char(200);
  expect_refused("0x.jpg", jpeg, "Huffman table declares 3200 codes");

  // A PNG chunk declaring 1 GB: stb reserved that much before finding the file too short.
  const std::string signature = "\x89PNG\r\n\x1a\n";
  const std::string header = png_chunk("IHDR", std::string("\0\0\0\2\0\0\0\2\x08\0\0\0\0", 13));
  expect_refused("0x.png", signature + header + std::string("\x40\0\0\x12IDAT", 8) + "xx",
                 "PNG chunk declares 1073741842 bytes");

  // Sizes stb's header pass reports without checking: 5000×5000, and a BMP width below zero.
  const std::string huge =
      png_chunk("IHDR", std::string("\0\0\x13\x88\0\0\x13\x88\x08\0\0\0\0", 13));
  expect_refused("0x.png", signature + huge + png_chunk("IEND", ""), "declares 5000x5000");
  std::string bmp = "BM" + std::string(12, '\0');  // file header: size, reserved, pixel offset
  bmp[10] = 54;
  const std::string info("\x28\0\0\0\xc9\x01\0\xc0\x02\0\0\0\x01\0\x18\0", 16);  // width < 0
  expect_refused("0x.bmp", bmp + info + std::string(40, '\0'), "declares 2x-1073741367");
}

TEST(ImageFolder, EmptyOrUnusableDirectoriesAreErrors) {
  TempDir dir;
  expect_user_error([&] { load_dataset(dir.path(), "test"); }, {dir.path(), "--data"});

  fs::create_directories(fs::path(dir.path()) / "a");
  fs::create_directories(fs::path(dir.path()) / "b");
  expect_user_error([&] { load_dataset(dir.path(), "test"); }, {dir.path(), "no .jpg"});

  // Images directly in the directory, without class sub-directories.
  TempDir loose;
  const std::vector<uint8_t> pixel = {1, 2, 3};
  write_image(loose.file("0.png"), pixel.data(), 3, 1, 1);
  expect_user_error([&] { load_dataset(loose.path(), "test"); }, {loose.path(), "class"});
}

TEST(ImageFolder, LargeFolderDecodesInParallelAndReportsTheFirstBadFile) {
  std::mt19937 rng(test_seed(308));
  TempDir dir;
  // Enough images for the loader to use several threads (it starts one per 512 images).
  const Expected expected =
      write_png_folder(rng, dir.path(), {"a", "b", "c"}, {500, 401, 300}, 1, 2, 3);
  expect_same(load_dataset(dir.path(), "test"), expected);

  // Two broken files far apart: whichever thread finds its file first, the error names the one a
  // serial loader would have met first.
  testing::write_text(dir.file("a/0100x.png"), "broken");
  testing::write_text(dir.file("c/0250x.png"), "broken");
  for (int attempt = 0; attempt < 3; ++attempt) {
    expect_user_error([&] { load_dataset(dir.path(), "test"); }, {dir.file("a/0100x.png")});
  }
}

// ------------------------------------------------------------------------------------------------
// Paths and arguments

TEST(LoadDataset, MissingPathIsAnError) {
  TempDir dir;
  const std::string missing = dir.file("no-such-data");
  expect_user_error([&] { load_dataset(missing, "test"); },
                    {"'" + missing + "'", "does not exist", "--data"});
  expect_user_error([&] { load_dataset("", "test"); }, {"does not exist"});
}

TEST(LoadDataset, UnknownFileOrSplitIsAnError) {
  TempDir dir;
  testing::write_text(dir.file("notes.txt"), "hello");
  expect_user_error([&] { load_dataset(dir.file("notes.txt"), "test"); }, {dir.file("notes.txt")});
  expect_user_error([&] { load_dataset(dir.path(), "validation"); }, {"validation"});
}

// ------------------------------------------------------------------------------------------------
// balanced_subset

// A data set whose image i is filled with the value i, so that selections can be traced.
Dataset traced_dataset(const std::vector<int32_t>& labels, int num_classes) {
  Dataset data;
  data.channels = 1;
  data.height = 2;
  data.width = 1;
  data.num_classes = num_classes;
  data.labels = labels;
  for (size_t i = 0; i < labels.size(); ++i) {
    data.pixels.push_back(uint8_t(i));
    data.pixels.push_back(uint8_t(i));
  }
  return data;
}

std::vector<int> class_counts(const Dataset& data) {
  std::vector<int> counts(size_t(data.num_classes), 0);
  for (int32_t label : data.labels) ++counts[size_t(label)];
  return counts;
}

TEST(BalancedSubset, RoundRobinInLabelOrderWithFileOrderWithinClasses) {
  // Labels:      0  1  0  2  1  0  2  2
  const Dataset data = traced_dataset({0, 1, 0, 2, 1, 0, 2, 2}, 3);
  const Dataset subset = balanced_subset(data, 5);
  ASSERT_EQ(subset.size(), 5u);
  // Round 0: first of class 0, 1, 2 (images 0, 1, 3); round 1: second of class 0, 1 (2, 4).
  EXPECT_EQ(subset.labels, (std::vector<int32_t>{0, 1, 2, 0, 1}));
  const std::vector<uint8_t> expected_pixels = {0, 0, 1, 1, 3, 3, 2, 2, 4, 4};
  EXPECT_EQ(subset.pixels, expected_pixels);
  EXPECT_EQ(subset.num_classes, 3);
  EXPECT_EQ(subset.height, 2);
}

TEST(BalancedSubset, CountsAreFloorOrCeilAndShortClassesGiveWay) {
  std::mt19937 rng(test_seed(401));
  // 33 images, 7 classes; class 3 has a single image and class 6 none.
  std::vector<int32_t> labels;
  const std::vector<int> sizes = {6, 5, 7, 1, 8, 6, 0};
  for (size_t k = 0; k < sizes.size(); ++k) labels.insert(labels.end(), size_t(sizes[k]), int(k));
  std::shuffle(labels.begin(), labels.end(), rng);
  const Dataset data = traced_dataset(labels, 7);

  EXPECT_EQ(class_counts(balanced_subset(data, 10)), (std::vector<int>{2, 2, 2, 1, 2, 1, 0}));
  // 20 over 5 usable classes after class 3's single image: 1 + 19 → 4,4,4,(1),4,3.
  EXPECT_EQ(class_counts(balanced_subset(data, 20)), (std::vector<int>{4, 4, 4, 1, 4, 3, 0}));
  EXPECT_EQ(class_counts(balanced_subset(data, 32)), (std::vector<int>{6, 5, 7, 1, 7, 6, 0}));

  // Every limit: counts differ by at most one among classes that were not exhausted, and each
  // smaller subset is a prefix of a larger one.
  const Dataset everything = balanced_subset(data, 33);
  for (size_t limit = 1; limit < data.size(); ++limit) {
    const Dataset subset = balanced_subset(data, limit);
    ASSERT_EQ(subset.size(), limit);
    const std::vector<int> counts = class_counts(subset);
    int low = 1 << 30, high = 0;
    for (size_t k = 0; k < sizes.size(); ++k) {
      if (counts[k] < sizes[k]) low = std::min(low, counts[k]);
      high = std::max(high, counts[k]);
    }
    EXPECT_LE(high - low, 1) << "limit " << limit;
    EXPECT_TRUE(std::equal(subset.labels.begin(), subset.labels.end(),
                           balanced_subset(data, 32).labels.begin()))
        << "limit " << limit;
  }
  EXPECT_EQ(everything.labels, data.labels);  // limit >= size returns everything as it is
}

TEST(BalancedSubset, ZeroOrLargeLimitReturnsEverythingAndIsDeterministic) {
  std::mt19937 rng(test_seed(402));
  const Dataset data = traced_dataset(random_labels(rng, 33, 7), 7);
  EXPECT_EQ(balanced_subset(data, 0).labels, data.labels);
  EXPECT_EQ(balanced_subset(data, 1000).pixels, data.pixels);
  const Dataset first = balanced_subset(data, 17), second = balanced_subset(data, 17);
  EXPECT_EQ(first.labels, second.labels);
  EXPECT_EQ(first.pixels, second.pixels);
}

}  // namespace
}  // namespace cimsweep
