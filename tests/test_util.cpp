#include "tests/test_util.h"

#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <random>
#include <sstream>
#include <stdexcept>

#include "common/errors.h"

namespace cimsweep::testing {

TempDir::TempDir() {
  const char* base = std::getenv("TMPDIR");
  std::string pattern = std::string(base ? base : "/tmp") + "/cimsweep-test-XXXXXX";
  if (!mkdtemp(pattern.data())) throw std::runtime_error("mkdtemp failed for " + pattern);
  path_ = pattern;
}

TempDir::~TempDir() {
  std::error_code ignored;
  std::filesystem::remove_all(path_, ignored);
}

uint32_t test_seed(uint32_t default_seed) {
  uint32_t seed = default_seed;
  if (const char* env = std::getenv("CIMSWEEP_TEST_SEED"))
    seed = uint32_t(std::strtoul(env, nullptr, 0));
  std::cout << "[ seed     ] " << seed << " (set CIMSWEEP_TEST_SEED to replay)" << std::endl;
  return seed;
}

std::string user_error(const std::function<void()>& action) {
  try {
    action();
  } catch (const UserError& e) {
    return e.what();
  }
  return "";
}

std::string read_text(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void write_text(const std::string& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary);
  out << text;
}

std::vector<std::string> split_lines(const std::string& text) {
  std::vector<std::string> out;
  std::stringstream ss(text);
  for (std::string line; std::getline(ss, line);) out.push_back(line);
  return out;
}

namespace {
void put_be32(std::ofstream& out, uint32_t v) {
  const unsigned char b[4] = {uint8_t(v >> 24), uint8_t(v >> 16), uint8_t(v >> 8), uint8_t(v)};
  out.write(reinterpret_cast<const char*>(b), 4);
}
}  // namespace

void write_tiny_idx_test_split(const std::string& dir, uint32_t seed) {
  std::mt19937 rng(seed);
  const int count = 42, h = 11, w = 13;
  std::ofstream images(dir + "/t10k-images-idx3-ubyte", std::ios::binary);
  put_be32(images, 0x803);
  put_be32(images, count);
  put_be32(images, h);
  put_be32(images, w);
  for (int i = 0; i < count * h * w; ++i) images.put(char(rng() & 0xff));
  std::ofstream labels(dir + "/t10k-labels-idx1-ubyte", std::ios::binary);
  put_be32(labels, 0x801);
  put_be32(labels, count);
  for (int i = 0; i < count; ++i) labels.put(char(i % 7));
}

CommandResult run_cimsweep(const std::string& args) {
  TempDir scratch;
  const std::string out_path = scratch.file("stdout"), err_path = scratch.file("stderr");
  const std::string command = std::string(CIMSWEEP_BINARY) + " " + args + " >" + out_path + " 2>" +
                              err_path + " </dev/null";
  int status = std::system(command.c_str());
  CommandResult result;
  result.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  result.out = read_text(out_path);
  result.err = read_text(err_path);
  return result;
}

}  // namespace cimsweep::testing
