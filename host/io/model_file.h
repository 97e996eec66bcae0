// Model files (docs/model-format.md): a safetensors file with the architecture and the CIM layers'
// input ranges in its metadata, loaded into a validated ResNet.
#pragma once
#include <map>
#include <memory>
#include <string>

#include "common/tensor.h"
#include "networks/resnet.h"

namespace cimsweep {

struct LoadedModel {
  std::string path;
  std::string content_hash;  // FNV-1a of the file's bytes: results name the exact weights
  std::map<std::string, std::string> metadata;
  std::unique_ptr<ResNet> network;
};

// Reads, validates (names, shapes, dtypes, finiteness, architecture, input ranges) and builds.
LoadedModel load_model(const std::string& path);

// Writes a model file (float32) atomically.
void save_model(const std::string& path, const ResNetArch& arch,
                const std::map<std::string, Tensor>& tensors,
                const std::map<std::string, float>& input_ranges,
                const std::map<std::string, std::string>& extra_metadata = {});

}  // namespace cimsweep
