#include "host/io/safetensors.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <iostream>
#include <limits>
#include <map>
#include <random>
#include <string>
#include <typeinfo>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/errors.h"
#include "tests/test_util.h"

namespace cimsweep {
namespace {

using testing::read_text;
using testing::TempDir;
using testing::test_seed;
using testing::write_text;

// ---------------------------------------------------------------------------------------------
// Helpers to build files byte by byte, independent of the writer under test.

std::string le64(uint64_t value) {
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((value >> (8 * i)) & 0xff);
  return out;
}

// Raw little-endian bytes of `values` (the test host is little-endian, as the reader assumes).
template <typename T>
std::string bytes_of(std::initializer_list<T> values) {
  std::string out;
  for (T value : values) out.append(reinterpret_cast<const char*>(&value), sizeof value);
  return out;
}

std::string make_file(const std::string& header, const std::string& data) {
  return le64(header.size()) + header + data;
}

uint32_t bits_of(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  return bits;
}

// Reads `path` expecting a one-line UserError that names the file and contains `fragment`.
void expect_read_error(const std::string& path, const std::string& fragment) {
  EXPECT_THROW(
      {
        try {
          read_safetensors(path);
        } catch (const UserError& error) {
          const std::string message = error.what();
          EXPECT_NE(message.find("'" + path + "'"), std::string::npos) << message;
          EXPECT_NE(message.find(fragment), std::string::npos)
              << "expected '" << fragment << "' in: " << message;
          EXPECT_EQ(message.find('\n'), std::string::npos) << message;
          throw;
        }
      },
      UserError);
}

Tensor random_tensor(std::vector<int64_t> shape, std::mt19937& rng) {
  Tensor tensor(std::move(shape));
  std::normal_distribution<float> normal(0.0f, 3.0f);
  for (float& value : tensor.data) value = normal(rng);
  return tensor;
}

std::vector<std::string> directory_entries(const std::string& directory) {
  std::vector<std::string> names;
  for (const auto& entry : std::filesystem::directory_iterator(directory)) {
    names.push_back(entry.path().filename().string());
  }
  std::sort(names.begin(), names.end());
  return names;
}

// ---------------------------------------------------------------------------------------------
// Round trips through the writer

TEST(SafetensorsTest, RoundTripKeepsShapesValuesAndMetadata) {
  std::mt19937 rng(test_seed(11));
  TempDir dir;
  const std::string path = dir.file("model.safetensors");
  std::map<std::string, Tensor> tensors;
  tensors["fc.weight"] = random_tensor({33}, rng);
  tensors["layer1.0.conv1.weight"] = random_tensor({3, 5, 7}, rng);
  tensors["empty"] = random_tensor({0}, rng);
  tensors["empty_middle"] = random_tensor({2, 0, 3}, rng);
  tensors["scalar"] = random_tensor({}, rng);
  tensors["a"] = random_tensor({1, 1, 1, 1}, rng);
  // Extreme but finite values must survive bit-exactly.
  tensors["extremes"] = Tensor({6});
  tensors["extremes"].data = {std::numeric_limits<float>::max(),
                              -std::numeric_limits<float>::max(),
                              std::numeric_limits<float>::denorm_min(),
                              -0.0f,
                              0.0f,
                              1e-40f};
  const std::map<std::string, std::string> metadata = {
      {"cimsweep.arch", R"({"family": "resnet-cifar", "depth": 20})"},
      {"format", "pt"},
      {"unicode", "\xce\xbb = 0.5 \xe2\x86\x92 ok"},
      {"empty", ""},
  };
  write_safetensors(path, tensors, metadata);

  const SafetensorsFile file = read_safetensors(path);
  EXPECT_EQ(file.metadata, metadata);
  ASSERT_EQ(file.tensors.size(), tensors.size());
  for (const auto& [name, expected] : tensors) {
    SCOPED_TRACE(name);
    ASSERT_EQ(file.tensors.count(name), 1u);
    const Tensor& actual = file.tensors.at(name);
    EXPECT_EQ(actual.shape, expected.shape);
    ASSERT_EQ(actual.data.size(), expected.data.size());
    for (size_t i = 0; i < expected.data.size(); ++i) {
      EXPECT_EQ(bits_of(actual.data[i]), bits_of(expected.data[i])) << "element " << i;
    }
  }
  EXPECT_EQ(file.tensors.at("scalar").data.size(), 1u);
  EXPECT_TRUE(file.tensors.at("empty").data.empty());
}

TEST(SafetensorsTest, WriterLayoutMatchesSafetensorsConventions) {
  TempDir dir;
  const std::string path = dir.file("m.safetensors");
  std::map<std::string, Tensor> tensors;
  tensors["b"] = Tensor({3});
  tensors["b"].data = {1.0f, 2.0f, 3.0f};
  tensors["a"] = Tensor({2, 1});
  tensors["a"].data = {-1.0f, 0.5f};
  write_safetensors(path, tensors, {});

  const std::string bytes = read_text(path);
  ASSERT_GE(bytes.size(), 8u);
  uint64_t header_size;
  std::memcpy(&header_size, bytes.data(), 8);
  EXPECT_EQ(header_size % 8, 0u) << "data section must start 8-byte aligned";
  ASSERT_EQ(bytes.size(), 8 + header_size + 5 * sizeof(float));
  const std::string header_text = bytes.substr(8, header_size);
  EXPECT_EQ(header_text.front(), '{');
  EXPECT_EQ(header_text.find_first_not_of(' ', header_text.rfind('}') + 1), std::string::npos)
      << "only spaces may follow the JSON";
  const nlohmann::json header = nlohmann::json::parse(header_text);
  EXPECT_FALSE(header.contains("__metadata__")) << "empty metadata is omitted";
  EXPECT_LT(header_text.find("\"a\""), header_text.find("\"b\"")) << "keys sorted";
  EXPECT_EQ(header["a"]["dtype"], "F32");
  EXPECT_EQ(header["a"]["shape"], nlohmann::json::array({2, 1}));
  EXPECT_EQ(header["a"]["data_offsets"], nlohmann::json::array({0, 8}));
  EXPECT_EQ(header["b"]["data_offsets"], nlohmann::json::array({8, 20}));
  float first_of_b;
  std::memcpy(&first_of_b, bytes.data() + 8 + header_size + 8, sizeof first_of_b);
  EXPECT_EQ(first_of_b, 1.0f);
  EXPECT_EQ(directory_entries(dir.path()), std::vector<std::string>{"m.safetensors"})
      << "no temporary file left behind";
}

TEST(SafetensorsTest, WriterWritesEmptyFileAndOverwritesExisting) {
  TempDir dir;
  const std::string path = dir.file("m.safetensors");
  write_text(path, "old contents that are not a model");
  write_safetensors(path, {}, {{"k", "v"}});
  SafetensorsFile file = read_safetensors(path);
  EXPECT_TRUE(file.tensors.empty());
  EXPECT_EQ(file.metadata.at("k"), "v");

  write_safetensors(path, {}, {});
  file = read_safetensors(path);
  EXPECT_TRUE(file.tensors.empty());
  EXPECT_TRUE(file.metadata.empty());
  EXPECT_EQ(directory_entries(dir.path()), std::vector<std::string>{"m.safetensors"});
}

void expect_write_error(const std::string& path, const std::map<std::string, Tensor>& tensors,
                        const std::string& fragment) {
  EXPECT_THROW(
      {
        try {
          write_safetensors(path, tensors, {});
        } catch (const UserError& error) {
          const std::string message = error.what();
          EXPECT_NE(message.find("'" + path + "'"), std::string::npos) << message;
          EXPECT_NE(message.find(fragment), std::string::npos)
              << "expected '" << fragment << "' in: " << message;
          EXPECT_EQ(message.find('\n'), std::string::npos) << message;
          throw;
        }
      },
      UserError);
}

TEST(SafetensorsTest, WriterFailuresThrowAndLeaveNoTemporaryFile) {
  TempDir dir;
  std::map<std::string, Tensor> tensors;
  tensors["w"] = Tensor({2});

  expect_write_error(dir.file("missing/m.safetensors"), tensors, "does not exist");
  // A directory in the way is refused before anything is written (it used to be the rename).
  std::filesystem::create_directory(dir.file("taken"));
  expect_write_error(dir.file("taken"), tensors, "is a directory");
  EXPECT_EQ(directory_entries(dir.path()), std::vector<std::string>{"taken"});

  const std::string path = dir.file("m.safetensors");
  std::map<std::string, Tensor> bad = tensors;
  bad["w"].data.push_back(1.0f);
  expect_write_error(path, bad, "3 values but shape [2]");
  bad = tensors;
  bad["w"].data[1] = std::numeric_limits<float>::quiet_NaN();
  expect_write_error(path, bad, "non-finite value (nan)");
  bad = tensors;
  bad["w"].data[0] = -std::numeric_limits<float>::infinity();
  expect_write_error(path, bad, "non-finite value (-inf)");
  bad = tensors;
  bad["__metadata__"] = Tensor({1});
  expect_write_error(path, bad, "__metadata__");
  bad = tensors;
  bad["bad\xff"] = Tensor({1});
  expect_write_error(path, bad, "UTF-8");
  EXPECT_EQ(directory_entries(dir.path()), std::vector<std::string>{"taken"});
}

// ---------------------------------------------------------------------------------------------
// Hand-built files in every supported dtype

TEST(SafetensorsTest, ReadsEveryDtypeExactly) {
  TempDir dir;
  const std::string path = dir.file("dtypes.safetensors");
  // Layout: each tensor's bytes in order; offsets computed by hand.
  const std::string f16 = bytes_of<uint16_t>({0x3C00, 0x7BFF, 0x0001, 0x8001, 0x03FF, 0x0400,
                                              0xC000, 0x8000, 0x3555, 0x0000});  // 20 bytes
  const std::string bf16 = bytes_of<uint16_t>({0x3F80, 0x4049, 0x0001, 0x7F7F, 0x8000, 0xBF80});
  const std::string f64 = bytes_of<double>({1.5, -2.25, 1e-3, 1e-50, 3.0e38});
  const std::string i64 =
      bytes_of<int64_t>({-5, int64_t{1} << 40, std::numeric_limits<int64_t>::max()});
  const std::string i32 = bytes_of<int32_t>({-7, 16777217, 123456});
  const std::string i16 = bytes_of<int16_t>({-32768, 32767});
  const std::string i8 = bytes_of<int8_t>({-128, 127, 0});
  const std::string u8 = bytes_of<uint8_t>({0, 1, 255});
  const std::string boolean = bytes_of<uint8_t>({1, 0, 0, 1});
  const std::string f32 = bytes_of<float>({0.25f});

  std::string data;
  std::string header = "{";
  const auto add = [&](const std::string& name, const std::string& dtype, const std::string& shape,
                       const std::string& bytes) {
    if (header.size() > 1) header += ",";
    header += "\"" + name + "\":{\"dtype\":\"" + dtype + "\",\"shape\":" + shape +
              ",\"data_offsets\":[" + std::to_string(data.size()) + "," +
              std::to_string(data.size() + bytes.size()) + "]}";
    data += bytes;
  };
  add("f16", "F16", "[2,5]", f16);
  add("bf16", "BF16", "[6]", bf16);
  add("f64", "F64", "[5]", f64);
  add("i64", "I64", "[3]", i64);
  add("i32", "I32", "[3]", i32);
  add("i16", "I16", "[2]", i16);
  add("i8", "I8", "[3]", i8);  // data now at an odd offset: reads must not assume alignment
  add("u8", "U8", "[3]", u8);
  add("bool", "BOOL", "[2,2]", boolean);
  add("f32", "F32", "[]", f32);
  header += "}";
  write_text(path, make_file(header, data));

  const SafetensorsFile file = read_safetensors(path);
  EXPECT_TRUE(file.metadata.empty());
  ASSERT_EQ(file.tensors.size(), 10u);

  const Tensor& half = file.tensors.at("f16");
  EXPECT_EQ(half.shape, (std::vector<int64_t>{2, 5}));
  const std::vector<float> half_expected = {1.0f,
                                            65504.0f,
                                            std::ldexp(1.0f, -24),
                                            -std::ldexp(1.0f, -24),
                                            std::ldexp(1023.0f, -24),
                                            std::ldexp(1.0f, -14),
                                            -2.0f,
                                            -0.0f,
                                            0.333251953125f,
                                            0.0f};
  ASSERT_EQ(half.data.size(), half_expected.size());
  for (size_t i = 0; i < half_expected.size(); ++i) {
    EXPECT_EQ(bits_of(half.data[i]), bits_of(half_expected[i])) << "F16 element " << i;
  }

  const std::vector<float> bf16_expected = {1.0f,
                                            3.140625f,
                                            std::ldexp(1.0f, -133),  // float subnormal
                                            3.3895313892515355e38f,
                                            -0.0f,
                                            -1.0f};
  const Tensor& brain = file.tensors.at("bf16");
  ASSERT_EQ(brain.data.size(), bf16_expected.size());
  for (size_t i = 0; i < bf16_expected.size(); ++i) {
    EXPECT_EQ(bits_of(brain.data[i]), bits_of(bf16_expected[i])) << "BF16 element " << i;
  }

  EXPECT_EQ(file.tensors.at("f64").data,
            (std::vector<float>{1.5f, -2.25f, static_cast<float>(1e-3), 0.0f, 3.0e38f}));
  EXPECT_EQ(file.tensors.at("i64").data,
            (std::vector<float>{-5.0f, 1099511627776.0f, 9223372036854775807.0f}));
  EXPECT_EQ(file.tensors.at("i32").data, (std::vector<float>{-7.0f, 16777216.0f, 123456.0f}));
  EXPECT_EQ(file.tensors.at("i16").data, (std::vector<float>{-32768.0f, 32767.0f}));
  EXPECT_EQ(file.tensors.at("i8").data, (std::vector<float>{-128.0f, 127.0f, 0.0f}));
  EXPECT_EQ(file.tensors.at("u8").data, (std::vector<float>{0.0f, 1.0f, 255.0f}));
  EXPECT_EQ(file.tensors.at("bool").data, (std::vector<float>{1.0f, 0.0f, 0.0f, 1.0f}));
  EXPECT_EQ(file.tensors.at("bool").shape, (std::vector<int64_t>{2, 2}));
  EXPECT_EQ(file.tensors.at("f32").shape, std::vector<int64_t>{});
  EXPECT_EQ(file.tensors.at("f32").data, std::vector<float>{0.25f});
}

TEST(SafetensorsTest, EveryHalfValueConvertsExactly) {
  // Reference: value = (-1)^s * 2^(e-15) * (1 + m/1024) for normals, 2^-14 * m/1024 for subnormals.
  TempDir dir;
  const std::string path = dir.file("halves.safetensors");
  std::string data;
  for (uint32_t h = 0; h < 0x10000; ++h) {
    const uint32_t exponent = (h >> 10) & 0x1f;
    if (exponent == 0x1f) continue;  // inf/nan are rejected; covered by the error tests
    const uint16_t half = static_cast<uint16_t>(h);
    data.append(reinterpret_cast<const char*>(&half), 2);
  }
  const size_t count = data.size() / 2;
  write_text(path, make_file(R"({"h":{"dtype":"F16","shape":[)" + std::to_string(count) +
                                 R"(],"data_offsets":[0,)" + std::to_string(data.size()) + "]}}",
                             data));
  const SafetensorsFile file = read_safetensors(path);
  const std::vector<float>& values = file.tensors.at("h").data;
  ASSERT_EQ(values.size(), count);
  for (size_t i = 0; i < count; ++i) {
    uint16_t h;
    std::memcpy(&h, data.data() + 2 * i, 2);
    const int exponent = (h >> 10) & 0x1f;
    const int mantissa = h & 0x3ff;
    double magnitude =
        exponent == 0 ? std::ldexp(mantissa, -24) : std::ldexp(1024 + mantissa, exponent - 25);
    const double expected = (h & 0x8000) ? -magnitude : magnitude;
    ASSERT_EQ(values[i], static_cast<float>(expected)) << "half 0x" << std::hex << h;
    ASSERT_EQ(std::signbit(values[i]), (h & 0x8000) != 0) << "half 0x" << std::hex << h;
  }
}

TEST(SafetensorsTest, ReadsFileLaidOutLikeSafetensorsTorch) {
  // Byte-for-byte what safetensors.torch.save_file writes for
  // {"bias": float32[2], "weight": float16[2, 2]} with metadata {"format": "pt"}: metadata first,
  // tensors ordered by alignment then name, header padded with spaces to a multiple of 8.
  TempDir dir;
  const std::string path = dir.file("torch.safetensors");
  std::string header =
      R"({"__metadata__":{"format":"pt"},"bias":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
      R"("weight":{"dtype":"F16","shape":[2,2],"data_offsets":[8,16]}})";
  header.append((8 - header.size() % 8) % 8, ' ');
  write_text(path, make_file(header, bytes_of<float>({0.5f, -1.0f}) +
                                         bytes_of<uint16_t>({0x3C00, 0x4000, 0xBC00, 0x3800})));
  const SafetensorsFile file = read_safetensors(path);
  EXPECT_EQ(file.metadata, (std::map<std::string, std::string>{{"format", "pt"}}));
  EXPECT_EQ(file.tensors.at("bias").data, (std::vector<float>{0.5f, -1.0f}));
  EXPECT_EQ(file.tensors.at("weight").shape, (std::vector<int64_t>{2, 2}));
  EXPECT_EQ(file.tensors.at("weight").data, (std::vector<float>{1.0f, 2.0f, -1.0f, 0.5f}));
}

TEST(SafetensorsTest, AcceptsTrailingSpacePaddingGapsAndNullMetadata) {
  TempDir dir;
  const std::string path = dir.file("padded.safetensors");
  // 13 spaces: deliberately not a multiple of 8, so the data section is misaligned.
  const std::string header =
      R"({"__metadata__":null,"x":{"shape":[1],"dtype":"F32","data_offsets":[4,8],"extra":1}})" +
      std::string(13, ' ');
  write_text(path, make_file(header, bytes_of<float>({99.0f, 7.0f}) + "trailing"));
  const SafetensorsFile file = read_safetensors(path);
  EXPECT_TRUE(file.metadata.empty());
  EXPECT_EQ(file.tensors.at("x").data, std::vector<float>{7.0f});
}

// ---------------------------------------------------------------------------------------------
// Corrupt files: every one is a UserError naming the file

TEST(SafetensorsTest, MissingFileAndDirectory) {
  TempDir dir;
  expect_read_error(dir.file("nope.safetensors"), "does not exist");
  expect_read_error(dir.path(), "is a directory");
}

struct CorruptCase {
  std::string name;
  std::string bytes;
  std::string fragment;  // expected in the message
};

std::ostream& operator<<(std::ostream& out, const CorruptCase& c) {
  return out << c.name;
}

// A one-tensor header around `entry`, with 8 data bytes (two F32 values 1, 2).
CorruptCase one_tensor(const std::string& name, const std::string& entry,
                       const std::string& fragment) {
  return {name, make_file("{\"t\":" + entry + "}", bytes_of<float>({1.0f, 2.0f})), fragment};
}

std::vector<CorruptCase> corrupt_cases() {
  const std::string eight = bytes_of<float>({1.0f, 2.0f});
  const std::string nan_f32 = bytes_of<float>({1.0f, std::numeric_limits<float>::quiet_NaN()});
  return {
      {"Empty", "", "0 bytes long"},
      {"SevenBytes", std::string(7, '\0'), "7 bytes long"},
      {"HeaderLengthBeyondFile", le64(100) + "{}", "header length 100 exceeds the remaining 2"},
      {"HeaderLengthAbsurd", le64(uint64_t{1} << 40) + "{}", "implausible"},
      {"HeaderLengthMax", le64(~uint64_t{0}) + "{}", "implausible"},
      {"HeaderLengthZero", le64(0) + "{}", "not valid JSON"},
      {"InvalidJson", make_file(R"({"t": )", ""), "not valid JSON"},
      {"TrailingGarbage", make_file("{} x", ""), "not valid JSON"},
      {"NulPadding", make_file(std::string("{}") + '\0' + '\0', ""), "NUL byte"},
      {"NulBeforeMoreTensors",
       make_file(
           std::string("{}") + '\0' + R"({"t":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})",
           bytes_of<float>({1.0f, 2.0f})),
       "NUL byte"},
      {"ZeroDimDoesNotHideOverflow",
       make_file(R"({"t":{"dtype":"F32","shape":[0,4294967296,4294967296],"data_offsets":[0,4]}})",
                 bytes_of<float>({1.0f})),
       "do not match its F32 shape [0, 4294967296, 4294967296] (0 bytes)"},
      {"InvalidUtf8", make_file("{\"t\xff\":{}}", ""), "not valid JSON"},
      {"HeaderArray", make_file("[1, 2]", ""), "header is a JSON array"},
      {"HeaderString", make_file("\"x\"", ""), "header is a JSON string"},
      {"DuplicateTensor",
       make_file(R"({"t":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                 R"("t":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})",
                 eight),
       "tensor 't' is listed twice"},
      {"DuplicateField",
       make_file(R"({"t":{"dtype":"F32","dtype":"F16","shape":[2],"data_offsets":[0,8]}})", eight),
       "key 'dtype' occurs twice"},
      one_tensor("EntryNotObject", "3", "tensor 't' is described by a JSON number"),
      one_tensor("MissingDtype", R"({"shape":[2],"data_offsets":[0,8]})", "has no \"dtype\""),
      one_tensor("MissingShape", R"({"dtype":"F32","data_offsets":[0,8]})", "has no \"shape\""),
      one_tensor("MissingOffsets", R"({"dtype":"F32","shape":[2]})", "has no \"data_offsets\""),
      one_tensor("DtypeNotString", R"({"dtype":4,"shape":[2],"data_offsets":[0,8]})",
                 "\"dtype\" is a JSON number"),
      one_tensor("UnknownDtype", R"({"dtype":"F8_E4M3","shape":[8],"data_offsets":[0,8]})",
                 "unsupported dtype 'F8_E4M3'"),
      one_tensor("LowercaseDtype", R"({"dtype":"f32","shape":[2],"data_offsets":[0,8]})",
                 "unsupported dtype 'f32'"),
      one_tensor("ShapeNotArray", R"({"dtype":"F32","shape":2,"data_offsets":[0,8]})",
                 "\"shape\" is a JSON number"),
      one_tensor("ShapeFloat", R"({"dtype":"F32","shape":[2.0],"data_offsets":[0,8]})",
                 "shape entry 2.0 is not an integer"),
      one_tensor("ShapeString", R"({"dtype":"F32","shape":["2"],"data_offsets":[0,8]})",
                 "is not an integer"),
      one_tensor("ShapeNegative", R"({"dtype":"F32","shape":[-2, -1],"data_offsets":[0,8]})",
                 "negative dimension -2"),
      one_tensor("ShapeAboveInt64",
                 R"({"dtype":"F32","shape":[9223372036854775808],"data_offsets":[0,8]})",
                 "not an integer dimension below 2^63"),
      one_tensor("ShapeOverflow",
                 R"({"dtype":"F32","shape":[4294967296,4294967296,2],"data_offsets":[0,8]})",
                 "impossibly large"),
      one_tensor("ShapeOverflowInBytes",
                 R"({"dtype":"F64","shape":[4611686018427387904],"data_offsets":[0,8]})",
                 "impossibly large"),
      one_tensor("OffsetsNotArray", R"({"dtype":"F32","shape":[2],"data_offsets":8})",
                 "are not two non-negative integers"),
      one_tensor("OffsetsOneNumber", R"({"dtype":"F32","shape":[2],"data_offsets":[8]})",
                 "are not two non-negative integers"),
      one_tensor("OffsetsThreeNumbers", R"({"dtype":"F32","shape":[2],"data_offsets":[0,8,8]})",
                 "are not two non-negative integers"),
      one_tensor("OffsetsNegative", R"({"dtype":"F32","shape":[2],"data_offsets":[-8,0]})",
                 "are not two non-negative integers"),
      one_tensor("OffsetsFloat", R"({"dtype":"F32","shape":[2],"data_offsets":[0,8.5]})",
                 "are not two non-negative integers"),
      one_tensor("OffsetsReversed", R"({"dtype":"F32","shape":[2],"data_offsets":[8,0]})",
                 "end before they begin"),
      one_tensor("SizeMismatch", R"({"dtype":"F32","shape":[3],"data_offsets":[0,8]})",
                 "data_offsets [0, 8] do not match its F32 shape [3] (12 bytes)"),
      one_tensor("ScalarSizeMismatch", R"({"dtype":"F64","shape":[],"data_offsets":[0,4]})",
                 "do not match its F64 shape [] (8 bytes)"),
      one_tensor("BeyondData", R"({"dtype":"F32","shape":[4],"data_offsets":[0,16]})",
                 "reach beyond the data section (8 bytes)"),
      one_tensor("BeyondDataHugeOffsets",
                 R"({"dtype":"U8","shape":[1],"data_offsets":[9223372036854775806,)"
                 R"(9223372036854775807]})",
                 "reach beyond the data section"),
      {"Overlap",
       make_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                 R"("b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})",
                 eight),
       "tensors 'a' and 'b' overlap"},
      {"SameRange",
       make_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                 R"("b":{"dtype":"I32","shape":[2],"data_offsets":[0,8]}})",
                 eight),
       "overlap"},
      {"MetadataValueNumber", make_file(R"({"__metadata__":{"format":"pt","n":1}})", ""),
       "\"__metadata__\" value for key 'n' is a JSON number"},
      {"MetadataValueObject", make_file(R"({"__metadata__":{"arch":{"depth":20}}})", ""),
       "value for key 'arch' is a JSON object"},
      {"MetadataNotObject", make_file(R"({"__metadata__":"pt"})", ""),
       "\"__metadata__\" is a JSON string"},
      {"NanF32", make_file(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", nan_f32),
       "non-finite value (nan) in tensor 'w' at element 1"},
      {"InfF16",
       make_file(R"({"w":{"dtype":"F16","shape":[2],"data_offsets":[0,4]}})",
                 bytes_of<uint16_t>({0x3C00, 0x7C00})),
       "non-finite value (inf) in tensor 'w' at element 1"},
      {"NegInfF16",
       make_file(R"({"w":{"dtype":"F16","shape":[1],"data_offsets":[0,2]}})",
                 bytes_of<uint16_t>({0xFC00})),
       "non-finite value (-inf) in tensor 'w'"},
      {"NanF16",
       make_file(R"({"w":{"dtype":"F16","shape":[1],"data_offsets":[0,2]}})",
                 bytes_of<uint16_t>({0x7E00})),
       "non-finite value (nan) in tensor 'w'"},
      {"NanBF16",
       make_file(R"({"w":{"dtype":"BF16","shape":[1],"data_offsets":[0,2]}})",
                 bytes_of<uint16_t>({0x7FC0})),
       "non-finite value (nan) in tensor 'w'"},
      {"InfF64",
       make_file(R"({"w":{"dtype":"F64","shape":[1],"data_offsets":[0,8]}})",
                 bytes_of<double>({std::numeric_limits<double>::infinity()})),
       "non-finite value (inf) in tensor 'w'"},
      {"F64OutOfFloatRange",
       make_file(R"({"w":{"dtype":"F64","shape":[1],"data_offsets":[0,8]}})",
                 bytes_of<double>({-1e300})),
       "value outside the float32 range"},
      {"BoolNotZeroOrOne",
       make_file(R"({"m":{"dtype":"BOOL","shape":[2],"data_offsets":[0,2]}})",
                 bytes_of<uint8_t>({1, 2})),
       "BOOL tensor 'm' holds byte 2"},
      {"NewlineInName",
       make_file(R"({"a\nb":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", eight),
       "tensor 'a\\x0ab'"},
      // Regression (fuzz/fuzz_model_file, crafted input): the message printed the nested value
      // with a recursive dump, which overflowed the stack.
      one_tensor("DeeplyNestedOffsets",
                 R"({"dtype":"F32","shape":[2],"data_offsets":)" + std::string(200000, '[') +
                     std::string(200000, ']') + "}",
                 "the header nests JSON deeper than 16 levels"),
  };
}

