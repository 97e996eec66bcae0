#include "host/cli/info.h"

#include <cstdio>
#include <iostream>
#include <memory>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "common/errors.h"
#include "host/cpu/cim_cpu.h"
#include "host/io/model_file.h"
#include "host/policies/blockdrop_eval.h"
#include "host/results/provenance_text.h"

namespace cimsweep {

CLI::App* setup_info(CLI::App& app, InfoOptions& o) {
  CLI::App* command =
      app.add_subcommand("info", "print a model's architecture, parameters and crossbar usage");
  command->add_option("model", o.model, "model file (.safetensors)")->required();
  command->add_option("--format", o.format,
                      "text (readable lines, default) or json (the metadata as stored)");
  return command;
}

int run_info(const InfoOptions& options) {
  const std::string& path = options.model;
  const std::string& format = options.format;
  if (format != "text" && format != "json")
    throw UserError("unknown --format '" + format + "': use text or json");
  const LoadedModel model = load_model(path);
  std::string backbone_line;
  if (is_blockdrop_policy(model)) {
    // A policy's network answers with the backbone's blocks, not classes: say whose, and stop
    // here when that backbone is missing or changed, as eval would.
    std::shared_ptr<const BlockDropModel> blockdrop;
    load_blockdrop(load_model(path), false, blockdrop);
    backbone_line = "blockdrop:   policy for backbone " + blockdrop->backbone_path + " (its " +
                    std::to_string(blockdrop->blocks()) +
                    " outputs are the backbone's residual blocks, not classes)\n";
  }
  if (format == "json") {  // the metadata as stored: every value the raw JSON string
    std::cout << nlohmann::json(model.metadata).dump(2) << "\n";
    return 0;
  }
  const ResNet& net = *model.network;
  std::cout << "model:       " << path << "\n";
  std::cout << "network:     " << net.arch().describe() << "\n" << backbone_line;
  std::cout << "parameters:  " << net.parameter_count() << "\n";
  const auto macs = net.layer_macs();
  int64_t total_macs = 0;
  for (int64_t m : macs) total_macs += m;
  std::cout << "MACs/image:  " << total_macs << " (CIM layers)\n";
  print_metadata_text(model.metadata, std::cout);
  // Crossbar usage under the default CIM model: sub-arrays of R rows, one column per output and
  // cell slice, plus a reference column per sub-array and slice.
  const CimConfig defaults;
  std::cout << "\nper-layer crossbar usage (default mapping '" << to_string(defaults.mapping)
            << "', R = " << defaults.subarray_rows << ", " << defaults.cells_per_weight()
            << " cells per weight):\n\n";
  std::cout << "| # | layer | kernel | stride | in → out | rows | sub-arrays | columns/sub-array | "
               "cells | a_max | MACs/image |\n| --- | --- | --- | --- | --- | --- | --- | --- | "
               "--- | --- | --- |\n";
  int64_t total_cells = 0;
  for (size_t i = 0; i < net.cim_layers().size(); ++i) {
    const CimLayerSpec& s = net.cim_layers()[i];
    const QuantisedLayer q = quantise_layer(s, int(i), defaults, false);
    const int columns = defaults.cells_per_weight() * (s.out_channels + 1);
    const int64_t cells = int64_t(q.subarrays()) * columns * defaults.subarray_rows;
    total_cells += cells;
    char line[512];
    std::snprintf(line, sizeof line,
                  "| %zu | %s | %d×%d | %d | %d → %d | %d | %d | %d | %lld | %.4g | %lld |\n", i,
                  s.name.c_str(), s.kernel_h, s.kernel_w, s.stride, s.in_channels, s.out_channels,
                  s.rows(), q.subarrays(), columns, (long long)cells, double(s.input_range),
                  (long long)macs[i]);
    std::cout << line;
  }
  std::cout << "\ncells in all sub-arrays (incl. unused rows and reference columns): "
            << total_cells << "\n";
  return 0;
}

}  // namespace cimsweep
