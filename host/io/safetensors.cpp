#include "host/io/safetensors.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <limits>
#include <set>
#include <string>
#include <tuple>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/errors.h"
#include "host/io/output_file.h"

// Tensor bytes in the file are little-endian and are copied straight into host integers/floats.
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
              "safetensors I/O assumes a little-endian host");
static_assert(sizeof(float) == 4 && std::numeric_limits<float>::is_iec559,
              "float must be IEEE binary32");
static_assert(sizeof(double) == 8 && std::numeric_limits<double>::is_iec559,
              "double must be binary64");

namespace cimsweep {
namespace {

using nlohmann::json;

// A real header is a few kB; anything this large is a wrong file, not a big model, and must not
// drive an allocation.
constexpr uint64_t kMaxHeaderBytes = 100ull * 1000 * 1000;
constexpr size_t kHeaderLengthBytes = 8;
// The data section starts at a multiple of this, as safetensors' own writer does.
constexpr size_t kDataAlignment = 8;

// ---------------------------------------------------------------------------------------------
// Messages

// Quotes a string that comes from a file or the user so that a message stays one short line:
// control bytes are escaped and very long names are cut.
std::string quote_name(const std::string& text) {
  constexpr size_t kMaxShown = 200;
  std::string out = "'";
  for (size_t i = 0; i < text.size() && i < kMaxShown; ++i) {
    const unsigned char c = static_cast<unsigned char>(text[i]);
    if (c < 0x20 || c == 0x7f) {
      char escaped[8];
      std::snprintf(escaped, sizeof escaped, "\\x%02x", c);
      out += escaped;
    } else {
      out += static_cast<char>(c);
    }
  }
  if (text.size() > kMaxShown) out += "...";
  return out + "'";
}

// nlohmann's messages are one line already; this keeps them so whatever the input was.
std::string one_line(const std::string& text) {
  std::string out = text;
  for (char& c : out) {
    if (c == '\n' || c == '\r') c = ' ';
  }
  return out;
}

std::string shape_string(const std::vector<int64_t>& shape) {
  std::string out = "[";
  for (size_t i = 0; i < shape.size(); ++i) out += (i ? ", " : "") + std::to_string(shape[i]);
  return out + "]";
}

[[noreturn]] void throw_corrupt(const std::string& path, const std::string& problem) {
  throw UserError("model file " + quote_name(path) + " is corrupt: " + problem +
                  "; re-export it with safetensors.torch.save_file");
}

// ---------------------------------------------------------------------------------------------
// Element types

enum class DType { kF64, kF32, kF16, kBF16, kI64, kI32, kI16, kI8, kU8, kBool };

struct DTypeInfo {
  const char* name;
  DType type;
  uint64_t size;
  bool is_float;
};

constexpr DTypeInfo kDTypes[] = {
    {"F64", DType::kF64, 8, true},  {"F32", DType::kF32, 4, true},
    {"F16", DType::kF16, 2, true},  {"BF16", DType::kBF16, 2, true},
    {"I64", DType::kI64, 8, false}, {"I32", DType::kI32, 4, false},
    {"I16", DType::kI16, 2, false}, {"I8", DType::kI8, 1, false},
    {"U8", DType::kU8, 1, false},   {"BOOL", DType::kBool, 1, false},
};

const DTypeInfo* find_dtype(const std::string& name) {
  for (const DTypeInfo& info : kDTypes) {
    if (name == info.name) return &info;
  }
  return nullptr;
}

std::string supported_dtypes() {
  std::string out;
  for (const DTypeInfo& info : kDTypes) out += (out.empty() ? "" : ", ") + std::string(info.name);
  return out;
}

float float_from_bits(uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}

uint32_t bits_of(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  return bits;
}

// IEEE binary16 -> binary32. Every half value is exactly representable as a float, so this is
// exact: normals re-bias the exponent, subnormals (no implicit 1) are scaled, inf/nan keep their
// payload.
float half_to_float(uint16_t half) {
  const uint32_t sign = static_cast<uint32_t>(half & 0x8000u) << 16;
  const uint32_t exponent = (half >> 10) & 0x1fu;
  const uint32_t mantissa = half & 0x3ffu;
  if (exponent == 0x1f) return float_from_bits(sign | 0x7f800000u | (mantissa << 13));
  if (exponent == 0) {
    // Zero or subnormal: mantissa * 2^-24, exact in float (a normal float there).
    const float magnitude = std::ldexp(static_cast<float>(mantissa), -24);
    return sign ? -magnitude : magnitude;
  }
  return float_from_bits(sign | ((exponent + (127 - 15)) << 23) | (mantissa << 13));
}

// bfloat16 is the top half of a binary32, so widening is a shift (subnormals, inf, nan included).
float bfloat16_to_float(uint16_t value) {
  return float_from_bits(static_cast<uint32_t>(value) << 16);
}

bool is_finite_bits(float value) {
  return (bits_of(value) & 0x7f800000u) != 0x7f800000u;
}

// Names a non-finite value the way a user would write it.
std::string non_finite_name(double value) {
  if (std::isnan(value)) return "nan";
  return value < 0 ? "-inf" : "inf";
}

template <typename T>
T load(const uint8_t* bytes) {
  T value;
  std::memcpy(&value, bytes, sizeof value);  // the data section need not be aligned for T
  return value;
}

template <typename T>
void convert_integers(const uint8_t* src, size_t count, float* dst) {
  for (size_t i = 0; i < count; ++i) dst[i] = static_cast<float>(load<T>(src + i * sizeof(T)));
}

// ---------------------------------------------------------------------------------------------
// Reading

// Reads the whole file; sizes from fstat are only a hint so that a file that changes while it is
// read still yields consistent bytes.
std::vector<uint8_t> read_whole_file(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    const int error = errno;
    if (error == ENOENT) {
      throw UserError("model file " + quote_name(path) + " does not exist; check the path");
    }
    throw UserError("cannot open model file " + quote_name(path) + ": " + std::strerror(error) +
                    "; check the path and its permissions");
  }
  struct Closer {
    int fd;
    ~Closer() { ::close(fd); }
  } closer{fd};

