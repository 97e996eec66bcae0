#include "host/sweep/sweep_spec.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <utility>
#include <filesystem>
#include <set>
#include <sstream>

#include <nlohmann/json.hpp>

#include <toml++/toml.h>

#include "common/errors.h"
#include "host/policies/exit_policy.h"
#include "host/results/results.h"

namespace cimsweep {
namespace fs = std::filesystem;

std::string default_label(const std::string& model_path) {
  return fs::path(model_path).stem().string();
}

namespace {

std::string resolve(const fs::path& base, const std::string& p) {
  if (p.empty() || fs::path(p).is_absolute()) return p;
  return (base / p).lexically_normal().string();
}

std::string value_text(const toml::node& node, const std::string& where) {
  if (auto s = node.value<std::string>()) return *s;
  if (node.is_integer()) return std::to_string(*node.value<int64_t>());
  if (node.is_floating_point()) {
    const double v = *node.value<double>();
    if (std::isinf(v)) return "inf";
    char buf[64];
    std::snprintf(buf, sizeof buf, "%.17g", v);
    return buf;
  }
  if (auto b = node.value<bool>()) return *b ? "true" : "false";
  if (const toml::array* a = node.as_array()) {
    std::string joined;
    for (const auto& item : *a) joined += (joined.empty() ? "" : ",") + value_text(item, where);
    return joined;
  }
  throw UserError(where + " has a value of an unsupported type");
}

}  // namespace

SweepPlan read_sweep_spec(const std::string& path) {
  if (!fs::exists(path))
    throw UserError("sweep file '" + path +
                    "' does not exist: pass --spec with a file from sweeps/");
  toml::table table;
  try {
    table = toml::parse_file(path);
  } catch (const toml::parse_error& e) {
    throw UserError("sweep file '" + path + "' is not valid TOML (line " +
                    std::to_string(e.source().begin.line) + ": " + std::string(e.description()) +
                    ")");
  }
  const fs::path base = fs::path(path).parent_path();
  SweepPlan plan;
  plan.name = default_label(path);
  static const std::set<std::string> known = {
      "name",       "data",       "split",  "limit", "trials", "first_trial", "ci_width",
      "min_trials", "max_trials", "sigmas", "clean", "cim",    "models"};
  for (const auto& [key, node] : table) {
    const std::string k(key.str());
    if (!known.count(k))
      throw UserError("sweep file '" + path + "': unknown key '" + k +
                      "' (known: name, data, split, limit, trials, first_trial, ci_width, "
                      "min_trials, max_trials, sigmas, clean, [cim], [[models]])");
  }
  auto fail = [&](const std::string& m) -> void {
    throw UserError("sweep file '" + path + "': " + m);
  };
  if (auto v = table["name"].value<std::string>()) plan.name = *v;
  if (auto v = table["data"].value<std::string>()) plan.data_path = resolve(base, *v);
  if (auto v = table["split"].value<std::string>()) plan.split = *v;
  if (table.contains("limit")) {
    auto v = table["limit"].value<int64_t>();
    if (!v || *v < 0) fail("limit must be a non-negative integer");
    plan.limit = size_t(*v);
  }
  if (table.contains("trials")) {
    auto v = table["trials"].value<int64_t>();
    if (!v || *v != int(*v)) fail("trials must be an integer (at most 2147483647)");
    plan.trials = int(*v);
  }
  if (table.contains("first_trial")) {
    auto v = table["first_trial"].value<int64_t>();
    if (!v || *v != int(*v)) fail("first_trial must be an integer (at most 2147483647)");
    plan.first_trial = int(*v);
  }
  if (table.contains("ci_width")) {
    auto v = table["ci_width"].value<double>();
    if (!v || !(*v > 0) || !std::isfinite(*v))
      fail("ci_width must be a number of points > 0, e.g. 1.0");
    plan.ci_width = *v;
  }
  for (const auto& [key, target] : {std::pair<const char*, int*>{"min_trials", &plan.min_trials},
                                    std::pair<const char*, int*>{"max_trials", &plan.max_trials}}) {
    if (!table.contains(key)) continue;
    auto v = table[key].value<int64_t>();
    if (!v || *v != int(*v)) fail(std::string(key) + " must be an integer (at most 2147483647)");
    *target = int(*v);
  }
  if (table.contains("clean")) {
    auto v = table["clean"].value<bool>();
    if (!v) fail("clean must be true or false");
    plan.clean_reference = *v;
  }
  if (table.contains("sigmas")) {
    const toml::array* sigmas = table["sigmas"].as_array();
    if (!sigmas) fail("sigmas must be an array of numbers, e.g. [0, 0.05, 0.1]");
    for (const auto& s : *sigmas) {
      auto v = s.value<double>();
      if (!v) fail("sigmas must hold numbers only");
      const std::string problem = sigma_problem(*v);
      if (!problem.empty()) fail("sigmas: " + problem);
      plan.sigmas.push_back(*v);
    }
  }
  if (table.contains("cim")) {
    const toml::table* cim = table["cim"].as_table();
    if (!cim) fail("[cim] must be a table of CIM options");
    for (const auto& [key, node] : *cim) {
      const std::string name(key.str());
      try {
        set_cim_option(plan.cim, name, value_text(node, "[cim] " + name));
      } catch (const UserError& e) {
        fail(std::string("[cim]: ") + e.what());
      }
    }
  }
  if (table.contains("models")) {
    const toml::array* models = table["models"].as_array();
    if (!models) fail("models must be an array of tables: [[models]] with path = \"…\"");
    for (const auto& m : *models) {
      const toml::table* entry = m.as_table();
      if (!entry || !(*entry)["path"].value<std::string>()) fail("every [[models]] needs a path");
      SweepModel model;
      model.path = resolve(base, *(*entry)["path"].value<std::string>());
      model.label = (*entry)["label"].value_or(default_label(model.path));
      plan.models.push_back(model);
    }
  }
  return plan;
}

std::string sweep_spec_text(const SweepPlan& plan) {
  auto absolute = [](const std::string& p) {
    return p.empty() ? p : fs::absolute(p).lexically_normal().string();
  };
  toml::table table;
  table.insert("name", plan.name);
  if (!plan.data_path.empty()) table.insert("data", absolute(plan.data_path));
  table.insert("split", plan.split);
  table.insert("limit", int64_t(plan.limit));
  table.insert("first_trial", int64_t(plan.first_trial));
  if (plan.adaptive()) {
    table.insert("ci_width", plan.ci_width);
    table.insert("min_trials", int64_t(plan.min_trials));
    table.insert("max_trials", int64_t(plan.max_trials));
  } else {
    table.insert("trials", int64_t(plan.trials));
  }
  toml::array sigmas;
  for (double sigma : plan.sigmas) sigmas.push_back(sigma);
  table.insert("sigmas", sigmas);
  table.insert("clean", plan.clean_reference);
  toml::table cim;
  for (const auto& option : cim_option_values(plan.cim)) {
    const std::string& name = option.first;
    const std::string& value = option.second;
    const bool flag = std::any_of(cim_options().begin(), cim_options().end(),
                                  [&](const CimOption& o) { return o.flag && o.name == name; });
    char* end = nullptr;
    const long long integer = std::strtoll(value.c_str(), &end, 10);
    if (flag)
      cim.insert(name, value == "true");
    else if (!value.empty() && *end == '\0')
      cim.insert(name, int64_t(integer));
    else if (name == "onoff" && value != "inf")
      cim.insert(name, std::strtod(value.c_str(), nullptr));
    else if (!value.empty())
      cim.insert(name, value);
  }
  table.insert("cim", cim);
  toml::array models;
  for (const SweepModel& m : plan.models)
    models.push_back(toml::table{{"path", absolute(m.path)}, {"label", m.label}});
  table.insert("models", models);
  std::ostringstream text;
  text << "# cimsweep sweep file: the run as planned (--print-config); run it with --spec FILE\n"
       << table << "\n";
  return text.str();
}

std::string sigma_problem(double sigma) {
  if (std::isfinite(sigma) && sigma >= 0 && sigma <= kMaxSigma) return "";
  const std::string shown = std::isnan(sigma) ? "nan" : nlohmann::json(sigma).dump();
  if (std::isfinite(sigma) && sigma > kMaxSigma)
    return "σ = " + shown + " is beyond " + std::to_string(int(kMaxSigma)) +
           " (a cell's conductance varies by σ × 100 %, so every chip is noise): use σ from 0 to " +
           "about 1";
  return "σ = " + shown + " is impossible: σ must be a finite number ≥ 0";
}

std::vector<double> parse_sigma_list(const std::string& text, const std::string& option) {
  std::vector<double> sigmas;
  std::stringstream ss(text);
  std::string item;
  while (std::getline(ss, item, ',')) {
    char* end = nullptr;
    const double v = std::strtod(item.c_str(), &end);
    if (item.empty() || *end != '\0')
      throw UserError(option + " '" + text + "' has a value that is not a number ('" + item +
                      "'): use e.g. --sigmas 0,0.05,0.1");
    sigmas.push_back(v);
  }
  if (sigmas.empty()) throw UserError(option + " is empty: use e.g. --sigmas 0,0.05,0.1");
  return sigmas;
}

void tidy_sigmas(SweepPlan& plan) {
  std::vector<double> unique;
  for (double sigma : plan.sigmas) {
    const auto copies = std::count(plan.sigmas.begin(), plan.sigmas.end(), sigma);
    if (std::find(unique.begin(), unique.end(), sigma) != unique.end()) continue;
    unique.push_back(sigma);
    if (copies > 1)
      std::fprintf(stderr, "cimsweep: note: σ = %s is listed %d times; it runs once\n",
                   nlohmann::json(sigma).dump().c_str(), int(copies));
    if (sigma > 1 && sigma <= kMaxSigma)
      std::fprintf(stderr,
                   "cimsweep: note: σ = %s is above 1: conductances vary by more than their own "
                   "value, far beyond any device studied\n",
                   nlohmann::json(sigma).dump().c_str());
  }
  plan.sigmas = std::move(unique);
}

void validate_plan(const SweepPlan& plan) {
  if (plan.models.empty())
    throw UserError("no model to run: give a model file (or [[models]] in the sweep file)");
  std::set<std::string> labels;
  for (const auto& m : plan.models)
    if (!labels.insert(m.label).second)
      throw UserError("two models share the label '" + m.label + "': give each a distinct label");
  if (plan.sigmas.empty())
    throw UserError("no σ to run: give --sigma or --sigmas (e.g. 0,0.05,0.1)");
  for (double s : plan.sigmas) {
    const std::string problem = sigma_problem(s);
    if (!problem.empty()) throw UserError(problem);
  }
  if (plan.trials < 1) throw UserError("--trials must be at least 1");
  if (plan.first_trial < 0) throw UserError("--first-trial must be ≥ 0");
  if (plan.ci_width < 0 || !std::isfinite(plan.ci_width))
    throw UserError("--ci-width must be a half-width in points > 0, e.g. --ci-width 1");
  if (plan.adaptive()) {
    if (plan.min_trials < int(kMinIntervalTrials))
      throw UserError("--min-trials must be at least " + std::to_string(kMinIntervalTrials) +
                      ": fewer chips give no interval to stop on");
    if (plan.max_trials < plan.min_trials)
      throw UserError("--max-trials (" + std::to_string(plan.max_trials) +
                      ") must be at least --min-trials (" + std::to_string(plan.min_trials) + ")");
  }
  // 64-bit sum: first_trial + trials overflows an int near 2^31 (and used to wrap silently).
  const int64_t end = int64_t(plan.first_trial) + plan.trial_count_cap();
  if (end > int64_t(kCalibrationFirstTrial))
    throw UserError("--first-trial " + std::to_string(plan.first_trial) + " with " +
                    (plan.adaptive() ? "--max-trials " : "--trials ") +
                    std::to_string(plan.trial_count_cap()) + " reaches trial " +
                    std::to_string(end - 1) + ", but trials stop below 2^30 = " +
                    std::to_string(kCalibrationFirstTrial) +
                    " (where the calibration chips begin): lower --first-trial or the trials");
  if (plan.split != "test" && plan.split != "train")
    throw UserError("unknown --split '" + plan.split + "': use test or train");
  plan.cim.validate();
}

}  // namespace cimsweep
