// What a sweep runs: models × σ values × trials on one data set under one CIM configuration.
// Read from a TOML file (sweeps/*.toml) or assembled from command-line options.
#pragma once
#include <cstddef>
#include <string>
#include <utility>
#include <vector>

#include "host/cim_config.h"

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
};

// Reads a sweep file. Relative model and data paths are relative to the file's directory.
// Keys: name, data, split, limit, trials, first_trial, sigmas, clean, [cim] (CIM options by
// their command-line names), [[models]] with path and optional label. UserError on anything else.
SweepPlan read_sweep_spec(const std::string& path);

// Checks a plan is runnable (models, σ ≥ 0, trials ≥ 1, CIM parameters): UserError otherwise.
void validate_plan(const SweepPlan& plan);

std::string default_label(const std::string& model_path);

}  // namespace cimsweep
