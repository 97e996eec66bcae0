// Quantisation-aware training's fake quantisers (cim-model.md §1 and §3): the forward pass uses
// exactly the weight and input values that the σ = 0 digital CIM layer computes with; the
// backward pass is straight-through.
#pragma once
#include <cstddef>
#include <cstdint>

#include "common/cim_config.h"
#include "kernels/cim_math.h"

namespace cimsweep::train {

struct QuantSettings {
  bool enabled = true;  // false: the float network (for the float accuracy and calibration)
  int weight_bits = 8;
  int input_bits = 8;
  WeightScaling scaling = WeightScaling::kMaxAbs;
};

// WAGE's per-layer power-of-two scale α for a layer of `fan_in` rows: the evaluator's own.
using cim::wage_alpha;

// out[i] = the weight value the digital CIM layer multiplies with: with s = max|W| (maxabs) or
// s = 1/α (wage) and D the level of cim-model.md §1, s·(2D − (2^wb − 1))/(2^wb − 1).
// pass[i] (may be null) = 1 where the straight-through gradient flows: everywhere for maxabs
// (nothing is clipped), and inside WAGE's clipping range for wage.
void quantise_weights(const float* w, size_t count, int fan_in, int weight_bits,
                      WeightScaling scaling, float* out, uint8_t* pass);

// Where an input value fell relative to the clipping range [0, a_max].
enum InputRegion : uint8_t { kBelowRange = 0, kInRange = 1, kAboveRange = 2 };

// out[i] = a_max·A/(2^ab − 1) with A = round((2^ab − 1)·clip(x, 0, a_max)/a_max) (§3), the value
// the digital layer reads; region[i] (may be null) records where x[i] fell.
void quantise_inputs(const float* x, size_t count, float a_max, int input_bits, float* out,
                     uint8_t* region);

// Straight-through backward: dx = dy inside [0, a_max], 0 outside. When d_range is non-null it
// receives the PACT gradient of a_max, Σ dy over the inputs clipped at the top.
void quantise_inputs_backward(const float* dy, const uint8_t* region, size_t count, float* dx,
                              double* d_range);

}  // namespace cimsweep::train
