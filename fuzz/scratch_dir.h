// The readers take paths, not buffers, and the path handling (directories, names, sizes) is part of
// what is fuzzed: each fuzz input is written to files in one scratch directory per process, which
// is reused by every input and removed at exit.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

namespace cimsweep::fuzz {

// The process's scratch directory (created on first use under $TMPDIR or /tmp).
const std::string& scratch_dir();

// Writes `size` bytes to scratch_dir()/relative_path, creating parent directories; returns the
// full path. Aborts on an I/O error: that is a broken fuzzing machine, not a finding.
std::string write_scratch_file(const std::string& relative_path, const uint8_t* data, size_t size);

}  // namespace cimsweep::fuzz
