#include "host/cli/plot.h"

#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "common/errors.h"
#include "host/policies/exit_policy.h"
#include "host/results/results.h"
#include "host/run_command.h"

#ifndef CIMSWEEP_TOOLS_DIR
#define CIMSWEEP_TOOLS_DIR "tools"
#endif

namespace cimsweep {
namespace fs = std::filesystem;
namespace {

using nlohmann::ordered_json;

// Every figure format matplotlib writes that a paper or a web page takes, by extension, with the
// bytes an existing file of that kind starts with (what may be replaced without asking).
const std::map<std::string, std::string>& figure_formats() {
  static const std::map<std::string, std::string> formats = {
      {".png", "\x89PNG"}, {".pdf", "%PDF"}, {".svg", "<?xml"}};
  return formats;
}

std::string lowercase_extension(const std::string& path) {
  std::string ext = fs::path(path).extension().string();
  std::transform(ext.begin(), ext.end(), ext.begin(), [](unsigned char c) { return std::tolower(c); });
  return ext;
}

// The output may replace an existing figure of its own format, never anything else (an input,
// a results file, a directory, a file the user did not mean).
void check_output(const PlotOptions& o) {
  if (o.output.empty()) throw UserError("no output figure: give -o FIG.png (or .svg, .pdf)");
  const std::string ext = lowercase_extension(o.output);
  const auto format = figure_formats().find(ext);
  if (format == figure_formats().end())
    throw UserError("output '" + o.output + "' is not .png, .svg or .pdf: name the figure e.g. " +
                    "-o sweep.png");
  const fs::path parent = fs::path(o.output).parent_path();
  if (!parent.empty() && !fs::is_directory(parent))
    throw UserError("the directory of output '" + o.output + "' does not exist: create " +
                    parent.string() + " first");
  std::error_code error;
  if (!fs::exists(o.output, error)) return;
  if (fs::is_directory(o.output))
    throw UserError("output '" + o.output + "' is a directory: name the figure file, e.g. " +
                    (fs::path(o.output) / "sweep.png").string());
  for (const std::string& input : o.inputs)
    if (fs::exists(input) && fs::equivalent(input, o.output, error))
      throw UserError("output '" + o.output + "' is also an input: choose another -o");
  std::ifstream existing(o.output, std::ios::binary);
  std::string start(format->second.size(), '\0');
  existing.read(start.data(), std::streamsize(start.size()));
  if (!existing || start != format->second)
    throw UserError("output '" + o.output + "' exists and is not a " + ext.substr(1) +
                    " figure: not replacing it; choose another -o or remove it yourself");
}

std::string script_path() {
  const char* dir = std::getenv("CIMSWEEP_TOOLS_DIR");
  return (fs::path(dir && *dir ? dir : CIMSWEEP_TOOLS_DIR) / "plot_results.py").string();
}

std::string python_path() {
  const char* python = std::getenv("CIMSWEEP_PYTHON");
  return python && *python ? python : "/usr/bin/python3";
}

// "a, b and c" of the distinct values, in order of appearance.
std::string joined(const std::vector<std::string>& values) {
  std::string text;
  for (size_t i = 0; i < values.size(); ++i)
    text += (i == 0 ? "" : i + 1 == values.size() ? " and " : ", ") + values[i];
  return text;
}

// One line saying how the figure's numbers were made: data, chips, CIM settings, backend.
std::string caption(const std::vector<TrialRecord>& records, const std::vector<TableRow>& rows) {
  std::vector<std::string> data, backends, cims;
  std::set<uint64_t> images;
  auto add = [](std::vector<std::string>& list, const std::string& value) {
    if (!value.empty() && std::find(list.begin(), list.end(), value) == list.end())
      list.push_back(value);
  };
  for (const TrialRecord& r : records) {
    if (r.trial < 0) continue;
    images.insert(r.images);
    if (!r.extra.is_object()) continue;
    if (r.extra.contains("backend") && r.extra["backend"].is_string())
      add(backends, r.extra["backend"].get<std::string>());
    if (r.extra.contains("data") && r.extra["data"].is_string())
      add(data, r.extra["data"].get<std::string>());
    if (r.extra.contains("cim") && r.extra["cim"].is_string())
      add(cims, r.extra["cim"].get<std::string>());
  }
  size_t fewest = SIZE_MAX, most = 0;
  for (const TableRow& row : rows) {
    fewest = std::min(fewest, row.accuracy.n);
    most = std::max(most, row.accuracy.n);
  }
  std::vector<std::string> parts;
  if (!data.empty()) parts.push_back(joined(data));
  if (!images.empty()) {
    std::vector<std::string> counts;
    for (uint64_t n : images) counts.push_back(std::to_string(n));
    parts.push_back(joined(counts) + " images per chip");
  }
  if (!rows.empty())
    parts.push_back((fewest == most ? std::to_string(most)
                                    : std::to_string(fewest) + "–" + std::to_string(most)) +
                    " chips per σ; band: 95 % interval of the mean (Student t, in [0, 100])");
  if (!cims.empty()) parts.push_back(joined(cims));
  if (!backends.empty()) parts.push_back("backend " + joined(backends));
  std::string text;
  for (const std::string& part : parts) text += (text.empty() ? "" : "; ") + part;
  return text;
}

}  // namespace

std::string plot_document(const std::vector<std::string>& inputs, const PlotOptions& options) {
  // A figure may compare runs of other settings on purpose; its caption lists them all.
  const std::vector<TrialRecord> records = merge_results(inputs, /*allow_mixed_settings=*/true);
  std::vector<TableRow> rows = aggregate(records);
  if (rows.empty())
    throw UserError("no chips (trials ≥ 0) in " + joined(inputs) +
                    ": nothing to plot; run a sweep with --results first");
  if (options.ci_width > 0) mark_stopping_rule(rows, options.ci_width, options.max_trials);
  ordered_json document;
  document["rows"] = ordered_json::parse(format_table(rows, "json"));
  const std::string frontier = format_frontier(records, "json");
  document["frontier"] = frontier.empty() ? ordered_json::array() : ordered_json::parse(frontier);
  document["caption"] = caption(records, rows);
  document["title"] = options.title;
  return document.dump(1, ' ', false, nlohmann::json::error_handler_t::replace) + "\n";
}

CLI::App* setup_plot(CLI::App& app, PlotOptions& o) {
  CLI::App* cmd = app.add_subcommand(
      "plot", "draw accuracy vs σ of results files (bands, clean accuracy, exits, frontier)");
  cmd->add_option("results", o.inputs, "results files (JSON Lines) of one or more sweeps")
      ->required();
  cmd->add_option("-o,--output", o.output, "figure file: .png, .svg or .pdf (written atomically)")
      ->required();
  cmd->add_option("--width", o.width, "figure width in pixels at 100 dpi (default 1200)");
  cmd->add_option("--height", o.height, "figure height in pixels at 100 dpi (default 800)");
  cmd->add_option("--title", o.title, "title above the plot (default: none)");
  cmd->add_option("--ci-width", o.ci_width,
                  "the sweep ran with --ci-width W: mark the cells that stopped at the cap");
  cmd->add_option("--max-trials", o.max_trials, "with --ci-width: the sweep's --max-trials");
  return cmd;
}

int run_plot(const PlotOptions& o) {
  for (const std::string& input : o.inputs)
    if (!fs::is_regular_file(input))
      throw UserError("results file '" + input + "' does not exist" +
                      (fs::is_directory(input) ? " (it is a directory)" : "") +
                      ": give the --results file of a sweep");
  check_output(o);
  if (o.width < 200 || o.width > 10000 || o.height < 200 || o.height > 10000)
    throw UserError("figure size " + std::to_string(o.width) + "×" + std::to_string(o.height) +
                    " is out of range: --width and --height take 200 … 10000 pixels");
  if (o.ci_width < 0) throw UserError("--ci-width must be > 0 (the sweep's half-width target)");
  const std::string script = script_path(), python = python_path();
  if (!fs::is_regular_file(script))
    throw UserError("the plotting script " + script +
                    " is missing: set CIMSWEEP_TOOLS_DIR to the tools/ folder of cimsweep's "
                    "sources");
  if (!is_runnable(python))
    throw UserError(python + " is not there: install python3-matplotlib (Debian), or set "
                             "CIMSWEEP_PYTHON to a Python that has matplotlib");
  const std::string document = plot_document(o.inputs, o);

  // The document travels in a private temporary file, removed whatever happens.
  std::string temp = (fs::temp_directory_path() / "cimsweep-plot-XXXXXX").string();
  const int fd = mkstemp(temp.data());
  if (fd < 0) throw UserError("cannot create a temporary file in " +
                              fs::temp_directory_path().string() + ": set TMPDIR to a writable one");
  const bool written = ::write(fd, document.data(), document.size()) == ssize_t(document.size());
  ::close(fd);
  CommandOutput result;
  if (written)
    result = run_command({python, script, temp, o.output, std::to_string(o.width),
                          std::to_string(o.height)});
  ::unlink(temp.c_str());
  if (!written) throw UserError("cannot write a temporary file in " +
                                fs::temp_directory_path().string() + ": is the disk full?");
  if (result.exit_code != 0) {
    // The script says what is wrong in one line; anything longer is a crash worth reporting whole.
    std::string message = result.err;
    while (!message.empty() && message.back() == '\n') message.pop_back();
    if (message.find('\n') != std::string::npos || message.empty())
      throw std::runtime_error("plotting script " + script + " failed (exit " +
                               std::to_string(result.exit_code) + "): " + message);
    throw UserError(message);
  }
  std::fprintf(stderr, "cimsweep: wrote %s\n", o.output.c_str());
  return 0;
}

}  // namespace cimsweep
