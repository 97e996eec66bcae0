// Shared test helpers: a scratch directory removed at the end, printed seeds, running the CLI.
#pragma once
#include <cstdint>
#include <functional>
#include <random>
#include <string>
#include <vector>

namespace cimsweep::testing {

// A fresh directory under $TMPDIR (or /tmp), removed with its contents on destruction.
class TempDir {
 public:
  TempDir();
  ~TempDir();
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::string& path() const { return path_; }
  std::string file(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

// A fixed seed per test, printed so that a failure can be replayed: CIMSWEEP_TEST_SEED overrides.
uint32_t test_seed(uint32_t default_seed);

struct CommandResult {
  int exit_code = -1;
  std::string out;  // stdout
  std::string err;  // stderr
};
// Runs the cimsweep binary built with the tests, with `args` passed through the shell.
CommandResult run_cimsweep(const std::string& args);

// The message of the UserError that `action` throws, or "" when it throws none.
std::string user_error(const std::function<void()>& action);

std::string read_text(const std::string& path);
// The lines of a text, without their newlines.
std::vector<std::string> split_lines(const std::string& text);
// 42 grey 11×13 images of 7 classes (label = index mod 7, random pixels from `seed`), as the IDX
// files of an MNIST-style test split in `dir`: the data of the tiny golden models' CLI tests.
void write_tiny_idx_test_split(const std::string& dir, uint32_t seed);
void write_text(const std::string& path, const std::string& text);

}  // namespace cimsweep::testing
