// What a sweep runs: models × σ values × trials on one data set under one CIM configuration.
// Read from a TOML file (sweeps/*.toml) or assembled from command-line options.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "common/cim_config.h"

namespace cimsweep {

struct SweepModel {
  std::string label;  // how tables name it; defaults to the file name without extension
  std::string path;
};

struct SweepPlan {
  std::string name;
  std::vector<SweepModel> models;
  std::vector<double> sigmas;
  int trials = 1;
  int first_trial = 0;  // trials first_trial … first_trial + trials − 1
  std::string data_path;
  std::string split = "test";
  size_t limit = 0;             // class-balanced subset; 0 = all images
  bool clean_reference = true;  // also run σ = 0 with an ideal ADC once per model
  CimConfig cim;
  // Stopping rule (--ci-width): when ci_width > 0, `trials` is ignored and every (model, σ) cell
  // runs chips first_trial, first_trial + 1, … in rounds until its 95 % interval half-width is at
  // most ci_width points, with at least min_trials and at most max_trials chips.
  double ci_width = 0;
  int min_trials = 10, max_trials = 5000;
  bool adaptive() const { return ci_width > 0; }
  // How many chips a cell can use at most: trials, or max_trials with the stopping rule.
  int64_t trial_count_cap() const { return adaptive() ? max_trials : trials; }
};

// Reads a sweep file. Relative model and data paths are relative to the file's directory.
// Keys: name, data, split, limit, trials, first_trial, ci_width, min_trials, max_trials, sigmas,
// clean, [cim] (CIM options by
// their command-line names), [[models]] with path and optional label. UserError on anything else.
SweepPlan read_sweep_spec(const std::string& path);

// The plan as a sweep file (TOML) that read_sweep_spec reads back to the same plan: every key and
// every CIM option written out, paths absolute, so that the file runs the same from anywhere
// (what --print-config prints).
std::string sweep_spec_text(const SweepPlan& plan);

// Checks a plan is runnable (models, σ in [0, kMaxSigma], trials ≥ 1 and below the calibration
// chips' 2^30, CIM parameters): UserError otherwise.
void validate_plan(const SweepPlan& plan);

// σ above this is refused: the conductances would be noise, and large values overflow.
constexpr double kMaxSigma = 100;
// What is wrong with a σ (negative, NaN, infinite, above kMaxSigma), or "" when it is fine.
std::string sigma_problem(double sigma);
// "0,0.05,0.1" → {0, 0.05, 0.1}; UserError naming `option` on anything else.
std::vector<double> parse_sigma_list(const std::string& text, const std::string& option);
// Removes repeated σ values (keeping the first, with a note: each would run and be written
// again) and notes σ above 1.
void tidy_sigmas(SweepPlan& plan);

std::string default_label(const std::string& model_path);

}  // namespace cimsweep