class SafetensorsCorruptTest : public ::testing::TestWithParam<CorruptCase> {};

TEST_P(SafetensorsCorruptTest, ThrowsUserErrorNamingFile) {
  TempDir dir;
  const std::string path = dir.file("broken.safetensors");
  write_text(path, GetParam().bytes);
  expect_read_error(path, GetParam().fragment);
}

INSTANTIATE_TEST_SUITE_P(AllProblems, SafetensorsCorruptTest, ::testing::ValuesIn(corrupt_cases()),
                         [](const ::testing::TestParamInfo<CorruptCase>& info) {
                           return info.param.name;
                         });

// ---------------------------------------------------------------------------------------------
// Robustness: truncations and random damage never crash

std::string valid_model_bytes(const TempDir& dir, uint32_t seed) {
  std::mt19937 rng(seed);
  std::map<std::string, Tensor> tensors;
  tensors["conv.weight"] = random_tensor({2, 3, 3}, rng);
  tensors["fc.bias"] = random_tensor({5}, rng);
  tensors["fc.weight"] = random_tensor({5, 4}, rng);
  tensors["scalar"] = random_tensor({}, rng);
  tensors["zero"] = random_tensor({0, 4}, rng);
  const std::string path = dir.file("valid.safetensors");
  write_safetensors(path, tensors, {{"cimsweep.arch", R"({"depth": 8})"}, {"format", "pt"}});
  return read_text(path);
}

