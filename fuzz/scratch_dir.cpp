#include "fuzz/scratch_dir.h"

#include <fcntl.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <system_error>

namespace cimsweep::fuzz {
namespace {

[[noreturn]] void die(const std::string& what) {
  std::perror(what.c_str());
  std::abort();
}

void remove_scratch_dir() {
  std::error_code ignored;
  std::filesystem::remove_all(scratch_dir(), ignored);
}

}  // namespace

const std::string& scratch_dir() {
  // Never destroyed: the atexit handler that removes the directory runs after static destructors.
  static const std::string& path = *new std::string([] {
    const char* base = std::getenv("TMPDIR");
    std::string pattern = std::string(base ? base : "/tmp") + "/cimsweep-fuzz-XXXXXX";
    if (!mkdtemp(pattern.data())) die("mkdtemp " + pattern);
    std::atexit(remove_scratch_dir);
    return pattern;
  }());
  return path;
}

std::string write_scratch_file(const std::string& relative_path, const uint8_t* data, size_t size) {
  const std::filesystem::path path = std::filesystem::path(scratch_dir()) / relative_path;
  std::error_code error;
  std::filesystem::create_directories(path.parent_path(), error);
  if (error) die("create_directories " + path.parent_path().string());
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd < 0) die("open " + path.string());
  while (size > 0) {
    const ssize_t wrote = ::write(fd, data, size);
    if (wrote <= 0) die("write " + path.string());
    data += wrote;
    size -= size_t(wrote);
  }
  ::close(fd);
  return path.string();
}

}  // namespace cimsweep::fuzz
