// safetensors model files: an 8-byte little-endian header length, a JSON header naming every
// tensor (dtype, shape, data_offsets) plus a string-to-string "__metadata__" map, then raw
// little-endian tensor bytes. Readable and writable by `safetensors.torch.save_file`.
#pragma once
#include <map>
#include <string>

#include "common/tensor.h"

namespace cimsweep {

struct SafetensorsFile {
  std::map<std::string, std::string> metadata;
  std::map<std::string, Tensor> tensors;  // converted to float32
};

// Reads and validates a whole file: header length within the file, valid JSON, every entry with
// a known dtype (F64, F32, F16, BF16, I64, I32, I16, I8, U8, BOOL), a shape whose byte size matches
// its data_offsets, offsets inside the data section, no overlaps, every float value finite.
// Throws UserError naming the file and the problem.
SafetensorsFile read_safetensors(const std::string& path);

// Writes float32 tensors and metadata atomically (temporary file + rename).
void write_safetensors(const std::string& path, const std::map<std::string, Tensor>& tensors,
                       const std::map<std::string, std::string>& metadata);

}  // namespace cimsweep
