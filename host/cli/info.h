// `cimsweep info MODEL`: a model's architecture, parameters, metadata and crossbar usage.
#pragma once
#include <string>

namespace CLI {
class App;
}

namespace cimsweep {

struct InfoOptions {
  std::string model;            // model file (.safetensors)
  std::string format = "text";  // text or json (the metadata as stored)
};

CLI::App* setup_info(CLI::App& app, InfoOptions& options);
// Returns the exit code; UserError on bad input.
int run_info(const InfoOptions& options);

}  // namespace cimsweep
