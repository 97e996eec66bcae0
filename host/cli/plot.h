// `cimsweep plot RESULTS.jsonl… -o FIG.{png,svg,pdf}`: the accuracy-vs-σ figure of results files,
// drawn by tools/plot_results.py (matplotlib) from the table cimsweep itself aggregates.
#pragma once
#include <string>
#include <vector>

namespace CLI {
class App;
}

namespace cimsweep {

struct PlotOptions {
  std::vector<std::string> inputs;  // results files (JSON Lines), e.g. the shards of a sweep
  std::string output;               // .png, .svg or .pdf
  int width = 1200, height = 800;   // pixels (at 100 dpi: inches × 100 for svg/pdf)
  std::string title;                // empty: the model labels
  double ci_width = 0;              // the sweep's --ci-width, to mark capped cells (0: none)
  int max_trials = 5000;
};

CLI::App* setup_plot(CLI::App& app, PlotOptions& options);

// Checks everything (inputs, output path, size, the plotting script and its Python) before
// drawing; then writes the figure atomically. Returns the exit code; UserError on bad input.
int run_plot(const PlotOptions& options);

// The document the script draws: {"rows": [json table rows], "frontier": [...], "caption": "…"}.
std::string plot_document(const std::vector<std::string>& inputs, const PlotOptions& options);

}  // namespace cimsweep