  struct stat info;
  if (::fstat(fd, &info) != 0) {
    throw UserError("cannot read model file " + quote_name(path) + ": " + std::strerror(errno) +
                    "; check the path and its permissions");
  }
  if (S_ISDIR(info.st_mode)) {
    throw UserError("model file " + quote_name(path) +
                    " is a directory; pass the path of the .safetensors file");
  }
  // One byte more than the expected size so that the final read sees end-of-file at once.
  std::vector<uint8_t> bytes(S_ISREG(info.st_mode) ? static_cast<size_t>(info.st_size) + 1
                                                   : 1 << 16);
  size_t used = 0;
  for (;;) {
    if (used == bytes.size()) bytes.resize(bytes.size() * 2);
    const ssize_t got = ::read(fd, bytes.data() + used, bytes.size() - used);
    if (got < 0) {
      if (errno == EINTR) continue;
      throw UserError("cannot read model file " + quote_name(path) + ": " + std::strerror(errno) +
                      "; check that the file is readable");
    }
    if (got == 0) break;
    used += static_cast<size_t>(got);
  }
  bytes.resize(used);
  return bytes;
}

// Parses the header, rejecting a key that occurs twice in one object: nlohmann would silently keep
// the last one, which hides a broken writer and makes the tensor set ambiguous. A real header
// nests three levels (header, tensor, shape); printing a value nested thousands deep in a message
// would recurse that deep and overflow the stack, so parsing stops far below that.
json parse_header(const std::string& path, const char* begin, const char* end) {
  constexpr int kMaxNesting = 16;
  std::vector<std::set<std::string>> open_objects;
  std::string duplicate;
  json::parser_callback_t check_keys = [&](int depth, json::parse_event_t event, json& parsed) {
    if (depth >= kMaxNesting &&
        (event == json::parse_event_t::object_start || event == json::parse_event_t::array_start)) {
      throw_corrupt(path,
                    "the header nests JSON deeper than " + std::to_string(kMaxNesting) + " levels");
    }
    if (event == json::parse_event_t::object_start) {
      open_objects.emplace_back();
    } else if (event == json::parse_event_t::object_end) {
      open_objects.pop_back();
    } else if (event == json::parse_event_t::key && duplicate.empty()) {
      const std::string& key = parsed.get_ref<const std::string&>();
      if (!open_objects.back().insert(key).second) {
        duplicate = open_objects.size() == 1
                        ? "tensor " + quote_name(key) + " is listed twice"
                        : "key " + quote_name(key) + " occurs twice in one object";
      }
    }
    return true;
  };
  json header;
  try {
    header = json::parse(begin, end, check_keys);
  } catch (const json::exception& error) {
    throw_corrupt(path, "the header is not valid JSON (" + one_line(error.what()) + ")");
  }
  if (!duplicate.empty()) throw_corrupt(path, "the header is ambiguous: " + duplicate);
  return header;
}

struct TensorEntry {
  std::string name;
  const DTypeInfo* dtype = nullptr;
  std::vector<int64_t> shape;
  uint64_t begin = 0;
  uint64_t end = 0;
};

// Reads one JSON integer that must be >= 0 and fit in int64 (shape dims and offsets alike).
bool read_non_negative(const json& value, uint64_t* out) {
  if (value.is_number_unsigned()) {
    *out = value.get<uint64_t>();
    return *out <= static_cast<uint64_t>(std::numeric_limits<int64_t>::max());
  }
  if (value.is_number_integer() && value.get<int64_t>() >= 0) {
    *out = static_cast<uint64_t>(value.get<int64_t>());
    return true;
  }
  return false;
}

TensorEntry parse_entry(const std::string& path, const std::string& name, const json& entry,
                        uint64_t data_size) {
  const std::string tensor = "tensor " + quote_name(name);
  if (!entry.is_object()) {
    throw_corrupt(
        path, tensor + " is described by a JSON " + entry.type_name() + " instead of an object");
  }
  for (const char* key : {"dtype", "shape", "data_offsets"}) {
    if (!entry.contains(key)) throw_corrupt(path, tensor + " has no \"" + key + "\"");
  }
  TensorEntry result;
  result.name = name;

  const json& dtype = entry.at("dtype");
  if (!dtype.is_string()) {
    throw_corrupt(path, tensor + " \"dtype\" is a JSON " + dtype.type_name() + ", not a string");
  }
  result.dtype = find_dtype(dtype.get<std::string>());
  if (result.dtype == nullptr) {
    throw UserError("model file " + quote_name(path) + " has " + tensor + " of unsupported dtype " +
                    quote_name(dtype.get<std::string>()) + " (supported: " + supported_dtypes() +
                    "); convert it, e.g. with tensor.float(), before saving");
  }

  const json& shape = entry.at("shape");
  if (!shape.is_array()) {
    throw_corrupt(path, tensor + " \"shape\" is a JSON " + shape.type_name() + ", not an array");
  }
  // Element count with overflow detection; a zero dim makes the tensor empty whatever the others
  // are, so an overflow only counts when no dim is zero.
  uint64_t element_count = 1;
  bool too_large = false;
  bool has_zero_dim = false;
  for (const json& dim : shape) {
    if (dim.is_number_integer() && !dim.is_number_unsigned() && dim.get<int64_t>() < 0) {
      throw_corrupt(path, tensor + " has a negative dimension " +
                              std::to_string(dim.get<int64_t>()) + " in its shape");
    }
    uint64_t size;
    if (!read_non_negative(dim, &size)) {
      throw_corrupt(path, tensor + " shape entry " + one_line(dim.dump()) +
                              " is not an integer dimension below 2^63");
    }
    result.shape.push_back(static_cast<int64_t>(size));
    has_zero_dim = has_zero_dim || size == 0;
    too_large = too_large || __builtin_mul_overflow(element_count, size, &element_count);
  }
  uint64_t byte_size = 0;
  if (has_zero_dim) {
    too_large = false;
  } else {
    too_large = too_large || __builtin_mul_overflow(element_count, result.dtype->size, &byte_size);
  }

  const json& offsets = entry.at("data_offsets");
  if (!offsets.is_array() || offsets.size() != 2 || !read_non_negative(offsets[0], &result.begin) ||
      !read_non_negative(offsets[1], &result.end)) {
    throw_corrupt(path, tensor + " data_offsets " + one_line(offsets.dump()) +
                            " are not two non-negative integers [begin, end]");
  }
  const std::string offsets_text =
      "data_offsets [" + std::to_string(result.begin) + ", " + std::to_string(result.end) + "]";
  if (result.begin > result.end)
    throw_corrupt(path, tensor + " " + offsets_text + " end before they begin");
  const std::string shape_text =
      std::string(result.dtype->name) + " shape " + shape_string(result.shape);
  if (too_large) throw_corrupt(path, tensor + " " + shape_text + " is impossibly large");
  if (result.end - result.begin != byte_size) {
    throw_corrupt(path, tensor + " " + offsets_text + " do not match its " + shape_text + " (" +
                            std::to_string(byte_size) + " bytes)");
  }
  if (result.end > data_size) {
    throw_corrupt(path, tensor + " " + offsets_text + " reach beyond the data section (" +
                            std::to_string(data_size) + " bytes); the file is probably truncated");
  }
  return result;
}

std::map<std::string, std::string> parse_metadata(const std::string& path, const json& metadata) {
  std::map<std::string, std::string> result;
  if (metadata.is_null()) return result;  // safetensors' own reader treats null as "no metadata"
  if (!metadata.is_object()) {
    throw_corrupt(path, "\"__metadata__\" is a JSON " + std::string(metadata.type_name()) +
                            ", not an object of strings");
  }
  for (const auto& [key, value] : metadata.items()) {
    if (!value.is_string()) {
      throw_corrupt(path, "\"__metadata__\" value for key " + quote_name(key) + " is a JSON " +
                              value.type_name() + ", not a string");
    }
    result.emplace(key, value.get<std::string>());
  }
  return result;
}

// Two tensors sharing bytes means at least one of them is wrong; empty tensors own no bytes.
void check_no_overlap(const std::string& path, std::vector<const TensorEntry*> entries) {
  entries.erase(std::remove_if(entries.begin(), entries.end(),
                               [](const TensorEntry* e) { return e->begin == e->end; }),
                entries.end());
  std::sort(entries.begin(), entries.end(), [](const TensorEntry* a, const TensorEntry* b) {
    return std::tie(a->begin, a->end, a->name) < std::tie(b->begin, b->end, b->name);
  });
  for (size_t i = 1; i < entries.size(); ++i) {
    if (entries[i]->begin < entries[i - 1]->end) {
      throw_corrupt(path, "tensors " + quote_name(entries[i - 1]->name) + " and " +
                              quote_name(entries[i]->name) + " overlap in the data section");
    }
  }
}

[[noreturn]] void throw_non_finite(const std::string& path, const TensorEntry& entry, size_t index,
                                   const std::string& what) {
  throw UserError("model file " + quote_name(path) + " has a " + what + " in tensor " +
                  quote_name(entry.name) + " at element " + std::to_string(index) +
                  "; the model is broken (diverged training?): fix it and re-export");
}

Tensor convert(const std::string& path, const TensorEntry& entry, const uint8_t* src) {
  Tensor tensor(entry.shape);
  const size_t count = tensor.data.size();
  float* dst = tensor.data.data();
  switch (entry.dtype->type) {
    case DType::kF64:
      // Checked before narrowing: converting an out-of-range double to float is undefined.
      for (size_t i = 0; i < count; ++i) {
        const double value = load<double>(src + 8 * i);
        if (!std::isfinite(value)) {
          throw_non_finite(path, entry, i, "non-finite value (" + non_finite_name(value) + ")");
        }
        if (std::fabs(value) > FLT_MAX) {
          throw_non_finite(path, entry, i,
                           "value outside the float32 range (" + std::to_string(value) + ")");
        }
        dst[i] = static_cast<float>(value);
      }
      break;
    case DType::kF32:
      if (count > 0) std::memcpy(dst, src, count * sizeof(float));
      break;
    case DType::kF16:
      for (size_t i = 0; i < count; ++i) dst[i] = half_to_float(load<uint16_t>(src + 2 * i));
      break;
    case DType::kBF16:
      for (size_t i = 0; i < count; ++i) dst[i] = bfloat16_to_float(load<uint16_t>(src + 2 * i));
      break;
    case DType::kI64:
      convert_integers<int64_t>(src, count, dst);
      break;
    case DType::kI32:
      convert_integers<int32_t>(src, count, dst);
      break;
    case DType::kI16:
      convert_integers<int16_t>(src, count, dst);
      break;
    case DType::kI8:
      convert_integers<int8_t>(src, count, dst);
      break;
    case DType::kU8:
      convert_integers<uint8_t>(src, count, dst);
      break;
    case DType::kBool:
      for (size_t i = 0; i < count; ++i) {
        if (src[i] > 1) {
          throw_corrupt(path, "BOOL tensor " + quote_name(entry.name) + " holds byte " +
                                  std::to_string(src[i]) + " at element " + std::to_string(i) +
                                  " (only 0 and 1 are valid)");
        }
        dst[i] = src[i];
      }
      break;
  }
  if (entry.dtype->is_float) {
    // Bit test rather than std::isfinite so that the check survives -ffast-math builds.
    for (size_t i = 0; i < count; ++i) {
      if (!is_finite_bits(dst[i])) {
        throw_non_finite(path, entry, i, "non-finite value (" + non_finite_name(dst[i]) + ")");
      }
    }
  }
  return tensor;
}

}  // namespace

