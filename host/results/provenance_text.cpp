#include "host/results/provenance_text.h"

#include <cstdio>
#include <set>
#include <vector>

#include <nlohmann/json.hpp>

namespace cimsweep {
namespace {

using nlohmann::json;

std::string percent(double fraction) {
  char text[32];
  std::snprintf(text, sizeof text, "%.2f %%", 100.0 * fraction);
  return text;
}

// A scalar as text; arrays of scalars joined; anything else as compact JSON.
std::string plain(const json& value) {
  if (value.is_string()) return value.get<std::string>();
  if (value.is_array()) {
    std::string joined;
    for (const json& item : value) {
      if (item.is_structured()) return value.dump();
      joined += (joined.empty() ? "" : ", ") + plain(item);
    }
    return joined;
  }
  if (value.is_number_float()) {
    char text[32];
    std::snprintf(text, sizeof text, "%.6g", value.get<double>());
    return text;
  }
  return value.dump();
}

std::string accuracies(const json& fractions) {
  if (fractions.is_number()) return percent(fractions.get<double>());
  std::string joined;
  for (const json& a : fractions) {
    if (!a.is_number()) return fractions.dump();
    joined += (joined.empty() ? "" : " / ") + percent(a.get<double>());
  }
  return joined;
}

std::string duration(double seconds) {
  char text[48];
  const long long s = (long long)(seconds + 0.5);
  if (s >= 3600)
    std::snprintf(text, sizeof text, "%lld h %02lld min", s / 3600, (s % 3600) / 60);
  else
    std::snprintf(text, sizeof text, "%lld min %02lld s", s / 60, s % 60);
  return text;
}

// "40 epochs; last: loss 0.61, 8-bit test acc 0.9012" from a per-epoch history array whose
// entries are objects (both trainers write one); the last entry's numbers in their own words.
std::string history_line(const json& history) {
  if (!history.is_array() || history.empty()) return plain(history);
  std::string line = std::to_string(history.size()) + " entries; last:";
  const json& last = history.back();
  if (!last.is_object()) return line + " " + plain(last);
  bool first = true;
  for (const auto& [key, value] : last.items()) {
    if (value.is_structured() && !value.is_array()) continue;
    line += (first ? " " : ", ") + key + " " + plain(value);
    first = false;
  }
  return line;
}

void line(std::ostream& out, const std::string& label, const std::string& text) {
  const size_t width = 20;  // the longest label, "quantised test acc", and a space
  out << "  " << label << ":" << std::string(label.size() < width ? width - label.size() : 1, ' ')
      << text << "\n";
}

void print_provenance(const json& p, std::ostream& out) {
  // The keys both trainers write, in the order a reader wants them; the rest follow by name.
  static const std::vector<std::pair<std::string, std::string>> known = {
      {"trained_by", "made by"},
      {"commit", "commit"},
      {"resumed_at_commits", "resumed at"},
      {"command", "command"},
      {"command_line", "command"},
      {"data", "data"},
      {"seed", "seed"},
      {"epochs", "epochs"},
      {"batch", "batch"},
      {"precision", "precision"},
      {"optimizer", "optimiser"},
      {"augmentation", "augmentation"},
      {"quantisation_aware", "quantisation"},
      {"input_ranges", "input ranges"},
      {"exit_weights", "exit loss weights"},
      {"exit_loss_weights", "exit loss weights"},
  };
  std::set<std::string> shown;
  for (const auto& [key, label] : known) {
    if (!p.contains(key)) continue;
    shown.insert(key);
    if (key == "epochs" && p[key].is_array()) {
      line(out, "epochs", history_line(p[key]));
    } else {
      line(out, label, plain(p[key]));
    }
  }
  // A model with early exits has one accuracy per exit; a one-head list (what the CIFAR trainer
  // writes for every model) is no exits.
  const bool exits = p.contains("exit_float_test_accuracy") &&
                     p["exit_float_test_accuracy"].is_array() &&
                     p["exit_float_test_accuracy"].size() > 1;
  if (p.contains("float_test_accuracy") || p.contains("exit_float_test_accuracy")) {
    const json& f = exits || !p.contains("float_test_accuracy") ? p["exit_float_test_accuracy"]
                                                                : p["float_test_accuracy"];
    line(out, "float test acc", accuracies(f) + (exits ? " (exits, final last)" : ""));
  }
  if (p.contains("quantised_digital_test_accuracy") ||
      p.contains("exit_quantised_digital_test_accuracy")) {
    const json& q = p.contains("exit_quantised_digital_test_accuracy")
                        ? p["exit_quantised_digital_test_accuracy"]
                        : p["quantised_digital_test_accuracy"];
    std::string how = p.contains("quantised_digital") ? " (" + plain(p["quantised_digital"]) + ")"
                                                      : std::string();
    line(out, "quantised test acc", accuracies(q) + how);
  }
  for (const char* key : {"float_test_accuracy", "quantised_digital_test_accuracy",
                          "exit_float_test_accuracy", "exit_quantised_digital_test_accuracy",
                          "quantised_digital"})
    shown.insert(key);
  if (p.contains("history_summary")) {
    line(out, "history", plain(p["history_summary"]));
  } else if (p.contains("history")) {
    line(out, "history", history_line(p["history"]));
  }
  shown.insert("history_summary");
  shown.insert("history");
  if (p.contains("wall_seconds") && p["wall_seconds"].is_number()) {
    std::string where = p.contains("machine") ? " on " + plain(p["machine"]) : std::string();
    line(out, "wall time", duration(p["wall_seconds"].get<double>()) + where);
    shown.insert("wall_seconds");
    shown.insert("machine");
  }
  for (const auto& [key, value] : p.items()) {
    if (shown.count(key)) continue;
    if (!value.is_object()) {
      line(out, key, plain(value));
      continue;
    }
    for (const auto& [name, item] : value.items()) line(out, key + "." + name, plain(item));
  }
}

}  // namespace

void print_metadata_text(const std::map<std::string, std::string>& metadata, std::ostream& out) {
  for (const auto& [key, value] : metadata) {
    if (key == "cimsweep.arch" || key == "cimsweep.input_ranges") continue;
    const json parsed = json::parse(value, nullptr, /*allow_exceptions=*/false);
    if (key == "cimsweep.provenance" && parsed.is_object()) {
      out << "provenance:\n";
      print_provenance(parsed, out);
    } else if (key == "cimsweep.class_names" && parsed.is_array()) {
      out << "classes:     " << plain(parsed) << "\n";
    } else if (parsed.is_object()) {
      out << key << ":\n";
      for (const auto& [name, item] : parsed.items()) line(out, name, plain(item));
    } else {
      out << key << ": " << value << "\n";
    }
  }
}

}  // namespace cimsweep
