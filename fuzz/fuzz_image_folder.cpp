// Image folders: the input is one image file, put into both class sub-directories of a folder (so
// that sizes agree and decoding is reached) and loaded as the image-folder reader does: stb's
// header pass, then the decode pass. stb_image.h is compiled into this target (stb_image_impl.c)
// so that the decoders themselves are instrumented and guided by coverage.
#include <cstddef>
#include <cstdint>

#include "fuzz/scratch_dir.h"
#include "host/io/dataset.h"
#include "common/errors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using cimsweep::fuzz::write_scratch_file;
  write_scratch_file("images/class_a/image.png", data, size);
  write_scratch_file("images/class_b/image.png", data, size);
  try {
    (void)cimsweep::load_dataset(cimsweep::fuzz::scratch_dir() + "/images", "test");
  } catch (const cimsweep::UserError&) {
  }
  return 0;
}
