// Every parameter of the simulated CIM hardware (cim-model.md), with the documented defaults, and
// the evaluation settings that change results (batch size for the dynamic ADC, digital layers).
#pragma once
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "kernels/chip_model.h"

namespace cimsweep {

enum class WeightScaling { kMaxAbs, kWage };
using cim::VariationMode;  // kernels/chip_model.h: the executors read them there too
enum class Mapping { kKernel, kDense };
using cim::AdcMode;

struct CimConfig {
  int weight_bits = 8;      // wb
  int cell_bits = 4;        // cb; wb must be a multiple
  int input_bits = 8;       // ab, fed bit-serially
  int subarray_rows = 128;  // R
  double onoff_ratio = 10;  // r = Gmax/Gmin; infinity allowed
  WeightScaling scaling = WeightScaling::kMaxAbs;
  VariationMode variation = VariationMode::kDevice;
  bool clamp_at_zero = false;        // clamp varied conductances at 0
  bool reference_variation = false;  // vary the reference column's cells too
  Mapping mapping = Mapping::kKernel;
  int adc_bits = 10;  // N
  AdcMode adc = AdcMode::kDynamic;
  int batch_size = 500;                     // evaluation batch (the dynamic ADC's range spans it)
  std::vector<std::string> digital_layers;  // layer names computed digitally (quantised, no CIM)
  bool neurosim_scale = false;  // divide by 2^wb·2^ab instead of (2^wb−1)(2^ab−1), §5
  uint32_t seed = 1;            // sweep seed: the noise is a function of (seed, trial, layer, cell)

  int cells_per_weight() const { return weight_bits / cell_bits; }
  double inv_onoff() const;  // 1/r, 0 for r = inf
  // Chip `trial` of layer `layer` (its forward-order number) at programming variation σ.
  cim::ChipModel chip(double sigma, uint32_t trial, int layer) const;
  // Throws UserError naming the first impossible parameter and how to fix it.
  void validate() const;
  // Every field: the identity of a results file's configuration (σ is per trial, not here).
  nlohmann::json to_json() const;
  // The settings in words for captions, e.g. "8-bit weights on 4-bit cells, 8-bit inputs, …".
  std::string describe() const;
};

std::string to_string(WeightScaling v);
std::string to_string(VariationMode v);
std::string to_string(Mapping v);
std::string to_string(AdcMode v);
// Parse an option value; UserError lists the accepted values.
WeightScaling parse_weight_scaling(const std::string& s);
VariationMode parse_variation_mode(const std::string& s);
Mapping parse_mapping(const std::string& s);
AdcMode parse_adc_mode(const std::string& s);
double parse_onoff_ratio(const std::string& s);  // a number > 1 or "inf"

// The CIM options by name, shared by the command line (--NAME VALUE; a flag is --NAME alone) and
// sweep files ([cim] table). `flag`: a boolean the command line sets by naming it.
struct CimOption {
  const char* name;
  const char* help;
  bool flag;
};
// weight-bits, cell-bits, input-bits, rows, onoff, weight-scaling, variation, clamp-at-zero,
// reference-variation, mapping, adc-bits, adc, batch, digital-layers (comma-separated),
// neurosim-scale, seed, in that order.
const std::vector<CimOption>& cim_options();
// CIM options as a command line gave them: (name, value), a flag's value "true"; in the order of
// cim_options(), which is the order CLI11 runs the options' callbacks in.
using CimOptionValues = std::vector<std::pair<std::string, std::string>>;
// UserError on an unknown name or a value that does not parse.
void set_cim_option(CimConfig& config, const std::string& name, const std::string& value);
void set_cim_options(CimConfig& config, const CimOptionValues& values);
// Every CIM option of `config` as a command line would give it, in the order of cim_options():
// set_cim_options(CimConfig{}, cim_option_values(c)) gives c back.
CimOptionValues cim_option_values(const CimConfig& config);

// 64-bit FNV-1a of bytes, as 16 hex digits: the config hash of the results files.
std::string fnv1a_hex(const std::string& bytes);

}  // namespace cimsweep
