#include "tests/test_util.h"

#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <sstream>
#include <stdexcept>

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