// Regression (fuzz/fuzz_model_file, crafted input): a zero dim after dims whose product
// overflows int64 made Tensor's element count overflow (undefined behaviour, caught by UBSan).
TEST(SafetensorsTest, ZeroDimAfterHugeDimsLoadsAsEmptyTensor) {
  TempDir dir;
  const std::string path = dir.file("empty.safetensors");
  write_text(path, make_file(R"({"t":{"dtype":"F32","shape":[4611686018427387904,)"
                             R"(4611686018427387904,0],"data_offsets":[0,0]}})",
                             ""));
  const SafetensorsFile file = read_safetensors(path);
  EXPECT_TRUE(file.tensors.at("t").data.empty());
  EXPECT_EQ(file.tensors.at("t").numel(), 0);
}

TEST(SafetensorsTest, EveryTruncationThrowsUserError) {
  TempDir dir;
  const std::string bytes = valid_model_bytes(dir, test_seed(5));
  const std::string path = dir.file("cut.safetensors");
  for (size_t length = 0; length < bytes.size(); ++length) {
    SCOPED_TRACE("truncated to " + std::to_string(length) + " of " + std::to_string(bytes.size()) +
                 " bytes");
    write_text(path, bytes.substr(0, length));
    expect_read_error(path, "is corrupt");
  }
  write_text(path, bytes);
  EXPECT_EQ(read_safetensors(path).tensors.size(), 5u);
}

