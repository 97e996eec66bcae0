#include "host/io/model_file.h"

#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>

#include "common/cim_config.h"
#include "common/errors.h"
#include "host/io/safetensors.h"

namespace cimsweep {
namespace {

constexpr const char* kArchKey = "cimsweep.arch";
constexpr const char* kRangesKey = "cimsweep.input_ranges";

nlohmann::json parse_metadata_json(const std::string& path,
                                   const std::map<std::string, std::string>& metadata,
                                   const char* key) {
  auto it = metadata.find(key);
  if (it == metadata.end())
    throw UserError("model file '" + path + "' has no '" + key +
                    "' metadata: write it as docs/model-format.md describes");
  try {
    return nlohmann::json::parse(it->second);
  } catch (const nlohmann::json::exception&) {
    throw UserError("model file '" + path + "': metadata '" + key +
                    "' is not valid JSON: rewrite it as docs/model-format.md describes");
  }
}

}  // namespace

LoadedModel load_model(const std::string& path) {
  SafetensorsFile file = read_safetensors(path);
  LoadedModel model;
  model.path = path;
  {
    std::ifstream in(path, std::ios::binary);
    std::stringstream bytes;
    bytes << in.rdbuf();
    model.content_hash = fnv1a_hex(bytes.str());
  }
  model.metadata = file.metadata;
  ResNetArch arch;
  // Outside the try: its errors name the file already.
  const nlohmann::json arch_json = parse_metadata_json(path, file.metadata, kArchKey);
  try {
    arch = ResNetArch::from_json(arch_json);
  } catch (const UserError& e) {
    throw UserError("model file '" + path + "': " + e.what());
  }
  const nlohmann::json ranges_json = parse_metadata_json(path, file.metadata, kRangesKey);
  if (!ranges_json.is_object())
    throw UserError("model file '" + path +
                    "': cimsweep.input_ranges must be a JSON object of numbers");
  std::map<std::string, float> ranges;
  for (const auto& [name, value] : ranges_json.items()) {
    if (!value.is_number())
      throw UserError("model file '" + path + "': input range of '" + name + "' is not a number");
    ranges[name] = value.get<float>();
  }
  try {
    model.network = std::make_unique<ResNet>(arch, std::move(file.tensors), ranges);
  } catch (const UserError& e) {
    throw UserError("model file '" + path + "': " + e.what());
  }
  return model;
}

void save_model(const std::string& path, const ResNetArch& arch,
                const std::map<std::string, Tensor>& tensors,
                const std::map<std::string, float>& input_ranges,
                const std::map<std::string, std::string>& extra_metadata) {
  std::map<std::string, std::string> metadata = extra_metadata;
  metadata[kArchKey] = arch.to_json().dump();
  nlohmann::json ranges = nlohmann::json::object();
  for (const auto& [name, value] : input_ranges) ranges[name] = value;
  metadata[kRangesKey] = ranges.dump();
  write_safetensors(path, tensors, metadata);
}

}  // namespace cimsweep
