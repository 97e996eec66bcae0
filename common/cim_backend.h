// What a network needs from a backend: run CIM layer number `index` (forward order) on a batch.
// The backend owns the simulated chip; the network owns everything digital around the layers.
// Backends: CpuCimBackend (host/cpu/cim_cpu.h, the reference) and the CUDA backend (cuda/).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace cimsweep {

// One CIM layer: a conv (an FC layer is a 1×1 conv on a 1×1 map), weights [out, in, kh, kw].
struct CimLayerSpec {
  std::string name;  // tensor prefix, e.g. "layer2.0.conv1"
  int out_channels = 0, in_channels = 0, kernel_h = 1, kernel_w = 1, stride = 1, pad = 0;
  const float* weight = nullptr;  // [out, in, kh, kw], owned by the network
  const float* bias = nullptr;    // [out] or nullptr
  float input_range = 1.0f;       // a_max: the layer's input is clipped to [0, a_max]

  int rows() const { return in_channels * kernel_h * kernel_w; }
  int output_size(int input, int kernel) const { return (input + 2 * pad - kernel) / stride + 1; }
};

class CimBackend {
 public:
  virtual ~CimBackend() = default;
  virtual std::string name() const = 0;
  // Programs the chip of trial `trial` at variation `sigma` (mode `device`: the noise is drawn
  // here once; mode `cycle`: per read during run_layer).
  virtual void program_chip(uint32_t trial, double sigma) = 0;
  // ADC `calibrated`: while enabled, layers run clean with an ideal ADC and record the largest
  // partial sum of each layer; disabling sets each layer's full scale to it.
  virtual void set_calibrating(bool on) = 0;
  // Forces every layer digital (the clean σ = 0, ADC-ideal reference, which equals it exactly).
  virtual void set_all_digital(bool on) = 0;
  // Called before each evaluation batch; the number keys the per-read noise of mode `cycle`.
  virtual void begin_batch(uint32_t batch_index) = 0;
  // x: [n, in, h, w] (non-negative); y: [n, out, oh, ow] including the bias.
  virtual void run_layer(int index, const float* x, int n, int h, int w, float* y) = 0;
};

// ADC `calibrated`: the ADC's range is set at design time from clean data, the largest partial sum
// of each layer over `count` images (the first evaluation batch) on a noise-free chip. `network`
// is any network with forward(images, count, backend), e.g. a ResNet.
template <class Network>
void calibrate_adc(CimBackend& backend, const Network& network, const float* images, int count) {
  backend.program_chip(0, 0.0);
  backend.set_calibrating(true);
  backend.begin_batch(0);
  network.forward(images, count, backend);
  backend.set_calibrating(false);
}

}  // namespace cimsweep
