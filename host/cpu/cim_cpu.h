// The CPU reference backend of the CIM simulator (cim-model.md): per layer, the weights are
// quantised and sliced once; per trial the chip is "programmed" (conductances with their noise)
// and, for a chip that stays fixed (`device` variation, or σ = 0), tabulated: per sub-array and
// group of 4 rows, the sums of the rows' conductances for all 16 bit patterns (kernels/
// lookup_read.h). Per batch every read — sub-array × input bit, all cell slices — is then K/4
// look-ups and adds per output position in one fixed order, fused with the ADC and the
// shift-and-add recombination; `cycle` chips (a fresh draw per read) run each read as a GEMM
// through OpenBLAS instead. Threads split the output positions into fixed chunks, so results do
// not depend on the thread count.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "common/cim_backend.h"
#include "common/cim_config.h"
#include "common/layer_plan.h"
#include "kernels/chip_model.h"

namespace cimsweep {

// How the partial sums of a fixed chip's reads are computed: by table look-up (the default, the
// same float sums on every CPU), or, to compare against, as OpenBLAS GEMMs (the earlier path,
// whose last bits depend on the kernel OpenBLAS picks for the CPU). `cycle` chips always use GEMMs.
enum class CpuReads { kLookup, kGemm };

// Bytes of the look-up tables of one CIM layer under `config` at σ, from the shapes alone: what
// program_chip allocates for it.
size_t lookup_table_bytes(const CimLayerSpec& spec, const CimConfig& config, double sigma);

class CpuCimBackend : public CimBackend {
 public:
  CpuCimBackend(const std::vector<CimLayerSpec>& layers, const CimConfig& config);
  std::string name() const override { return "cpu"; }

  void program_chip(uint32_t trial, double sigma) override;
  void begin_batch(uint32_t batch_index) override { batch_index_ = batch_index; }
  void run_layer(int index, const float* x, int n, int h, int w, float* y) override;

  void set_calibrating(bool on) override;
  void set_all_digital(bool on) override { all_digital_ = on; }

  // Takes effect at the next program_chip.
  void set_reads(CpuReads reads) { reads_ = reads; }
  // Bytes held by the look-up tables of the chip programmed now.
  size_t lookup_table_bytes() const;

  const std::vector<QuantisedLayer>& layers() const { return layers_; }
  // The GEMM operand of sub-array `s` of layer `index` as programmed now (for tests).
  const std::vector<float>& programmed_subarray(int index, int s) const { return operands_[index][s]; }
  // The look-up table of sub-array `s` of layer `index` (for tests): [group][pattern][column],
  // rows of cim::lookup_stride(operand rows) floats.
  const std::vector<float>& lookup_table(int index, int s) const { return tables_[index][s]; }

 private:
  // The chip programmed now, for layer `index`.
  cim::ChipModel chip(int index) const { return config_.chip(sigma_, trial_, index); }
  void program_subarray(int index, int s, uint32_t read, std::vector<float>& operand) const;
  void build_lookup_table(int index, int s, std::vector<float>& table) const;
  void run_cim(const QuantisedLayer& layer, const std::vector<uint16_t>& mapped_input, int npos,
               std::vector<double>& acc);
  void run_digital(const QuantisedLayer& layer, const std::vector<uint16_t>& mapped_input, int npos,
                   std::vector<double>& acc) const;

  CimConfig config_;
  std::vector<QuantisedLayer> layers_;
  std::vector<std::vector<std::vector<float>>> operands_;   // [layer][sub-array] GEMM operand
  std::vector<std::vector<std::vector<float>>> tables_;  // [layer][sub-array] look-up table
  CpuReads reads_ = CpuReads::kLookup;
  std::vector<double> calibration_max_;
  uint32_t trial_ = 0;
  double sigma_ = 0;
  uint32_t batch_index_ = 0;
  bool calibrating_ = false;
  bool all_digital_ = false;
};

}  // namespace cimsweep
