// `cimsweep merge FILES…`: joins the results files of a sharded sweep and prints the table.
#pragma once
#include <string>
#include <vector>

#include "host/cli/run_options.h"

namespace cimsweep {

struct MergeOptions {
  std::vector<std::string> files;  // results files (JSON Lines) of the shards
  // The table's options (--results, --format, --output, --force, --wait-for-lock, --ci-width,
  // --max-trials), as eval and sweep write theirs.
  RunOptions table;
};

CLI::App* setup_merge(CLI::App& app, MergeOptions& options);
// Returns the exit code; UserError on bad input, before any file is written.
int run_merge(const MergeOptions& options);

}  // namespace cimsweep
