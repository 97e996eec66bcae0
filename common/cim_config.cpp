#include "common/cim_config.h"

#include <cmath>
#include <cstdio>
#include <cstdlib>

#include "common/errors.h"

namespace cimsweep {

double CimConfig::inv_onoff() const {
  return std::isinf(onoff_ratio) ? 0.0 : 1.0 / onoff_ratio;
}

cim::ChipModel CimConfig::chip(double sigma, uint32_t trial, int layer) const {
  cim::ChipModel chip;
  chip.key = cim::NoiseKey{seed, trial};
  chip.layer = uint32_t(layer);
  chip.cell_bits = cell_bits;
  chip.slices = cells_per_weight();
  chip.inv_onoff = inv_onoff();
  chip.sigma = sigma;
  chip.variation = variation;
  chip.clamp_at_zero = clamp_at_zero;
  chip.reference_variation = reference_variation;
  return chip;
}

void CimConfig::validate() const {
  auto fail = [](const std::string& message) { throw UserError(message); };
  if (weight_bits < 2 || weight_bits > 16)
    fail("--weight-bits " + std::to_string(weight_bits) + " is out of range: use 2 to 16");
  if (cell_bits < 1 || cell_bits > weight_bits)
    fail("--cell-bits " + std::to_string(cell_bits) + " is out of range: use 1 to --weight-bits (" +
         std::to_string(weight_bits) + ")");
  if (weight_bits % cell_bits != 0)
    fail("--cell-bits " + std::to_string(cell_bits) + " does not divide --weight-bits " +
         std::to_string(weight_bits) +
         ": pick cell bits that divide the weight bits (e.g. 1, 2, 4)");
  if (input_bits < 1 || input_bits > 16)
    fail("--input-bits " + std::to_string(input_bits) + " is out of range: use 1 to 16");
  if (subarray_rows < 1)
    fail("--rows must be at least 1 (sub-array rows), got " + std::to_string(subarray_rows));
  if (!(onoff_ratio > 1.0))
    fail("--onoff must be greater than 1 (Gmax/Gmin) or 'inf', got " + std::to_string(onoff_ratio));
  if (adc_bits < 1 || adc_bits > 24)
    fail("--adc-bits " + std::to_string(adc_bits) + " is out of range: use 1 to 24");
  if (batch_size < 1) fail("--batch must be at least 1, got " + std::to_string(batch_size));
}

nlohmann::json CimConfig::to_json() const {
  nlohmann::json j;
  j["weight_bits"] = weight_bits;
  j["cell_bits"] = cell_bits;
  j["input_bits"] = input_bits;
  j["subarray_rows"] = subarray_rows;
  j["onoff_ratio"] = std::isinf(onoff_ratio) ? nlohmann::json("inf") : nlohmann::json(onoff_ratio);
  j["weight_scaling"] = to_string(scaling);
  j["variation"] = to_string(variation);
  j["clamp_at_zero"] = clamp_at_zero;
  j["reference_variation"] = reference_variation;
  j["mapping"] = to_string(mapping);
  j["adc_bits"] = adc_bits;
  j["adc"] = to_string(adc);
  j["batch_size"] = batch_size;
  j["digital_layers"] = digital_layers;
  j["neurosim_scale"] = neurosim_scale;
  j["seed"] = seed;
  return j;
}

std::string CimConfig::describe() const {
  std::string onoff = std::isinf(onoff_ratio) ? "inf" : nlohmann::json(onoff_ratio).dump();
  std::string text = std::to_string(weight_bits) + "-bit weights (" + to_string(scaling) + ") on " +
                     std::to_string(cell_bits) + "-bit cells, " + std::to_string(input_bits) +
                     "-bit inputs, " + std::to_string(subarray_rows) + "-row sub-arrays (" +
                     to_string(mapping) + "), on/off " + onoff + ", " +
                     (adc == AdcMode::kIdeal ? std::string("ideal")
                                             : std::to_string(adc_bits) + "-bit " + to_string(adc)) +
                     " ADC, batch " + std::to_string(batch_size) + ", " + to_string(variation) +
                     " variation" + (clamp_at_zero ? " clamped at 0" : "") +
                     (reference_variation ? " incl. reference cells" : "") + ", seed " +
                     std::to_string(seed);
  if (!digital_layers.empty()) {
    text += ", digital:";
    for (const std::string& layer : digital_layers) text += " " + layer;
  }
  if (neurosim_scale) text += ", NeuroSim scale";
  return text;
}

std::string to_string(WeightScaling v) {
  return v == WeightScaling::kMaxAbs ? "maxabs" : "wage";
}
std::string to_string(VariationMode v) {
  return v == VariationMode::kDevice ? "device" : "cycle";
}
std::string to_string(Mapping v) {
  return v == Mapping::kKernel ? "kernel" : "dense";
}
std::string to_string(AdcMode v) {
  switch (v) {
    case AdcMode::kDynamic:
      return "dynamic";
    case AdcMode::kFixed:
      return "fixed";
    case AdcMode::kCalibrated:
      return "calibrated";
    case AdcMode::kIdeal:
      return "ideal";
  }
  return "?";
}

namespace {
[[noreturn]] void unknown(const std::string& option, const std::string& value,
                          const std::string& accepted) {
  throw UserError("unknown " + option + " '" + value + "': use " + accepted);
}
}  // namespace

WeightScaling parse_weight_scaling(const std::string& s) {
  if (s == "maxabs") return WeightScaling::kMaxAbs;
  if (s == "wage") return WeightScaling::kWage;
  unknown("--weight-scaling", s, "maxabs or wage");
}
VariationMode parse_variation_mode(const std::string& s) {
  if (s == "device") return VariationMode::kDevice;
  if (s == "cycle") return VariationMode::kCycle;
  unknown("--variation", s, "device or cycle");
}
Mapping parse_mapping(const std::string& s) {
  if (s == "kernel") return Mapping::kKernel;
  if (s == "dense") return Mapping::kDense;
  unknown("--mapping", s, "kernel or dense");
}
AdcMode parse_adc_mode(const std::string& s) {
  if (s == "dynamic") return AdcMode::kDynamic;
  if (s == "fixed") return AdcMode::kFixed;
  if (s == "calibrated") return AdcMode::kCalibrated;
  if (s == "ideal") return AdcMode::kIdeal;
  unknown("--adc", s, "dynamic, fixed, calibrated or ideal");
}
double parse_onoff_ratio(const std::string& s) {
  if (s == "inf" || s == "infinity") return INFINITY;
  char* end = nullptr;
  const double v = std::strtod(s.c_str(), &end);
  if (end == s.c_str() || *end != '\0' || !(v > 1.0) || !std::isfinite(v))
    throw UserError("--onoff '" + s + "' is not valid: give a ratio greater than 1, or 'inf'");
  return v;
}

namespace {
int parse_int(const std::string& name, const std::string& value) {
  char* end = nullptr;
  const long v = std::strtol(value.c_str(), &end, 10);
  if (value.empty() || *end != '\0' || v < -2147483647L || v > 2147483647L)
    throw UserError("--" + name + " '" + value + "' is not an integer");
  return int(v);
}
bool parse_bool(const std::string& name, const std::string& value) {
  if (value == "true" || value == "1" || value == "yes" || value == "on") return true;
  if (value == "false" || value == "0" || value == "no" || value == "off") return false;
  throw UserError("--" + name + " '" + value + "' is not a boolean: use true or false");
}
}  // namespace

const std::vector<CimOption>& cim_options() {
  static const std::vector<CimOption> options = {
      {"weight-bits", "weight bits wb (default 8)", false},
      {"cell-bits", "bits per memory cell cb, divides wb (default 4)", false},
      {"input-bits", "input bits ab, fed bit-serially (default 8)", false},
      {"rows", "rows per sub-array R (default 128)", false},
      {"onoff", "on/off conductance ratio r, or inf (default 10)", false},
      {"weight-scaling", "maxabs or wage (default maxabs)", false},
      {"variation", "device (one draw per chip) or cycle (per read) (default device)", false},
      {"clamp-at-zero", "clamp varied conductances at 0", true},
      {"reference-variation", "vary the reference column's cells too", true},
      {"mapping", "kernel or dense (default kernel)", false},
      {"adc-bits", "ADC bits N (default 10)", false},
      {"adc", "dynamic, fixed, calibrated or ideal (default dynamic)", false},
      {"batch", "evaluation batch size; the dynamic ADC spans it (default 500)", false},
      {"digital-layers", "comma-separated layers computed digitally, e.g. conv1,fc", false},
      {"neurosim-scale", "divide by 2^wb·2^ab as NeuroSim does", true},
      {"seed", "sweep seed of the noise (default 1)", false},
  };
  return options;
}

CimOptionValues cim_option_values(const CimConfig& c) {
  auto number = [](double v) {
    if (std::isinf(v)) return std::string("inf");
    char text[32];
    std::snprintf(text, sizeof text, "%.17g", v);
    return std::string(text);
  };
  std::string digital;
  for (const std::string& name : c.digital_layers) digital += (digital.empty() ? "" : ",") + name;
  const auto flag = [](bool on) { return std::string(on ? "true" : "false"); };
  return {{"weight-bits", std::to_string(c.weight_bits)},
          {"cell-bits", std::to_string(c.cell_bits)},
          {"input-bits", std::to_string(c.input_bits)},
          {"rows", std::to_string(c.subarray_rows)},
          {"onoff", number(c.onoff_ratio)},
          {"weight-scaling", to_string(c.scaling)},
          {"variation", to_string(c.variation)},
          {"clamp-at-zero", flag(c.clamp_at_zero)},
          {"reference-variation", flag(c.reference_variation)},
          {"mapping", to_string(c.mapping)},
          {"adc-bits", std::to_string(c.adc_bits)},
          {"adc", to_string(c.adc)},
          {"batch", std::to_string(c.batch_size)},
          {"digital-layers", digital},
          {"neurosim-scale", flag(c.neurosim_scale)},
          {"seed", std::to_string(c.seed)}};
}

void set_cim_options(CimConfig& config, const CimOptionValues& values) {
  for (const auto& [name, value] : values) set_cim_option(config, name, value);
}

void set_cim_option(CimConfig& c, const std::string& name, const std::string& value) {
  if (name == "weight-bits")
    c.weight_bits = parse_int(name, value);
  else if (name == "cell-bits")
    c.cell_bits = parse_int(name, value);
  else if (name == "input-bits")
    c.input_bits = parse_int(name, value);
  else if (name == "rows")
    c.subarray_rows = parse_int(name, value);
  else if (name == "onoff")
    c.onoff_ratio = parse_onoff_ratio(value);
  else if (name == "weight-scaling")
    c.scaling = parse_weight_scaling(value);
  else if (name == "variation")
    c.variation = parse_variation_mode(value);
  else if (name == "clamp-at-zero")
    c.clamp_at_zero = parse_bool(name, value);
  else if (name == "reference-variation")
    c.reference_variation = parse_bool(name, value);
  else if (name == "mapping")
    c.mapping = parse_mapping(value);
  else if (name == "adc-bits")
    c.adc_bits = parse_int(name, value);
  else if (name == "adc")
    c.adc = parse_adc_mode(value);
  else if (name == "batch")
    c.batch_size = parse_int(name, value);
  else if (name == "neurosim-scale")
    c.neurosim_scale = parse_bool(name, value);
  else if (name == "seed") {
    char* end = nullptr;
    const unsigned long long v = std::strtoull(value.c_str(), &end, 10);
    if (value.empty() || *end != '\0' || v > 0xffffffffull || value[0] == '-')
      throw UserError("--seed '" + value + "' must be an integer from 0 to 4294967295");
    c.seed = uint32_t(v);
  } else if (name == "digital-layers") {
    c.digital_layers.clear();
    size_t start = 0;
    while (start <= value.size()) {
      const size_t comma = value.find(',', start);
      const std::string item =
          value.substr(start, comma == std::string::npos ? std::string::npos : comma - start);
      if (!item.empty()) c.digital_layers.push_back(item);
      if (comma == std::string::npos) break;
      start = comma + 1;
    }
  } else {
    std::string known;
    for (const CimOption& option : cim_options())
      known += (known.empty() ? "" : ", ") + std::string(option.name);
    throw UserError("unknown CIM option '" + name + "': known options are " + known);
  }
}

std::string fnv1a_hex(const std::string& bytes) {
  uint64_t hash = 1469598103934665603ull;
  for (unsigned char c : bytes) {
    hash ^= c;
    hash *= 1099511628211ull;
  }
  char out[17];
  std::snprintf(out, sizeof out, "%016llx", static_cast<unsigned long long>(hash));
  return out;
}

}  // namespace cimsweep
