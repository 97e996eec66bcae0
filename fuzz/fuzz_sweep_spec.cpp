// Sweep files (TOML): the input is a sweep file, read and then checked as `cimsweep sweep --spec`
// does before it runs anything.
#include <cstddef>
#include <cstdint>

#include "fuzz/scratch_dir.h"
#include "common/errors.h"
#include "host/sweep/sweep_spec.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string path = cimsweep::fuzz::write_scratch_file("sweep.toml", data, size);
  try {
    const cimsweep::SweepPlan plan = cimsweep::read_sweep_spec(path);
    cimsweep::validate_plan(plan);
  } catch (const cimsweep::UserError&) {
  }
  return 0;
}