TEST(SafetensorsTest, RandomDamageThrowsOnlyUserError) {
  const uint32_t seed = test_seed(17);
  std::mt19937 rng(seed);
  TempDir dir;
  const std::string original = valid_model_bytes(dir, seed);
  uint64_t header_size;
  std::memcpy(&header_size, original.data(), 8);
  const std::string path = dir.file("damaged.safetensors");
  int loaded = 0, rejected = 0;
  for (int trial = 0; trial < 1000; ++trial) {
    std::string bytes = original;
    // Mostly damage the length and header, where parsing decisions are made.
    const size_t limit = (trial % 4 == 0) ? bytes.size() : 8 + header_size;
    const int edits = 1 + static_cast<int>(rng() % 4);
    for (int e = 0; e < edits && !bytes.empty(); ++e) {
      const size_t at = rng() % std::min(limit, bytes.size());
      switch (rng() % 3) {
        case 0:
          bytes[at] = static_cast<char>(rng());
          break;
        case 1:
          bytes[at] = "{}[],:\"0123456789-.e \\"[rng() % 22];
          break;
        default:
          bytes.erase(at, 1 + rng() % 8);
          break;
      }
    }
    write_text(path, bytes);
    try {
      const SafetensorsFile file = read_safetensors(path);
      for (const auto& [name, tensor] : file.tensors) {
        ASSERT_EQ(static_cast<int64_t>(tensor.data.size()), tensor.numel()) << name;
      }
      ++loaded;
    } catch (const UserError& error) {
      ASSERT_NE(std::string(error.what()).find(path), std::string::npos) << error.what();
      ++rejected;
    } catch (const std::exception& error) {
      FAIL() << "trial " << trial << ": unexpected " << typeid(error).name() << ": "
             << error.what();
    }
  }
  EXPECT_GT(rejected, 0);
  std::cout << "[ damage   ] " << loaded << " loaded, " << rejected << " rejected" << std::endl;
}

}  // namespace
}  // namespace cimsweep