SafetensorsFile read_safetensors(const std::string& path) {
  const std::vector<uint8_t> bytes = read_whole_file(path);
  if (bytes.size() < kHeaderLengthBytes) {
    throw_corrupt(path, "it is only " + std::to_string(bytes.size()) +
                            " bytes long, too short for the 8-byte header length");
  }
  const uint64_t header_size = load<uint64_t>(bytes.data());
  const uint64_t after_length = bytes.size() - kHeaderLengthBytes;
  if (header_size > kMaxHeaderBytes) {
    throw_corrupt(path, "its header length " + std::to_string(header_size) +
                            " is implausible (over 100 MB); it is probably not a safetensors file");
  }
  if (header_size > after_length) {
    throw_corrupt(path, "its header length " + std::to_string(header_size) +
                            " exceeds the remaining " + std::to_string(after_length) +
                            " bytes of the file; it is probably truncated");
  }
  const char* header_begin = reinterpret_cast<const char*>(bytes.data()) + kHeaderLengthBytes;
  // nlohmann stops at a NUL byte as if the input ended there, which would silently accept
  // anything after it; valid JSON never contains one (control characters must be escaped).
  if (std::memchr(header_begin, '\0', header_size) != nullptr) {
    throw_corrupt(path, "the header is not valid JSON (it contains a NUL byte)");
  }
  const json header = parse_header(path, header_begin, header_begin + header_size);
  if (!header.is_object()) {
    throw_corrupt(path, "the header is a JSON " + std::string(header.type_name()) +
                            ", not an object of tensors");
  }

  const uint8_t* data = bytes.data() + kHeaderLengthBytes + header_size;
  const uint64_t data_size = after_length - header_size;
  SafetensorsFile result;
  std::vector<TensorEntry> entries;
  entries.reserve(header.size());
  for (const auto& [key, value] : header.items()) {
    if (key == "__metadata__") {
      result.metadata = parse_metadata(path, value);
    } else {
      entries.push_back(parse_entry(path, key, value, data_size));
    }
  }
  std::vector<const TensorEntry*> pointers;
  for (const TensorEntry& entry : entries) pointers.push_back(&entry);
  check_no_overlap(path, pointers);

  for (const TensorEntry& entry : entries) {
    result.tensors.emplace(entry.name, convert(path, entry, data + entry.begin));
  }
  return result;
}

