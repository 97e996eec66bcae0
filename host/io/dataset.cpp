// Readers for the data set formats users have: CIFAR-10 binary batches, IDX (MNIST family, raw or
// gzip) and image folders (JPEG/PNG/BMP through stb_image). Everything a user can get wrong becomes
// a one-line UserError naming the path and saying what to do.
#include "host/io/dataset.h"

#include <stb/stb_image.h>
#include <zlib.h>

#include <algorithm>
#include <cctype>
#include <climits>
#include <cstdio>
#include <exception>
#include <filesystem>
#include <fstream>
#include <functional>
#include <initializer_list>
#include <iterator>
#include <memory>
#include <system_error>
#include <thread>

#include "common/errors.h"

namespace cimsweep {
namespace {

namespace fs = std::filesystem;

constexpr int kCifarSide = 32;
constexpr int kCifarChannels = 3;
constexpr size_t kCifarImageBytes = size_t(kCifarChannels) * kCifarSide * kCifarSide;  // 3072
constexpr size_t kCifarRecordBytes = 1 + kCifarImageBytes;                             // 3073
constexpr uint32_t kIdxImagesMagic = 0x00000803;  // unsigned byte, 3 dimensions
constexpr uint32_t kIdxLabelsMagic = 0x00000801;  // unsigned byte, 1 dimension
// Reads grow the buffer chunk by chunk so that a corrupt header claiming billions of images costs
// no more memory than the bytes the file really holds.
constexpr size_t kReadChunkBytes = size_t(16) << 20;

const char* const kCifarDefaultClassNames[] = {"airplane", "automobile", "bird",  "cat",  "deer",
                                               "dog",      "frog",       "horse", "ship", "truck"};

std::string quoted(const fs::path& path) {
  return "'" + path.string() + "'";
}

std::string to_lower(std::string text) {
  for (char& c : text) c = char(std::tolower(static_cast<unsigned char>(c)));
  return text;
}

bool ends_with(const std::string& text, const std::string& suffix) {
  return text.size() >= suffix.size() &&
         text.compare(text.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// is_directory/is_regular_file that never throw: a permission problem reads as "not there" and is
// reported by the caller with the path.
bool is_dir(const fs::path& path) {
  std::error_code ignored;
  return fs::is_directory(path, ignored);
}
bool is_file(const fs::path& path) {
  std::error_code ignored;
  return fs::is_regular_file(path, ignored);
}

// Entries of `dir` (not hidden), sorted by name so that every listing is deterministic.
std::vector<fs::path> sorted_entries(const fs::path& dir) {
  std::vector<fs::path> entries;
  std::error_code error;
  fs::directory_iterator it(dir, error), end;
  if (error) {
    throw UserError("cannot list directory " + quoted(dir) + ": " + error.message() +
                    "; check that it exists and is readable");
  }
  for (; it != end; it.increment(error)) {
    if (error) {
      throw UserError("cannot list directory " + quoted(dir) + ": " + error.message() +
                      "; check that it is readable");
    }
    const std::string name = it->path().filename().string();
    if (!name.empty() && name[0] != '.') entries.push_back(it->path());
  }
  std::sort(entries.begin(), entries.end(),
            [](const fs::path& a, const fs::path& b) { return a.filename() < b.filename(); });
  return entries;
}

// ---------------------------------------------------------------------------------------------
// CIFAR-10 binary

std::vector<std::string> read_cifar_class_names(const fs::path& dir) {
  const fs::path meta = dir / "batches.meta.txt";
  std::vector<std::string> names;
  std::ifstream in(meta);
  if (!in) return {kCifarDefaultClassNames, kCifarDefaultClassNames + 10};
  std::string line;
  while (std::getline(in, line)) {
    // The official file ends with blank lines and may have CRLF endings: keep the real names only.
    const auto first = line.find_first_not_of(" \t\r\n");
    if (first == std::string::npos) continue;
    const auto last = line.find_last_not_of(" \t\r\n");
    names.push_back(line.substr(first, last - first + 1));
  }
  if (names.size() < 2) {
    throw UserError(quoted(meta) + " lists " + std::to_string(names.size()) +
                    " class names, expected one per line (10 for CIFAR-10); fix or delete it");
  }
  return names;
}

// Appends the records of one batch file to `data`, whose class_names are already set.
void append_cifar_batch(const fs::path& file, Dataset& data) {
  std::ifstream in(file, std::ios::binary);
  if (!in) {
    throw UserError("cannot open " + quoted(file) + "; check that it exists and is readable");
  }
  std::error_code error;
  const uintmax_t file_bytes = fs::file_size(file, error);
  if (error) {
    throw UserError("cannot read the size of " + quoted(file) + ": " + error.message() +
                    "; check that it is a readable file");
  }
  if (file_bytes == 0 || file_bytes % kCifarRecordBytes != 0) {
    throw UserError(quoted(file) + " is truncated: expected a non-zero multiple of " +
                    std::to_string(kCifarRecordBytes) +
                    " bytes (1 label + 3072 pixels per image), found " +
                    std::to_string(file_bytes) + "; re-download it (CIFAR-10 binary version)");
  }
  const size_t count = size_t(file_bytes / kCifarRecordBytes);
  std::vector<uint8_t> records(static_cast<size_t>(file_bytes));
  in.read(reinterpret_cast<char*>(records.data()), std::streamsize(records.size()));
  if (size_t(in.gcount()) != records.size()) {
    throw UserError(quoted(file) + " is truncated: expected " + std::to_string(records.size()) +
                    " bytes, read " + std::to_string(in.gcount()) + "; re-download it");
  }
  const size_t first = data.labels.size();
  data.labels.resize(first + count);
  data.pixels.resize((first + count) * kCifarImageBytes);
  const int num_classes = int(data.class_names.size());
  for (size_t i = 0; i < count; ++i) {
    const uint8_t* record = records.data() + i * kCifarRecordBytes;
    if (record[0] >= num_classes) {
      throw UserError(
          "image " + std::to_string(i) + " of " + quoted(file) + " has label " +
          std::to_string(record[0]) + ", outside 0.." + std::to_string(num_classes - 1) +
          "; this reader takes the CIFAR-10 binary version (CIFAR-100 is not supported)");
    }
    data.labels[first + i] = record[0];
    // The record already holds the R, G and B planes row-major, which is CHW.
    std::copy(record + 1, record + kCifarRecordBytes,
              data.pixels.begin() + std::ptrdiff_t((first + i) * kCifarImageBytes));
  }
}

Dataset load_cifar(const std::vector<fs::path>& files, const fs::path& shown_path) {
  Dataset data;
  data.channels = kCifarChannels;
  data.height = kCifarSide;
  data.width = kCifarSide;
  data.class_names = read_cifar_class_names(files.front().parent_path());
  data.num_classes = int(data.class_names.size());
  std::string file_list;
  for (const fs::path& file : files) {
    append_cifar_batch(file, data);
    file_list += (file_list.empty() ? "" : ", ") + file.filename().string();
  }
  data.description = "CIFAR-10 binary " + shown_path.string() + " (" + file_list + ")";
  return data;
}

// The batch files of `split` in `dir`, empty when `dir` holds no CIFAR-10 batches at all.
std::vector<fs::path> cifar_batches(const fs::path& dir, const std::string& split) {
  const bool has_test = is_file(dir / "test_batch.bin");
  std::vector<fs::path> train;
  for (int i = 1; i <= 5; ++i) {
    const fs::path batch = dir / ("data_batch_" + std::to_string(i) + ".bin");
    if (is_file(batch)) train.push_back(batch);
  }
  if (!has_test && train.empty()) return {};
  if (split == "test") {
    if (!has_test) {
      throw UserError(quoted(dir) +
                      " has CIFAR-10 training batches but no test_batch.bin; add it, " +
                      "or use split 'train'");
    }
    return {dir / "test_batch.bin"};
  }
  if (train.empty()) {
    throw UserError(quoted(dir) + " has test_batch.bin but no data_batch_{1..5}.bin; add them, " +
                    "or use split 'test'");
  }
  return train;
}

// ---------------------------------------------------------------------------------------------
// IDX (MNIST family), raw or gzip: zlib's gzread passes uncompressed files through unchanged.

struct GzCloser {
  void operator()(gzFile_s* file) const { gzclose(file); }
};
using GzFile = std::unique_ptr<gzFile_s, GzCloser>;

GzFile open_gz(const fs::path& path) {
  GzFile file(gzopen(path.c_str(), "rb"));
  if (!file) {
    throw UserError("cannot open " + quoted(path) + "; check that it exists and is readable");
  }
  gzbuffer(file.get(), 1 << 17);  // fewer, larger reads: a 47 MB IDX file loads noticeably faster
  return file;
}

// Reads up to `bytes` bytes, appending to `out`; returns how many arrived before end of file.
size_t read_gz(gzFile_s* file, const fs::path& path, size_t bytes, std::vector<uint8_t>& out) {
  size_t done = 0;
  while (done < bytes) {
    const size_t chunk = std::min(bytes - done, kReadChunkBytes);
    const size_t start = out.size();
    out.resize(start + chunk);
    const int got = gzread(file, out.data() + start, unsigned(chunk));
    if (got < 0) {
      int code = 0;
      const char* reason = gzerror(file, &code);
      throw UserError("cannot read " + quoted(path) + ": " + (reason ? reason : "read error") +
                      "; the file is corrupt, re-download it");
    }
    out.resize(start + size_t(got));
    done += size_t(got);
    if (size_t(got) < chunk) break;
  }
  return done;
}

// Reads the magic number and `dims` big-endian dimensions of an IDX header, checking the magic.
std::vector<uint32_t> read_idx_header(gzFile_s* file, const fs::path& path, uint32_t magic,
                                      const char* what) {
  std::vector<uint8_t> header;
  const size_t dims = magic & 0xff;
  const size_t header_bytes = 4 * (1 + dims);
  const size_t got = read_gz(file, path, header_bytes, header);
  auto word = [&](size_t i) {
    return uint32_t(header[4 * i]) << 24 | uint32_t(header[4 * i + 1]) << 16 |
           uint32_t(header[4 * i + 2]) << 8 | uint32_t(header[4 * i + 3]);
  };
  if (got < 4 || word(0) != magic) {
    char found[16] = "none";
    if (got >= 4) std::snprintf(found, sizeof(found), "0x%08x", unsigned(word(0)));
    char expected[16];
    std::snprintf(expected, sizeof(expected), "0x%08x", unsigned(magic));
    throw UserError(quoted(path) + " is not an IDX " + what + " file: magic number " + found +
                    ", expected " + expected + "; pass MNIST-format (IDX) files, raw or .gz");
  }
  if (got < header_bytes) {
    throw UserError(quoted(path) + " is truncated: expected a " + std::to_string(header_bytes) +
                    "-byte IDX header, found " + std::to_string(got) + " bytes; re-download it");
  }
  std::vector<uint32_t> sizes;
  for (size_t i = 1; i <= dims; ++i) sizes.push_back(word(i));
  return sizes;
}

// The labels file that belongs to an images file: same name with images-idx3 -> labels-idx1, with
// or without .gz (people gunzip one file and not the other).
fs::path idx_labels_beside(const fs::path& images) {
  std::string name = images.filename().string();
  const auto at = name.find("images-idx3");
  if (at == std::string::npos) {
    throw UserError("cannot find the labels file for IDX images " + quoted(images) +
                    ": name it like '*-images-idx3-ubyte[.gz]' with '*-labels-idx1-ubyte[.gz]' "
                    "beside it");
  }
  name.replace(at, std::string("images-idx3").size(), "labels-idx1");
  const fs::path same = images.parent_path() / name;
  if (is_file(same)) return same;
  const fs::path other = ends_with(name, ".gz")
                             ? images.parent_path() / name.substr(0, name.size() - 3)
                             : images.parent_path() / (name + ".gz");
  if (is_file(other)) return other;
  throw UserError("IDX labels file " + quoted(same) + " for " + quoted(images) +
                  " does not exist; put the labels file beside the images file");
}

Dataset load_idx(const fs::path& images_path, const fs::path& labels_path,
                 const std::string& shown) {
  Dataset data;
  data.channels = 1;
  std::vector<uint32_t> image_dims;
  {
    GzFile file = open_gz(images_path);
    image_dims = read_idx_header(file.get(), images_path, kIdxImagesMagic, "images");
    const uint64_t count = image_dims[0], height = image_dims[1], width = image_dims[2];
    if (count == 0 || height == 0 || width == 0 || height > 65535 || width > 65535) {
      throw UserError(quoted(images_path) + " declares " + std::to_string(count) + " images of " +
                      std::to_string(height) + "x" + std::to_string(width) +
                      " (height x width) pixels, which is empty or implausible; re-download it");
    }
    const uint64_t expected = count * height * width;
    data.height = int(height);
    data.width = int(width);
    data.pixels.reserve(size_t(std::min<uint64_t>(expected, kReadChunkBytes)));
    const size_t got = read_gz(file.get(), images_path, size_t(expected), data.pixels);
    if (got < expected) {
      throw UserError(quoted(images_path) + " is truncated: expected " + std::to_string(expected) +
                      " bytes of images, found " + std::to_string(got) + "; re-download it");
    }
  }
  std::vector<uint8_t> labels;
  {
    GzFile file = open_gz(labels_path);
    const uint32_t count = read_idx_header(file.get(), labels_path, kIdxLabelsMagic, "labels")[0];
    if (count != image_dims[0]) {
      throw UserError(quoted(labels_path) + " has " + std::to_string(count) + " labels but " +
                      quoted(images_path) + " has " + std::to_string(image_dims[0]) +
                      " images; use the labels file that belongs to these images");
    }
    const size_t got = read_gz(file.get(), labels_path, count, labels);
    if (got < count) {
      throw UserError(quoted(labels_path) + " is truncated: expected " + std::to_string(count) +
                      " bytes of labels, found " + std::to_string(got) + "; re-download it");
    }
  }
  int max_label = 0;
  data.labels.resize(labels.size());
  for (size_t i = 0; i < labels.size(); ++i) {
    // 255 is what tools write for "no label"; a class index that high means a corrupt file.
    if (labels[i] >= 255) {
      throw UserError("label 255 of image " + std::to_string(i) + " in " + quoted(labels_path) +
                      " is not a class index; use a labels file with classes 0..254");
    }
    data.labels[i] = labels[i];
    max_label = std::max(max_label, int(labels[i]));
  }
  // A split that happens to hold one class still describes a classifier with at least two outputs.
  data.num_classes = std::max(2, max_label + 1);
  data.description = "IDX " + shown;
  return data;
}

// Finds `{prefix}-images-idx3-ubyte[.gz]` in `dir`; empty when absent.
fs::path find_idx_images(const fs::path& dir, const std::string& prefix) {
  for (const char* suffix : {"", ".gz"}) {
    const fs::path candidate = dir / (prefix + "-images-idx3-ubyte" + suffix);
    if (is_file(candidate)) return candidate;
  }
  return {};
}

// True when the file starts with the IDX images magic (after gunzip if compressed).
bool looks_like_idx(const fs::path& path, uint32_t* magic_out) {
  GzFile file(gzopen(path.c_str(), "rb"));
  if (!file) return false;
  uint8_t bytes[4];
  if (gzread(file.get(), bytes, 4) != 4) return false;
  *magic_out = uint32_t(bytes[0]) << 24 | uint32_t(bytes[1]) << 16 | uint32_t(bytes[2]) << 8 |
               uint32_t(bytes[3]);
  return *magic_out == kIdxImagesMagic || *magic_out == kIdxLabelsMagic;
}

// ---------------------------------------------------------------------------------------------
// Image folders

// Runs body(i) for i in [0, count) on a few threads, each taking a contiguous range in order. Image
// decoding dominates loading (about 70 us per small JPEG, so seconds for a 50,000-image training
// set); stb_image is thread-safe, its failure reason thread-local. If bodies throw, the exception
// of the lowest index is rethrown, which is the one a serial loop would have thrown: errors name
// the same file on every run and machine.
void for_each_in_parallel(size_t count, const std::function<void(size_t)>& body) {
  // Below this many items per thread, starting threads costs more than it saves.
  constexpr size_t kMinItemsPerThread = 512;
  const size_t hardware = std::max(1u, std::thread::hardware_concurrency());
  const size_t threads =
      std::min({hardware, size_t(16), std::max<size_t>(1, count / kMinItemsPerThread)});
  std::vector<size_t> failed_at(threads, count);
  std::vector<std::exception_ptr> failures(threads);
  auto run_range = [&](size_t worker) {
    const size_t begin = count * worker / threads, end = count * (worker + 1) / threads;
    for (size_t i = begin; i < end; ++i) {
      try {
        body(i);
      } catch (...) {
        failed_at[worker] = i;
        failures[worker] = std::current_exception();
        return;
      }
    }
  };
  std::vector<std::thread> workers;
  for (size_t worker = 1; worker < threads; ++worker) {
    try {
      workers.emplace_back(run_range, worker);
    } catch (const std::system_error&) {  // no thread to be had: do that range here instead
      run_range(worker);
    }
  }
  run_range(0);
  for (std::thread& worker : workers) worker.join();
  const size_t first =
      size_t(std::min_element(failed_at.begin(), failed_at.end()) - failed_at.begin());
  if (failures[first]) std::rethrow_exception(failures[first]);
}

bool is_image_file(const fs::path& path) {
  const std::string ext = to_lower(path.extension().string());
  return ext == ".jpg" || ext == ".jpeg" || ext == ".png" || ext == ".bmp";
}

// A bound on the pixels of one image, so that a header of a few bytes cannot make the loader
// allocate gigabytes (stb accepts up to 2^24 x 2^24); far beyond any network input this simulates.
constexpr int64_t kMaxImagePixels = int64_t(4096) * 4096;

// Reads an image file whole: stb then decodes from memory the very bytes that were checked.
std::vector<uint8_t> read_image_bytes(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::vector<uint8_t> bytes;
  if (in) bytes.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  if (!in && !in.eof()) {
    throw UserError("cannot read image " + quoted(path) + "; check that it is a readable file");
  }
  if (bytes.size() > size_t(INT_MAX)) {  // stb takes the length as an int
    throw UserError("image " + quoted(path) + " is over 2 GB; replace or remove it");
  }
  return bytes;
}

// Debian's stb_image 2.27 writes past its Huffman tables when a JPEG DHT segment declares more
// than 256 codes (found by fuzz/fuzz_image_folder). Walks the markers the way stb does (segments
// by their length, entropy-coded data byte by byte) and checks every table stb would build.
// Returns the problem, or an empty string.
std::string jpeg_huffman_problem(const std::vector<uint8_t>& jpeg) {
  const auto byte = [&](size_t at) -> size_t { return at < jpeg.size() ? jpeg[at] : 0; };
  size_t at = 2;  // after the SOI marker
  while (at + 1 < jpeg.size()) {
    const uint8_t marker = jpeg[at + 1];
    if (jpeg[at] != 0xff || marker == 0xff) {  // entropy-coded data or a fill byte
      ++at;
      continue;
    }
    // Stuffed 0xff, TEM, RSTn, SOI and EOI carry no length.
    if (marker == 0x00 || marker == 0x01 || (marker >= 0xd0 && marker <= 0xd9)) {
      at += 2;
      continue;
    }
    const size_t length = byte(at + 2) << 8 | byte(at + 3);
    if (marker == 0xc4) {
      // Tables follow back to back while the segment has bytes left, as stb reads them.
      size_t table = at + 4;
      for (int64_t left = int64_t(length) - 2; left > 0;) {
        size_t codes = 0;
        for (size_t i = 1; i <= 16; ++i) codes += byte(table + i);
        if (codes > 256) {
          return "its JPEG Huffman table declares " + std::to_string(codes) +
                 " codes, more than the 256 a table can hold";
        }
        table += 17 + codes;
        left -= int64_t(17 + codes);
      }
    }
    at += 2 + length;
  }
  return "";
}

// stb reserves an IDAT chunk's declared length before reading it, so a PNG of a few bytes that
// declares a 2 GB chunk makes it allocate 2 GB: every chunk up to IEND must fit in the file.
std::string png_chunk_problem(const std::vector<uint8_t>& png) {
  size_t at = 8;  // after the signature
  while (at + 8 <= png.size()) {
    const size_t length = size_t(png[at]) << 24 | size_t(png[at + 1]) << 16 |
                          size_t(png[at + 2]) << 8 | size_t(png[at + 3]);
    if (std::equal(png.begin() + at + 4, png.begin() + at + 8, "IEND")) break;
    if (length > png.size() - (at + 8)) {
      return "a PNG chunk declares " + std::to_string(length) + " bytes, more than the " +
             std::to_string(png.size() - (at + 8)) + " left in the file (truncated or corrupt)";
    }
    at += 12 + length;  // length, type, data, CRC
  }
  return "";
}

// stb picks the decoder by content and besides JPEG, PNG and BMP also decodes GIF, PSD, TGA, HDR,
// PIC and PNM, whose decoders in Debian's stb 2.27 have known memory-safety bugs: only bytes that
// start like the three formats this reader documents are handed to it.
std::string image_bytes_problem(const std::vector<uint8_t>& bytes) {
  const auto starts_with = [&](std::initializer_list<uint8_t> prefix) {
    return bytes.size() >= prefix.size() && std::equal(prefix.begin(), prefix.end(), bytes.begin());
  };
  if (starts_with({0xff, 0xd8})) return jpeg_huffman_problem(bytes);
  if (starts_with({0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'})) return png_chunk_problem(bytes);
  if (starts_with({'B', 'M'})) return "";
  return "it is not a JPEG, PNG or BMP file";
}

bool has_sub_directories(const fs::path& dir) {
  for (const fs::path& entry : sorted_entries(dir)) {
    if (is_dir(entry)) return true;
  }
  return false;
}

struct ImageFile {
  fs::path path;
  int32_t label;
};

Dataset load_image_folder(const fs::path& root, const std::string& shown) {
  Dataset data;
  std::vector<ImageFile> files;
  bool loose_images = false;
  for (const fs::path& entry : sorted_entries(root)) {
    if (!is_dir(entry)) {
      loose_images |= is_image_file(entry);
      continue;
    }
    const int32_t label = int32_t(data.class_names.size());
    data.class_names.push_back(entry.filename().string());
    for (const fs::path& file : sorted_entries(entry)) {
      if (is_image_file(file) && is_file(file)) files.push_back({file, label});
    }
  }
  if (data.class_names.empty()) {
    throw UserError(quoted(root) +
                    (loose_images ? " holds images but no class sub-directories"
                                  : " is empty or holds no data set") +
                    ": pass --data with a CIFAR-10 binary, IDX or image-folder directory (one "
                    "sub-directory of .jpg/.png/.bmp images per class)");
  }
  if (files.empty()) {
    throw UserError("image folder " + quoted(root) + " has " +
                    std::to_string(data.class_names.size()) +
                    " class sub-directories but no .jpg/.jpeg/.png/.bmp images in them; put each "
                    "class's images in its sub-directory");
  }
  if (data.class_names.size() < 2) {
    throw UserError("image folder " + quoted(root) + " has only one class sub-directory (" +
                    data.class_names[0] +
                    "); pass the directory that holds one sub-directory per class");
  }

  // Both passes hand stb only bytes that image_bytes_problem() accepts.
  const auto checked_image_bytes = [](const fs::path& path) {
    std::vector<uint8_t> bytes = read_image_bytes(path);
    if (const std::string problem = image_bytes_problem(bytes); !problem.empty()) {
      throw UserError("cannot read image " + quoted(path) + ": " + problem +
                      "; replace or remove it");
    }
    return bytes;
  };

  // Pass 1 decodes only headers: the common size, and whether any image has colour, must be known
  // before decoding so that every image is decoded to the same channel count straight into place.
  struct Header {
    int width = 0, height = 0, components = 0;
  };
  std::vector<Header> headers(files.size());
  for_each_in_parallel(files.size(), [&](size_t i) {
    Header& header = headers[i];
    const std::vector<uint8_t> bytes = checked_image_bytes(files[i].path);
    if (!stbi_info_from_memory(bytes.data(), int(bytes.size()), &header.width, &header.height,
                               &header.components)) {
      throw UserError("cannot read image " + quoted(files[i].path) + ": " + stbi_failure_reason() +
                      "; replace or remove it");
    }
    // stb's header pass does not range-check every format (a BMP width can come back negative).
    if (header.width < 1 || header.height < 1 ||
        int64_t(header.width) * header.height > kMaxImagePixels) {
      throw UserError("image " + quoted(files[i].path) + " declares " +
                      std::to_string(header.height) + "x" + std::to_string(header.width) +
                      " (height x width) pixels; this reader takes 1 to 4096x4096 pixels: "
                      "replace it or downscale the images to the network's input size");
    }
  });
  data.height = headers[0].height;
  data.width = headers[0].width;
  bool any_colour = false;
  for (size_t i = 0; i < files.size(); ++i) {
    if (headers[i].width != data.width || headers[i].height != data.height) {
      throw UserError("image " + quoted(files[i].path) + " is " +
                      std::to_string(headers[i].height) + "x" + std::to_string(headers[i].width) +
                      " (height x width) but " + quoted(files[0].path) + " is " +
                      std::to_string(data.height) + "x" + std::to_string(data.width) +
                      "; resize all images of the folder to one size");
    }
    any_colour |= headers[i].components >= 3;  // 1 grey, 2 grey+alpha, 3 RGB, 4 RGBA
  }
  data.channels = any_colour ? 3 : 1;
  data.num_classes = int(data.class_names.size());

  // Pass 2 decodes, converting stb's interleaved HWC to the CHW the simulator wants.
  const size_t plane = size_t(data.height) * data.width;
  const size_t image_elements = plane * data.channels;
  data.pixels.resize(files.size() * image_elements);
  data.labels.resize(files.size());
  for_each_in_parallel(files.size(), [&](size_t i) {
    int width = 0, height = 0, components = 0;
    const std::vector<uint8_t> bytes = checked_image_bytes(files[i].path);
    std::unique_ptr<stbi_uc, void (*)(void*)> decoded(
        stbi_load_from_memory(bytes.data(), int(bytes.size()), &width, &height, &components,
                              data.channels),
        stbi_image_free);
    if (!decoded) {
      throw UserError("cannot decode image " + quoted(files[i].path) + ": " +
                      stbi_failure_reason() + "; replace or remove it");
    }
    if (width != data.width || height != data.height) {  // the file changed since pass 1
      throw UserError("image " + quoted(files[i].path) + " changed size while loading; retry");
    }
    uint8_t* out = data.pixels.data() + i * image_elements;
    const stbi_uc* in = decoded.get();
    for (size_t p = 0; p < plane; ++p) {
      for (int c = 0; c < data.channels; ++c) out[c * plane + p] = in[p * data.channels + c];
    }
    data.labels[i] = files[i].label;
  });
  data.image_names.reserve(files.size());
  for (const ImageFile& file : files)
    data.image_names.push_back(file.path.parent_path().filename().string() + "/" +
                               file.path.filename().string());
  data.description = "image folder " + shown;
  return data;
}

}  // namespace

Dataset load_dataset(const std::string& path_text, const std::string& split) {
  if (split != "test" && split != "train") {
    throw UserError("unknown split '" + split + "': use 'test' or 'train'");
  }
  const fs::path path(path_text);
  std::error_code error;
  if (path_text.empty() || !fs::exists(path, error)) {
    throw UserError("data path '" + path_text +
                    "' does not exist: pass --data with a CIFAR-10 binary, IDX or image-folder "
                    "directory");
  }
  const std::string idx_prefix = split == "test" ? "t10k" : "train";

  if (!is_dir(path)) {
    if (ends_with(to_lower(path.filename().string()), ".bin")) return load_cifar({path}, path);
    uint32_t magic = 0;
    if (looks_like_idx(path, &magic)) {
      if (magic == kIdxLabelsMagic) {
        throw UserError(quoted(path) + " is an IDX labels file; pass the images file (" +
                        "*-images-idx3-ubyte[.gz]) or the directory holding both");
      }
      return load_idx(path, idx_labels_beside(path), path.string());
    }
    throw UserError(
        "unknown data file " + quoted(path) +
        ": pass a CIFAR-10 batch (*.bin), an IDX images file (*-images-idx3-ubyte[.gz]) "
        "or a directory");
  }

  // IDX directory, e.g. /usr/share/datasets/fashion-mnist.
  if (const fs::path images = find_idx_images(path, idx_prefix); !images.empty()) {
    return load_idx(images, idx_labels_beside(images), path.string() + " (" + idx_prefix + ")");
  }
  const std::string other_prefix = split == "test" ? "train" : "t10k";
  if (!find_idx_images(path, other_prefix).empty()) {
    throw UserError(quoted(path) + " has IDX files for " + other_prefix + " but no " + idx_prefix +
                    "-images-idx3-ubyte[.gz]; add them, or use split '" +
                    (split == "test" ? "train" : "test") + "'");
  }

  // CIFAR-10 binary directory, or the directory the official archive extracts into.
  for (const fs::path& dir : {path, path / "cifar-10-batches-bin"}) {
    if (!is_dir(dir)) continue;
    const std::vector<fs::path> batches = cifar_batches(dir, split);
    if (!batches.empty()) return load_cifar(batches, path);
  }

  // Image folder; a train/ + test/ pair holds one image folder per split. A lone train/ or test/
  // that itself holds class directories (what the CIFAR JPEG archives extract to) counts too.
  const fs::path split_dir = path / split;
  const fs::path other_dir = path / (split == "test" ? "train" : "test");
  const bool split_like = [&] {
    for (const fs::path& dir : {split_dir, other_dir}) {
      if (is_dir(dir) && has_sub_directories(dir)) return true;
    }
    return false;
  }();
  if (split_like) {
    if (!is_dir(split_dir)) {
      throw UserError(quoted(path) + " has a " + other_dir.filename().string() +
                      "/ image folder but no " + split + "/; add it, or use split '" +
                      other_dir.filename().string() + "'");
    }
    return load_image_folder(split_dir, split_dir.string());
  }
  return load_image_folder(path, path.string());
}

Dataset load_balanced(const std::string& path, const std::string& split, long long limit) {
  Dataset data = load_dataset(path, split);
  return limit > 0 ? balanced_subset(data, size_t(limit)) : data;
}

Dataset balanced_subset(const Dataset& data, size_t limit) {
  if (limit == 0 || limit >= data.size()) return data;
  std::vector<std::vector<size_t>> by_class(size_t(std::max(data.num_classes, 0)));
  for (size_t i = 0; i < data.size(); ++i) {
    const int32_t label = data.labels[i];
    if (label < 0 || label >= data.num_classes) {
      throw UserError("data set " + data.description + " has label " + std::to_string(label) +
                      " outside 0.." + std::to_string(data.num_classes - 1) +
                      "; check the data files");
    }
    by_class[size_t(label)].push_back(i);
  }
  // Round r takes the r-th image of every class that still has one, so classes with too few images
  // leave their share to the others and the subset for a smaller limit is a prefix of this one.
  std::vector<size_t> chosen;
  chosen.reserve(limit);
  for (size_t round = 0; chosen.size() < limit; ++round) {
    for (const std::vector<size_t>& members : by_class) {
      if (round < members.size()) chosen.push_back(members[round]);
      if (chosen.size() == limit) break;
    }
  }

  return select_images(data, chosen,
                       data.description + ", " + std::to_string(limit) + " class-balanced images");
}

Dataset select_images(const Dataset& data, const std::vector<size_t>& which,
                      std::string description) {
  Dataset subset;
  subset.channels = data.channels;
  subset.height = data.height;
  subset.width = data.width;
  subset.num_classes = data.num_classes;
  subset.class_names = data.class_names;
  subset.description = std::move(description);
  const size_t elements = data.image_elements();
  subset.pixels.resize(which.size() * elements);
  subset.labels.resize(which.size());
  subset.reader_indices.resize(which.size());
  if (!data.image_names.empty()) subset.image_names.resize(which.size());
  for (size_t k = 0; k < which.size(); ++k) {
    subset.reader_indices[k] = data.reader_index(which[k]);
    if (!data.image_names.empty()) subset.image_names[k] = data.image_names[which[k]];
    std::copy(data.image(which[k]), data.image(which[k]) + elements,
              subset.pixels.begin() + std::ptrdiff_t(k * elements));
    subset.labels[k] = data.labels[which[k]];
  }
  return subset;
}

}  // namespace cimsweep
