// Model files: the safetensors container (header length, JSON header, dtypes, shapes, offsets,
// metadata, values) and the model layer on top (architecture and input-range metadata, tensor
// names and shapes), then what `cimsweep info` computes from a model that loads. Any exception
// other than UserError, and any sanitizer report, is a finding.
#include <cstddef>
#include <cstdint>

#include "fuzz/scratch_dir.h"
#include "common/cim_config.h"
#include "host/cpu/cim_cpu.h"
#include "common/errors.h"
#include "host/io/model_file.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string path = cimsweep::fuzz::write_scratch_file("model.safetensors", data, size);
  try {
    const cimsweep::LoadedModel model = cimsweep::load_model(path);
    const cimsweep::ResNet& network = *model.network;
    (void)network.arch().describe();
    (void)network.parameter_count();
    (void)network.layer_macs();
    const cimsweep::CimConfig defaults;
    for (size_t i = 0; i < network.cim_layers().size(); ++i) {
      (void)cimsweep::quantise_layer(network.cim_layers()[i], int(i), defaults, false);
    }
  } catch (const cimsweep::UserError&) {
  }
  return 0;
}