void write_safetensors(const std::string& path, const std::map<std::string, Tensor>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  const auto refuse = [&](const std::string& problem) {
    throw UserError("cannot write model file " + quote_name(path) + ": " + problem +
                    "; this is a bug in the caller, please report it");
  };
  // The header is a std::map-backed JSON object, so keys come out sorted and the data section is
  // laid out in the same (name) order as safetensors itself does for a single dtype.
  json header = json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  uint64_t offset = 0;
  for (const auto& [name, tensor] : tensors) {
    if (name == "__metadata__") refuse("a tensor may not be called \"__metadata__\"");
    for (int64_t dim : tensor.shape) {
      if (dim < 0) refuse("tensor " + quote_name(name) + " has a negative dimension");
    }
    if (static_cast<uint64_t>(tensor.numel()) != tensor.data.size()) {
      refuse("tensor " + quote_name(name) + " has " + std::to_string(tensor.data.size()) +
             " values but shape " + shape_string(tensor.shape));
    }
    // The reader rejects non-finite values, so writing one would produce an unloadable file.
    for (size_t i = 0; i < tensor.data.size(); ++i) {
      if (!is_finite_bits(tensor.data[i])) {
        throw UserError("cannot write model file " + quote_name(path) + ": tensor " +
                        quote_name(name) + " has a non-finite value (" +
                        non_finite_name(tensor.data[i]) + ") at element " + std::to_string(i) +
                        "; fix the model before saving");
      }
    }
    const uint64_t size = tensor.data.size() * sizeof(float);
    header[name] = {{"dtype", "F32"},
                    {"shape", tensor.shape},
                    {"data_offsets", json::array({offset, offset + size})}};
    offset += size;
  }
  std::string header_text;
  try {
    header_text = header.dump();
  } catch (const json::exception& error) {
    refuse("a tensor name or metadata string is not valid UTF-8 (" + one_line(error.what()) + ")");
  }
  // Spaces are the padding safetensors uses; they keep the data section 8-byte aligned.
  header_text.append((kDataAlignment - header_text.size() % kDataAlignment) % kDataAlignment, ' ');
  const uint64_t header_size = header_text.size();

  const OutputPath output(path, "model file");
  OutputWriter file(output);
  file.write(&header_size, sizeof header_size);
  file.write(header_text.data(), header_text.size());
  for (const auto& [name, tensor] : tensors) {
    file.write(tensor.data.data(), tensor.data.size() * sizeof(float));
  }
  file.commit();
}

}  // namespace cimsweep
