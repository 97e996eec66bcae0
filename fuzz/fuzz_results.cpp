// Results files (JSON Lines of trial records): the input is a results file, read as a table
// command does (read_results_file, then aggregation and every table format) and as --resume does
// (ResultsLog, which also truncates a torn last line); the whole input, when it is one JSON value,
// also goes straight to trial_from_json.
#include <cstddef>
#include <cstdint>

#include <nlohmann/json.hpp>

#include "fuzz/scratch_dir.h"
#include "common/errors.h"
#include "host/results/results.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string path = cimsweep::fuzz::write_scratch_file("results.jsonl", data, size);
  try {
    const auto rows = cimsweep::aggregate(cimsweep::read_results_file(path));
    for (const char* format : {"md", "csv", "json"}) (void)cimsweep::format_table(rows, format);
  } catch (const cimsweep::UserError&) {
  }
  try {
    const cimsweep::ResultsLog log(path, /*resume=*/true);
    for (const cimsweep::TrialRecord& record : log.existing()) (void)log.has(record);
  } catch (const cimsweep::UserError&) {
  }
  // trial_from_json copies "extra", which recurses as deep as the value nests: its callers parse
  // with a nesting limit (the results reader stops at 64 levels), and so does this one.
  bool too_deep = false;
  const nlohmann::json value = nlohmann::json::parse(
      data, data + size,
      [&](int depth, nlohmann::json::parse_event_t, nlohmann::json&) {
        too_deep = too_deep || depth > 64;
        return !too_deep;
      },
      false);
  try {
    if (!too_deep && !value.is_discarded()) (void)cimsweep::trial_from_json(value);
  } catch (const cimsweep::UserError&) {
  }
  return 0;
}
