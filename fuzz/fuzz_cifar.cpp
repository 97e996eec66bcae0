// CIFAR-10 binary batches: the input is one batch file (*.bin), loaded as a file, then subset as
// --limit does.
#include <cstddef>
#include <cstdint>

#include "fuzz/scratch_dir.h"
#include "host/io/dataset.h"
#include "common/errors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string path = cimsweep::fuzz::write_scratch_file("cifar/test_batch.bin", data, size);
  try {
    const cimsweep::Dataset dataset = cimsweep::load_dataset(path, "test");
    (void)cimsweep::balanced_subset(dataset, 3);
  } catch (const cimsweep::UserError&) {
  }
  return 0;
}
