#include "host/policies/exit_policy.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <set>
#include <sstream>
#include <stdexcept>
#include <unordered_map>
#include <unordered_set>

#include "common/errors.h"
#include "host/splitmix64.h"

namespace cimsweep {
namespace {

using nlohmann::json;

std::string number_text(double value) {
  char buffer[32];
  std::snprintf(buffer, sizeof buffer, "%g", value);
  return buffer;
}

const char* const kPolicyUsage =
    "use fixed:E, entropy:T1,T2,…, best-static, sigma-aware or sigma-aware-learned";

size_t total_images(const std::vector<ExitObservations>& chips) {
  size_t total = 0;
  for (const ExitObservations& chip : chips) total += chip.images();
  return total;
}

[[noreturn]] void budget_too_small(double budget, int64_t cheapest) {
  throw UserError("--mac-budget " + number_text(budget) +
                  " MACs/image is below what any choice of exits costs (" +
                  std::to_string(cheapest) + "): raise it to at least " + std::to_string(cheapest));
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Statistics and costs.

ExitStats exit_stats(const float* logits, int classes) {
  ExitStats stats;
  stats.predicted = int(std::max_element(logits, logits + classes) - logits);
  const double top = logits[stats.predicted];
  // With m the largest logit, p_i = e^(l_i − m) / s and −Σ p ln p = ln s − Σ p_i (l_i − m): no
  // exponent overflows and no 0·ln 0 appears.
  double sum = 0;
  for (int c = 0; c < classes; ++c) sum += std::exp(double(logits[c]) - top);
  double weighted = 0, second = 0;
  for (int c = 0; c < classes; ++c) {
    const double p = std::exp(double(logits[c]) - top) / sum;
    weighted += p * (double(logits[c]) - top);
    if (c != stats.predicted) second = std::max(second, p);
  }
  stats.max_prob = 1.0 / sum;
  stats.entropy = std::max(0.0, std::log(sum) - weighted);
  stats.margin = stats.max_prob - second;
  return stats;
}

void ExitObservations::add_batch(const std::vector<std::vector<float>>& logits, int classes,
                                 const int32_t* batch_labels, size_t count) {
  exits = int(logits.size());
  stats.reserve(stats.size() + count * logits.size());
  for (size_t i = 0; i < count; ++i) {
    for (const std::vector<float>& exit_logits : logits)
      stats.push_back(exit_stats(exit_logits.data() + i * size_t(classes), classes));
    labels.push_back(batch_labels[i]);
  }
}

int64_t ExitMacs::cascade(int exit) const {
  int64_t heads = 0;
  for (int e = 0; e <= exit; ++e) heads += head[size_t(e)];
  return backbone[size_t(exit)] + heads;
}

ExitMacs exit_macs(const ResNet& net) {
  std::vector<int> stages = net.arch().exits;  // stages with an early exit after them
  std::sort(stages.begin(), stages.end());
  const int exits = net.arch().num_exits();
  ExitMacs macs;
  macs.backbone.assign(size_t(exits), 0);
  macs.head.assign(size_t(exits), 0);
  // The exit whose head sits after `stage`; the final head counts as after stage 3.
  auto exit_after = [&](int stage) {
    auto it = std::find(stages.begin(), stages.end(), stage);
    return it == stages.end() ? exits - 1 : int(it - stages.begin());
  };
  const std::vector<int64_t> layer_macs = net.layer_macs();
  for (size_t i = 0; i < layer_macs.size(); ++i) {
    const std::string& name = net.cim_layers()[i].name;
    if (name == "fc") {
      macs.head[size_t(exits - 1)] += layer_macs[i];
    } else if (name.rfind("exit", 0) == 0) {
      macs.head[size_t(exit_after(std::atoi(name.c_str() + 4)))] += layer_macs[i];
    } else {
      // The stem ("conv1", stage 0) and blocks "layerS.B.…" feed every exit after their stage.
      const int stage = name.rfind("layer", 0) == 0 ? std::atoi(name.c_str() + 5) : 0;
      for (int e = 0; e < exits; ++e) {
        const int exit_stage = e < int(stages.size()) ? stages[size_t(e)] : 3;
        if (stage <= exit_stage) macs.backbone[size_t(e)] += layer_macs[i];
      }
    }
  }
  return macs;
}

// ---------------------------------------------------------------------------------------------
// Policy names and options.

std::string ExitPolicySpec::text() const {
  switch (kind) {
    case ExitPolicyKind::kFixed:
      return "fixed:" + std::to_string(fixed_exit);
    case ExitPolicyKind::kEntropy: {
      std::string text = "entropy:";
      for (size_t i = 0; i < thresholds.size(); ++i)
        text += (i ? "," : "") + json(thresholds[i]).dump();
      return text;
    }
    case ExitPolicyKind::kBestStatic:
      return "best-static";
    case ExitPolicyKind::kSigmaAware:
      return "sigma-aware";
    case ExitPolicyKind::kSigmaAwareLearned:
      return "sigma-aware-learned";
  }
  return "?";
}

ExitPolicySpec parse_exit_policy(const std::string& text) {
  ExitPolicySpec spec;
  const size_t colon = text.find(':');
  const std::string name = text.substr(0, colon);
  const std::string argument = colon == std::string::npos ? "" : text.substr(colon + 1);
  if (name == "fixed") {
    if (argument.empty() || argument.size() > 3 ||
        argument.find_first_not_of("0123456789") != std::string::npos || std::stoi(argument) < 1)
      throw UserError("--exit-policy '" + text +
                      "': fixed needs an exit number 1 … E, e.g. fixed:2 (exit 1 is the earliest)");
    spec.kind = ExitPolicyKind::kFixed;
    spec.fixed_exit = std::stoi(argument);
    return spec;
  }
  if (name == "entropy") {
    spec.kind = ExitPolicyKind::kEntropy;
    std::stringstream items(argument);
    std::string item;
    while (std::getline(items, item, ',')) {
      char* end = nullptr;
      const double value = std::strtod(item.c_str(), &end);
      if (item.empty() || *end != '\0' || !std::isfinite(value))
        throw UserError("--exit-policy '" + text + "': threshold '" + item +
                        "' is not a number: use e.g. entropy:0.5,1.0 (nats, one per early exit)");
      if (value < 0)
        throw UserError("--exit-policy '" + text + "': threshold " + item +
                        " is negative, but an entropy is never below 0: use thresholds ≥ 0");
      spec.thresholds.push_back(value);
    }
    if (spec.thresholds.empty())
      throw UserError("--exit-policy '" + text +
                      "' has no thresholds: use e.g. entropy:0.5,1.0 (nats, one per early exit)");
    return spec;
  }
  const std::pair<const char*, ExitPolicyKind> calibrated[] = {
      {"best-static", ExitPolicyKind::kBestStatic},
      {"sigma-aware", ExitPolicyKind::kSigmaAware},
      {"sigma-aware-learned", ExitPolicyKind::kSigmaAwareLearned}};
  for (const auto& [known, kind] : calibrated)
    if (colon == std::string::npos && name == known) {
      spec.kind = kind;
      return spec;
    }
  throw UserError("unknown --exit-policy '" + text + "': " + kPolicyUsage);
}

void check_policy_fits(const ExitPolicySpec& spec, int exits, const std::string& model_path) {
  if (exits < 2)
    throw UserError("--exit-policy " + spec.text() + " needs a multi-exit model, but '" +
                    model_path +
                    "' has only its final exit: use a model with early exits (see cimsweep info)");
  if (spec.kind == ExitPolicyKind::kFixed && spec.fixed_exit > exits)
    throw UserError("--exit-policy " + spec.text() + ": model '" + model_path + "' has exits 1 … " +
                    std::to_string(exits) + ": choose one of them");
  if (spec.kind == ExitPolicyKind::kEntropy && int(spec.thresholds.size()) != exits - 1)
    throw UserError(
        "--exit-policy " + spec.text() + " gives " + std::to_string(spec.thresholds.size()) +
        " threshold(s), but model '" + model_path + "' has " + std::to_string(exits - 1) +
        " early exit(s): give one threshold per early exit (the last exit takes the rest)");
}

void ExitPolicyOptions::validate() const {
  std::unique_ptr<ExitPolicySpec> spec;
  if (!policy.empty()) spec = std::make_unique<ExitPolicySpec>(parse_exit_policy(policy));
  const bool calibrates = spec && spec->needs_calibration();
  if (calibrates && calibration_images == 0)
    throw UserError("--exit-policy " + policy +
                    " is calibrated on images held apart from the evaluation: give --calibration "
                    "N (e.g. --calibration 500)");
  if (!calibrates && calibration_images > 0)
    throw UserError(
        "--calibration is only used by the best-static, sigma-aware and "
        "sigma-aware-learned exit policies: drop it or choose one of them");
  if (calibration_trials < 1)
    throw UserError("--calibration-trials must be at least 1 (calibration chips per σ)");
  if (!(mac_budget >= 0) || !std::isfinite(mac_budget))
    throw UserError("--mac-budget must be a number of MACs per image > 0");
  if (mac_budget > 0 && !(spec && (spec->kind == ExitPolicyKind::kBestStatic ||
                                   spec->kind == ExitPolicyKind::kSigmaAware)))
    throw UserError(
        "--mac-budget constrains only the best-static and sigma-aware exit policies: "
        "drop it or choose one of them");
  if (entropy_grid < 0 || entropy_grid > 1000)
    throw UserError("--entropy-grid must be between 1 and 1000 (thresholds in the grid)");
}

// ---------------------------------------------------------------------------------------------
// Calibration split.

CalibrationSplit split_for_calibration(const Dataset& data, size_t count, uint64_t seed) {
  if (count == 0 || count >= data.size())
    throw UserError("--calibration " + std::to_string(count) + " must hold back between 1 and " +
                    std::to_string(data.size() - std::min<size_t>(data.size(), 1)) + " of the " +
                    std::to_string(data.size()) +
                    " images, leaving some to evaluate: choose fewer calibration images");
  std::vector<std::vector<size_t>> by_class(size_t(std::max(data.num_classes, 0)));
  for (size_t i = 0; i < data.size(); ++i) {
    const int32_t label = data.labels[i];
    if (label < 0 || label >= data.num_classes)
      throw UserError("data set " + data.description + " has label " + std::to_string(label) +
                      " outside 0.." + std::to_string(data.num_classes - 1) +
                      "; check the data files");
    by_class[size_t(label)].push_back(i);
  }
  SplitMix64 rng{seed ^ 0x63616c6962726174ull};  // "calibrat": its own stream of the sweep seed
  for (std::vector<size_t>& members : by_class)
    for (size_t i = members.size(); i > 1; --i) std::swap(members[i - 1], members[rng.below(i)]);
  // Round r takes the r-th shuffled image of every class that still has one.
  std::vector<size_t> chosen;
  for (size_t round = 0; chosen.size() < count; ++round)
    for (const std::vector<size_t>& members : by_class) {
      if (round < members.size()) chosen.push_back(members[round]);
      if (chosen.size() == count) break;
    }
  std::sort(chosen.begin(), chosen.end());
  std::vector<char> held(data.size(), 0);
  for (size_t i : chosen) held[i] = 1;
  std::vector<size_t> rest;
  for (size_t i = 0; i < data.size(); ++i)
    if (!held[i]) rest.push_back(i);
  if (rest.size() + chosen.size() != data.size())
    throw std::logic_error("calibration split lost or repeated an image");

  const std::string how =
      std::to_string(count) + " calibration images (seed " + std::to_string(seed) + ")";
  CalibrationSplit split{CalibrationImages(),
                         select_images(data, rest, data.description + " without " + how), rest};
  split.calibration.data_ = select_images(data, chosen, data.description + ", " + how);
  split.calibration.source_indices_ = std::move(chosen);
  return split;
}

// ---------------------------------------------------------------------------------------------
// Choosing exits.

int entropy_exit(const ExitStats* per_exit, int exits, const std::vector<double>& thresholds) {
  for (int e = 0; e + 1 < exits; ++e)
    if (per_exit[e].entropy < thresholds[size_t(e)]) return e;
  return exits - 1;
}

int best_static_exit(const std::vector<ExitObservations>& chips, const ExitMacs& macs,
                     double mac_budget) {
  int best = -1;
  uint64_t best_correct = 0;
  for (int e = 0; e < macs.exits(); ++e) {
    if (mac_budget > 0 && double(macs.alone(e)) > mac_budget) continue;
    uint64_t correct = 0;
    for (const ExitObservations& chip : chips)
      for (size_t i = 0; i < chip.images(); ++i) correct += chip.correct(i, e);
    if (best < 0 || correct > best_correct) best = e, best_correct = correct;
  }
  if (best < 0) budget_too_small(mac_budget, macs.alone(0));
  return best;
}

std::vector<double> search_thresholds(const std::vector<ExitObservations>& chips,
                                      const ExitMacs& macs, double mac_budget) {
  const int exits = macs.exits(), early = exits - 1;
  const size_t total = total_images(chips);
  if (total == 0) throw std::logic_error("threshold search without calibration images");
  // A threshold between two neighbouring observed entropies sends exactly the images at or below
  // the lower one out, so the cuts between distinct values are every distinct choice there is:
  // all of them when there are few, else those at evenly spaced quantiles (fewer for many early
  // exits, so that the exhaustive search stays near 10^5 combinations).
  const int cuts = std::max(3, std::min(64, int(std::pow(1e5, 1.0 / early))));
  std::vector<std::vector<double>> candidates(static_cast<size_t>(early));
  for (int e = 0; e < early; ++e) {
    std::vector<double> entropies;
    for (const ExitObservations& chip : chips)
      for (size_t i = 0; i < chip.images(); ++i) entropies.push_back(chip.image(i)[e].entropy);
    std::sort(entropies.begin(), entropies.end());
    std::vector<double> distinct = entropies;
    distinct.erase(std::unique(distinct.begin(), distinct.end()), distinct.end());
    std::vector<double>& c = candidates[size_t(e)];
    c.push_back(0.0);                     // strict <: no image leaves here
    auto cut_below = [&](double value) {  // between `value` and the next smaller distinct one
      auto it = std::lower_bound(distinct.begin(), distinct.end(), value);
      if (it != distinct.begin()) c.push_back((*(it - 1) + *it) / 2);
    };
    if (int(distinct.size()) <= cuts + 1) {
      for (double value : distinct) cut_below(value);
    } else {
      for (int q = 1; q < cuts; ++q)
        cut_below(entropies[size_t(double(q) / cuts * double(entropies.size()))]);
    }
    c.push_back(std::nextafter(distinct.back(), std::numeric_limits<double>::infinity()));
    std::sort(c.begin(), c.end());
    c.erase(std::unique(c.begin(), c.end()), c.end());
  }
  std::vector<size_t> pick(static_cast<size_t>(early), 0);  // odometer over candidate indices
  std::vector<double> thresholds(static_cast<size_t>(early)), best;
  uint64_t best_correct = 0;
  double best_macs = 0;
  for (;;) {
    for (int e = 0; e < early; ++e) thresholds[size_t(e)] = candidates[size_t(e)][pick[size_t(e)]];
    uint64_t correct = 0;
    double mac_sum = 0;
    for (const ExitObservations& chip : chips)
      for (size_t i = 0; i < chip.images(); ++i) {
        const int exit = entropy_exit(chip.image(i), exits, thresholds);
        correct += chip.correct(i, exit);
        mac_sum += double(macs.cascade(exit));
      }
    const double mean_macs = mac_sum / double(total);
    const bool fits = mac_budget <= 0 || mean_macs <= mac_budget;
    if (fits && (best.empty() || correct > best_correct ||
                 (correct == best_correct && mean_macs < best_macs))) {
      best = thresholds;
      best_correct = correct;
      best_macs = mean_macs;
    }
    int e = 0;
    while (e < early && ++pick[size_t(e)] == candidates[size_t(e)].size()) pick[size_t(e++)] = 0;
    if (e == early) break;
  }
  if (best.empty()) budget_too_small(mac_budget, macs.cascade(0));
  return best;
}

// ---------------------------------------------------------------------------------------------
// The learned picker.

namespace {
constexpr int kPickerHidden = 12;
constexpr int kPickerSteps = 400;
constexpr double kPickerLearningRate = 0.03;
}  // namespace

std::vector<double> ExitPicker::features(double sigma, const ExitStats* per_exit) const {
  std::vector<double> x;
  x.reserve(size_t(inputs_));
  for (int e = 0; e < exits_; ++e) {
    x.push_back(per_exit[e].max_prob);
    x.push_back(per_exit[e].entropy / log_classes_);
    x.push_back(per_exit[e].margin);
  }
  x.push_back(sigma);
  if (!mean_.empty())
    for (size_t i = 0; i < x.size(); ++i) x[i] = (x[i] - mean_[i]) / scale_[i];
  return x;
}

void ExitPicker::hidden_and_output(const std::vector<double>& x, std::vector<double>& h,
                                   std::vector<double>& out) const {
  h.assign(size_t(hidden_), 0.0);
  out.assign(size_t(exits_), 0.0);
  for (int j = 0; j < hidden_; ++j) {
    double sum = b1_[size_t(j)];
    for (int i = 0; i < inputs_; ++i) sum += w1_[size_t(j * inputs_ + i)] * x[size_t(i)];
    h[size_t(j)] = std::tanh(sum);
  }
  for (int k = 0; k < exits_; ++k) {
    double sum = b2_[size_t(k)];
    for (int j = 0; j < hidden_; ++j) sum += w2_[size_t(k * hidden_ + j)] * h[size_t(j)];
    out[size_t(k)] = sum;
  }
}

ExitPicker ExitPicker::train(const std::vector<Sample>& chips, int classes, uint64_t seed) {
  ExitPicker picker;
  picker.exits_ = chips.empty() ? 0 : chips.front().chip->exits;
  if (picker.exits_ < 2) throw std::logic_error("exit picker needs a multi-exit model");
  picker.inputs_ = 3 * picker.exits_ + 1;
  picker.hidden_ = kPickerHidden;
  picker.log_classes_ = std::log(double(std::max(classes, 2)));

  // Training set: the raw features, and which exits are right, of every image on every chip.
  std::vector<std::vector<double>> xs;
  std::vector<std::vector<char>> right;
  for (const Sample& sample : chips)
    for (size_t i = 0; i < sample.chip->images(); ++i) {
      std::vector<char> r(size_t(picker.exits_));
      bool any = false;
      for (int e = 0; e < picker.exits_; ++e) any |= (r[size_t(e)] = sample.chip->correct(i, e));
      if (!any) continue;  // no exit is right: nothing to learn about choosing
      xs.push_back(picker.features(sample.sigma, sample.chip->image(i)));
      right.push_back(std::move(r));
    }
  const size_t n = xs.size();
  picker.mean_.assign(size_t(picker.inputs_), 0.0);
  picker.scale_.assign(size_t(picker.inputs_), 1.0);
  for (size_t i = 0; i < size_t(picker.inputs_) && n > 0; ++i) {
    double sum = 0, squares = 0;
    for (const auto& x : xs) sum += x[i];
    const double mean = sum / double(n);
    for (const auto& x : xs) squares += (x[i] - mean) * (x[i] - mean);
    const double std = std::sqrt(squares / double(n));
    picker.mean_[i] = mean;
    picker.scale_[i] = std > 1e-9 ? std : 1.0;  // a constant input (one σ) carries nothing
    for (auto& x : xs) x[i] = (x[i] - mean) / picker.scale_[i];
  }

  SplitMix64 rng{seed ^ 0x7069636b6572ull};  // "picker"
  auto init = [&](std::vector<double>& w, size_t size, int fan_in) {
    w.resize(size);
    const double bound = 1.0 / std::sqrt(double(fan_in));
    for (double& v : w) v = (2 * rng.uniform() - 1) * bound;
  };
  init(picker.w1_, size_t(picker.hidden_ * picker.inputs_), picker.inputs_);
  init(picker.w2_, size_t(picker.exits_ * picker.hidden_), picker.hidden_);
  picker.b1_.assign(size_t(picker.hidden_), 0.0);
  picker.b2_.assign(size_t(picker.exits_), 0.0);
  if (n == 0) {  // nothing is ever right: keep the final exit
    picker.b2_.back() = 1.0;
    return picker;
  }

  // Full-batch Adam on −mean log P(picked exit is right) = −log Σ_{right e} softmax_e.
  std::vector<double> g1(picker.w1_.size()), gb1(picker.b1_.size()), g2(picker.w2_.size()),
      gb2(picker.b2_.size());
  std::vector<std::pair<std::vector<double>*, std::vector<double>*>> groups = {
      {&picker.w1_, &g1}, {&picker.b1_, &gb1}, {&picker.w2_, &g2}, {&picker.b2_, &gb2}};
  std::vector<std::vector<double>> m(groups.size()), v(groups.size());
  for (size_t g = 0; g < groups.size(); ++g) {
    m[g].assign(groups[g].first->size(), 0.0);
    v[g].assign(groups[g].first->size(), 0.0);
  }
  std::vector<double> h, out, p(size_t(picker.exits_)), dh(size_t(picker.hidden_));
  double beta1_power = 1, beta2_power = 1;
  for (int step = 0; step < kPickerSteps; ++step) {
    for (auto& group : groups) std::fill(group.second->begin(), group.second->end(), 0.0);
    for (size_t s = 0; s < n; ++s) {
      picker.hidden_and_output(xs[s], h, out);
      const double top = *std::max_element(out.begin(), out.end());
      double sum = 0, right_sum = 0;
      for (int k = 0; k < picker.exits_; ++k) sum += p[size_t(k)] = std::exp(out[size_t(k)] - top);
      for (int k = 0; k < picker.exits_; ++k) {
        p[size_t(k)] /= sum;
        if (right[s][size_t(k)]) right_sum += p[size_t(k)];
      }
      std::fill(dh.begin(), dh.end(), 0.0);
      for (int k = 0; k < picker.exits_; ++k) {
        // d/dz_k of −log Σ_right p = p_k − [k right] p_k / Σ_right p
        const double dz =
            (p[size_t(k)] - (right[s][size_t(k)] ? p[size_t(k)] / right_sum : 0.0)) / double(n);
        gb2[size_t(k)] += dz;
        for (int j = 0; j < picker.hidden_; ++j) {
          g2[size_t(k * picker.hidden_ + j)] += dz * h[size_t(j)];
          dh[size_t(j)] += dz * picker.w2_[size_t(k * picker.hidden_ + j)];
        }
      }
      for (int j = 0; j < picker.hidden_; ++j) {
        const double da = dh[size_t(j)] * (1 - h[size_t(j)] * h[size_t(j)]);
        gb1[size_t(j)] += da;
        for (int i = 0; i < picker.inputs_; ++i)
          g1[size_t(j * picker.inputs_ + i)] += da * xs[s][size_t(i)];
      }
    }
    beta1_power *= 0.9;
    beta2_power *= 0.999;
    for (size_t g = 0; g < groups.size(); ++g) {
      std::vector<double>& w = *groups[g].first;
      const std::vector<double>& grad = *groups[g].second;
      for (size_t i = 0; i < w.size(); ++i) {
        m[g][i] = 0.9 * m[g][i] + 0.1 * grad[i];
        v[g][i] = 0.999 * v[g][i] + 0.001 * grad[i] * grad[i];
        w[i] -= kPickerLearningRate * (m[g][i] / (1 - beta1_power)) /
                (std::sqrt(v[g][i] / (1 - beta2_power)) + 1e-8);
      }
    }
  }
  return picker;
}

int ExitPicker::choose(double sigma, const ExitStats* per_exit) const {
  std::vector<double> h, out;
  hidden_and_output(features(sigma, per_exit), h, out);
  return int(std::max_element(out.begin(), out.end()) - out.begin());
}

json ExitPicker::to_json() const {
  return {{"inputs", inputs_}, {"hidden", hidden_}, {"parameters", parameter_count()}};
}

// ---------------------------------------------------------------------------------------------
// A policy bound to a model.

ExitPolicy::ExitPolicy(const ExitPolicyOptions& options, const ResNet& net,
                       const std::string& model_path, std::vector<double> sigmas, uint64_t seed)
    : options_(options), macs_(exit_macs(net)), classes_(net.arch().num_classes), seed_(seed) {
  options_.validate();
  const int exits = net.arch().num_exits();
  if (!options_.policy.empty()) {
    spec_ = std::make_unique<ExitPolicySpec>(parse_exit_policy(options_.policy));
    check_policy_fits(*spec_, exits, model_path);
  }
  if (options_.entropy_grid > 0 && exits < 2)
    throw UserError("--entropy-grid needs a multi-exit model, but '" + model_path +
                    "' has only its final exit: use a model with early exits (see cimsweep info)");
  std::sort(sigmas.begin(), sigmas.end());
  sigmas.erase(std::unique(sigmas.begin(), sigmas.end()), sigmas.end());
  sigmas_ = std::move(sigmas);
  if (options_.mac_budget > 0) {
    const int64_t cheapest =
        spec_->kind == ExitPolicyKind::kBestStatic ? macs_.alone(0) : macs_.cascade(0);
    if (options_.mac_budget < double(cheapest)) budget_too_small(options_.mac_budget, cheapest);
  }
}

json ExitPolicy::identity() const {
  json id = {{"policy", spec_ ? json(spec_->text()) : json(nullptr)},
             {"entropy_grid", options_.entropy_grid}};
  if (needs_calibration()) {
    id["calibration"] = {{"images", options_.calibration_images},
                         {"trials", options_.calibration_trials},
                         {"first_trial", kCalibrationFirstTrial}};
    id["mac_budget"] = options_.mac_budget;
    // The learned picker is trained over every σ at once, so its σ values shape every choice.
    if (spec_->kind == ExitPolicyKind::kSigmaAwareLearned) id["sigmas"] = sigmas_;
  }
  return id;
}

void ExitPolicy::calibrate(const CalibrationImages& images, const ChipObserver& observe) {
  if (!needs_calibration()) return;
  std::vector<std::pair<double, std::vector<ExitObservations>>> per_sigma;
  for (double sigma : sigmas_) {
    std::vector<ExitObservations> chips;
    for (int k = 0; k < options_.calibration_trials; ++k)
      chips.push_back(observe(images, sigma, kCalibrationFirstTrial + uint32_t(k)));
    if (spec_->kind == ExitPolicyKind::kBestStatic)
      static_exit_[sigma] = best_static_exit(chips, macs_, options_.mac_budget);
    else if (spec_->kind == ExitPolicyKind::kSigmaAware)
      thresholds_[sigma] = search_thresholds(chips, macs_, options_.mac_budget);
    else
      per_sigma.emplace_back(sigma, std::move(chips));
  }
  if (spec_->kind == ExitPolicyKind::kSigmaAwareLearned) {
    std::vector<ExitPicker::Sample> samples;
    for (const auto& [sigma, chips] : per_sigma)
      for (const ExitObservations& chip : chips) samples.push_back({sigma, &chip});
    picker_ = std::make_unique<ExitPicker>(ExitPicker::train(samples, classes_, seed_));
  }
  calibrated_ = true;
}

int ExitPolicy::choose(double sigma, const ExitStats* per_exit) const {
  if (spec_->needs_calibration() && !calibrated_)
    throw std::logic_error("exit policy " + spec_->text() + " used before calibration");
  switch (spec_->kind) {
    case ExitPolicyKind::kFixed:
      return spec_->fixed_exit - 1;
    case ExitPolicyKind::kEntropy:
      return entropy_exit(per_exit, macs_.exits(), spec_->thresholds);
    case ExitPolicyKind::kBestStatic: {
      auto it = static_exit_.find(sigma);
      if (it == static_exit_.end())
        throw std::logic_error("best-static exit not calibrated at σ " + number_text(sigma));
      return it->second;
    }
    case ExitPolicyKind::kSigmaAware:
      return entropy_exit(per_exit, macs_.exits(), thresholds_at(sigma));
    case ExitPolicyKind::kSigmaAwareLearned:
      return picker_->choose(sigma, per_exit);
  }
  return macs_.exits() - 1;
}

const std::vector<double>& ExitPolicy::thresholds_at(double sigma) const {
  auto it = thresholds_.find(sigma);
  if (it == thresholds_.end())
    throw std::logic_error("sigma-aware thresholds not calibrated at σ " + number_text(sigma));
  return it->second;
}

int64_t ExitPolicy::cost(int exit) const {
  switch (spec_->kind) {
    case ExitPolicyKind::kFixed:
    case ExitPolicyKind::kBestStatic:
      return macs_.alone(exit);
    case ExitPolicyKind::kEntropy:
    case ExitPolicyKind::kSigmaAware:
      return macs_.cascade(exit);
    case ExitPolicyKind::kSigmaAwareLearned:
      return macs_.all();
  }
  return macs_.all();
}

ExitOutcome ExitPolicy::evaluate(double sigma, const ExitObservations& chip) const {
  ExitOutcome outcome;
  outcome.images = chip.images();
  outcome.exit_counts.assign(size_t(macs_.exits()), 0);
  double mac_sum = 0;
  for (size_t i = 0; i < chip.images(); ++i) {
    const int exit = choose(sigma, chip.image(i));
    ++outcome.exit_counts[size_t(exit)];
    outcome.correct += chip.correct(i, exit);
    mac_sum += double(cost(exit));
  }
  outcome.macs_per_image = chip.images() ? mac_sum / double(chip.images()) : NAN;
  return outcome;
}

void ExitPolicy::apply(double sigma, const ExitObservations& chip, TrialRecord& record) const {
  if (!record.extra.is_object()) record.extra = json::object();
  if (spec_) {
    const ExitOutcome outcome = evaluate(sigma, chip);
    record.correct = outcome.correct;
    record.accuracy = 100.0 * double(outcome.correct) / double(outcome.images);
    json policy = {{"policy", spec_->text()},
                   {"exit_counts", outcome.exit_counts},
                   {"macs_per_image", outcome.macs_per_image}};
    if (spec_->kind == ExitPolicyKind::kBestStatic) policy["exit"] = static_exit_.at(sigma) + 1;
    if (spec_->kind == ExitPolicyKind::kEntropy) policy["thresholds"] = spec_->thresholds;
    if (spec_->kind == ExitPolicyKind::kSigmaAware) policy["thresholds"] = thresholds_at(sigma);
    if (spec_->kind == ExitPolicyKind::kSigmaAwareLearned) policy["picker"] = picker_->to_json();
    record.extra["exit_policy"] = std::move(policy);
  }
  if (options_.entropy_grid > 0) {
    const int grid = options_.entropy_grid, exits = macs_.exits();
    json thresholds = json::array(), accuracy = json::array(), macs = json::array();
    for (int k = 0; k <= grid; ++k) {
      const double t = std::log(double(classes_)) * k / grid;
      const std::vector<double> shared(size_t(exits - 1), t);
      uint64_t correct = 0;
      double mac_sum = 0;
      for (size_t i = 0; i < chip.images(); ++i) {
        const int exit = entropy_exit(chip.image(i), exits, shared);
        correct += chip.correct(i, exit);
        mac_sum += double(macs_.cascade(exit));
      }
      thresholds.push_back(t);
      accuracy.push_back(100.0 * double(correct) / double(chip.images()));
      macs.push_back(mac_sum / double(chip.images()));
    }
    record.extra["entropy_grid"] = {
        {"thresholds", thresholds}, {"accuracy", accuracy}, {"macs_per_image", macs}};
  }
}

// ---------------------------------------------------------------------------------------------
// The accuracy–compute frontier of the entropy grid.

namespace {

struct FrontierPoint {
  std::string model;
  double sigma;
  double threshold;
  size_t trials;
  double accuracy, macs, macs_fraction;
};

std::vector<FrontierPoint> frontier_points(const std::vector<TrialRecord>& records) {
  struct Group {
    std::string model;
    size_t model_order;
    double sigma;
    std::vector<double> thresholds, accuracy, macs;
    size_t trials = 0;
  };
  std::vector<Group> groups;
  std::unordered_map<std::string, size_t> model_order;
  std::unordered_set<std::string> seen;
  for (const TrialRecord& record : records) {
    if (record.trial < 0 || !record.extra.is_object() || !record.extra.contains("entropy_grid"))
      continue;
    if (!seen.insert(unit_key(record)).second) continue;
    const json& grid = record.extra["entropy_grid"];
    std::vector<double> thresholds, accuracy, macs;
    try {
      thresholds = grid.at("thresholds").get<std::vector<double>>();
      accuracy = grid.at("accuracy").get<std::vector<double>>();
      macs = grid.at("macs_per_image").get<std::vector<double>>();
    } catch (const json::exception&) {
      continue;  // not written by this version: nothing to add
    }
    if (accuracy.size() != thresholds.size() || macs.size() != thresholds.size()) continue;
    const size_t order = model_order.emplace(record.model, model_order.size()).first->second;
    auto group = std::find_if(groups.begin(), groups.end(), [&](const Group& g) {
      return g.model == record.model && g.sigma == record.sigma;
    });
    if (group == groups.end()) {
      groups.push_back({record.model, order, record.sigma, thresholds,
                        std::vector<double>(thresholds.size(), 0.0),
                        std::vector<double>(thresholds.size(), 0.0), 0});
      group = groups.end() - 1;
    }
    if (group->thresholds != thresholds) continue;  // one configuration per model
    for (size_t k = 0; k < thresholds.size(); ++k) {
      group->accuracy[k] += accuracy[k];
      group->macs[k] += macs[k];
    }
    ++group->trials;
  }
  std::stable_sort(groups.begin(), groups.end(), [](const Group& a, const Group& b) {
    return a.model_order != b.model_order ? a.model_order < b.model_order : a.sigma < b.sigma;
  });
  std::vector<FrontierPoint> points;
  for (const Group& g : groups) {
    std::vector<FrontierPoint> all;
    double full = 0;  // the most any threshold costs: every image at the last exit
    for (size_t k = 0; k < g.thresholds.size(); ++k) {
      all.push_back({g.model, g.sigma, g.thresholds[k], g.trials, g.accuracy[k] / double(g.trials),
                     g.macs[k] / double(g.trials), 0});
      full = std::max(full, all.back().macs);
    }
    std::stable_sort(all.begin(), all.end(), [](const FrontierPoint& a, const FrontierPoint& b) {
      return a.macs != b.macs ? a.macs < b.macs : a.accuracy > b.accuracy;
    });
    double best = -1;
    for (FrontierPoint& p : all) {
      if (p.accuracy <= best) continue;  // a cheaper point is at least as accurate
      best = p.accuracy;
      p.macs_fraction = full > 0 ? p.macs / full : NAN;
      points.push_back(p);
    }
  }
  return points;
}

std::string fixed_decimals(double value, int decimals) {
  char buffer[64];
  std::snprintf(buffer, sizeof buffer, "%.*f", decimals, value);
  return buffer;
}

}  // namespace

std::string format_frontier(const std::vector<TrialRecord>& records, const std::string& format) {
  const std::vector<FrontierPoint> points = frontier_points(records);
  if (points.empty()) return "";
  std::ostringstream out;
  if (format == "md") {
    out << "accuracy–compute frontier of the shared entropy threshold (Pareto-optimal points):\n\n"
        << "| model | σ | threshold | trials | mean % | MACs/image | of full |\n"
        << "|:--|--:|--:|--:|--:|--:|--:|\n";
    for (const FrontierPoint& p : points)
      out << "| " << p.model << " | " << json(p.sigma).dump() << " | "
          << fixed_decimals(p.threshold, 3) << " | " << p.trials << " | "
          << fixed_decimals(p.accuracy, 2) << " | " << fixed_decimals(p.macs, 0) << " | "
          << fixed_decimals(100 * p.macs_fraction, 1) << " % |\n";
  } else if (format == "csv") {
    out << "model,sigma,threshold,trials,mean,macs_per_image,macs_fraction\n";
    for (const FrontierPoint& p : points) {
      std::string model = p.model;
      if (model.find_first_of(",\"\r\n") != std::string::npos) {
        std::string quoted = "\"";
        for (char c : model) quoted += c == '"' ? std::string("\"\"") : std::string(1, c);
        model = quoted + "\"";
      }
      out << model << "," << json(p.sigma).dump() << "," << json(p.threshold).dump() << ","
          << p.trials << "," << json(p.accuracy).dump() << "," << json(p.macs).dump() << ","
          << json(p.macs_fraction).dump() << "\n";
    }
  } else {
    nlohmann::ordered_json array = nlohmann::ordered_json::array();
    for (const FrontierPoint& p : points)
      array.push_back({{"model", p.model},
                       {"sigma", p.sigma},
                       {"threshold", p.threshold},
                       {"trials", p.trials},
                       {"mean", p.accuracy},
                       {"macs_per_image", p.macs},
                       {"macs_fraction", p.macs_fraction}});
    return array.dump(2, ' ', false, json::error_handler_t::replace) + "\n";
  }
  return out.str();
}

std::string add_frontier(const std::string& table, const std::vector<TrialRecord>& records,
                         const std::string& format) {
  const std::string frontier = format_frontier(records, format);
  if (frontier.empty()) return table;
  if (format != "json") return table + "\n" + frontier;
  nlohmann::ordered_json both;
  both["table"] = nlohmann::ordered_json::parse(table);
  both["frontier"] = nlohmann::ordered_json::parse(frontier);
  return both.dump(2, ' ', false, json::error_handler_t::replace) + "\n";
}

}  // namespace cimsweep
