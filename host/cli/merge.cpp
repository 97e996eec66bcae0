#include "host/cli/merge.h"

#include <algorithm>
#include <cmath>
#include <optional>

#include <CLI/CLI.hpp>

#include "common/errors.h"

namespace cimsweep {

CLI::App* setup_merge(CLI::App& app, MergeOptions& o) {
  CLI::App* command = app.add_subcommand(
      "merge", "join the results files of a sharded sweep and print the accuracy table");
  command->add_option("files", o.files, "results files (JSON Lines) of the shards")->required();
  command->add_option("--results", o.table.results,
                      "write the merged results here (atomically; an existing file is merged "
                      "too)");
  command->add_option("--format", o.table.format, "table format: md, csv or json (default md)");
  command->add_option("--output", o.table.output,
                      "write the table to this file (atomically; a device or pipe is written "
                      "straight) instead of stdout");
  command->add_flag("--force", o.table.force,
                    "merge models run on different data or CIM settings into one table anyway");
  command->add_flag("--wait-for-lock", o.table.wait_for_lock,
                    "a sweep is writing the --results file: wait for it instead of an error");
  command->add_option("--ci-width", o.table.ci_width,
                      "the shards ran with --ci-width W: mark the cells that stopped at the cap");
  command->add_option("--max-trials", o.table.max_trials,
                      "with --ci-width: the shards' --max-trials (default 5000)");
  return command;
}

int run_merge(const MergeOptions& options) {
  const RunOptions& o = options.table;
  std::vector<std::string> inputs = options.files;
  if (o.format != "md" && o.format != "csv" && o.format != "json")
    throw UserError("unknown --format '" + o.format + "': use md, csv or json");
  if (!std::isnan(o.ci_width) && !(o.ci_width > 0))
    throw UserError("--ci-width must be a half-width in points > 0, e.g. --ci-width 1");
  if (o.max_trials != RunOptions::kNotGiven && std::isnan(o.ci_width))
    throw UserError("--max-trials marks the cells of a --ci-width sweep: give --ci-width W too");
  std::vector<std::pair<std::string, std::string>> named_inputs;
  for (const std::string& input : inputs) named_inputs.emplace_back(input, "the merge input");
  const OutputPath output = prepare_output(o, named_inputs);
  OutputPath results;
  std::optional<ResultsFileLock> lock;
  if (!o.results.empty()) {
    results = OutputPath(o.results, "--results");
    // Not replaced while a sweep appends to it.
    lock.emplace(results.target(), o.wait_for_lock);
    // An existing merged file joins the inputs, so merging again (or with new shards) keeps it;
    // "among the inputs" by identity, so another spelling of it is not read twice.
    const FileIdentity merged = results.identity();
    const bool listed = std::any_of(inputs.begin(), inputs.end(), [&](const std::string& input) {
      return file_identity(input) == merged;
    });
    if (merged.new_name.empty() && merged.known && !listed) inputs.insert(inputs.begin(), o.results);
  }
  const std::vector<TrialRecord> records = merge_results(inputs, o.force);
  if (!results.empty()) write_results_file(results, records);
  const SweepPlan defaults;
  emit_table(records, o, output, std::isnan(o.ci_width) ? 0 : o.ci_width,
             o.max_trials != RunOptions::kNotGiven ? o.max_trials : defaults.max_trials);
  return 0;
}

}  // namespace cimsweep
