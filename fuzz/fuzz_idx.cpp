// IDX data sets (MNIST family), raw or gzip (zlib detects gzip by content, so one input covers
// both): the input is split into an images file and a labels file, written side by side as a
// t10k pair and loaded as a directory, then subset as --limit does.
//
// Input layout: 2 bytes little-endian = length of the images file, its bytes, then the labels file.
#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "fuzz/scratch_dir.h"
#include "host/io/dataset.h"
#include "common/errors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 2) return -1;  // not a well-formed input: keep it out of the corpus
  const size_t images_size = std::min<size_t>(size_t(data[0]) | size_t(data[1]) << 8, size - 2);
  const uint8_t* images = data + 2;
  const uint8_t* labels = images + images_size;
  const size_t labels_size = size - 2 - images_size;
  using cimsweep::fuzz::write_scratch_file;
  write_scratch_file("idx/t10k-images-idx3-ubyte", images, images_size);
  write_scratch_file("idx/t10k-labels-idx1-ubyte", labels, labels_size);
  try {
    const cimsweep::Dataset dataset =
        cimsweep::load_dataset(cimsweep::fuzz::scratch_dir() + "/idx", "test");
    (void)cimsweep::balanced_subset(dataset, 3);
  } catch (const cimsweep::UserError&) {
  }
  return 0;
}
