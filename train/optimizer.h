// SGD with momentum (torch.optim.SGD's formulation, optional Nesterov) and L2 weight decay added to
// the gradient of conv/FC weights only, and the learning-rate schedules as pure functions of the
// step, so that a resumed run needs only the step number to be back on its schedule.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "train/network.h"

namespace cimsweep::train {

enum class Schedule { kCosine, kStep, kOneCycle, kConstant };
Schedule parse_schedule(const std::string& name);  // UserError lists the accepted names
std::string to_string(Schedule schedule);

struct ScheduleSettings {
  Schedule kind = Schedule::kCosine;
  double base_lr = 0.1;
  int epochs = 1;
  int64_t steps_per_epoch = 1;
  std::vector<int> milestones;  // step schedule: epochs after which the rate is multiplied by gamma
  double gamma = 0.1;
  int warmup_epochs = 0;  // linear warm-up from base_lr/warmup_steps (cosine, step, constant)
};

// The learning rate of optimizer step `step` (0-based, counted over the whole run):
//  - cosine: base·(1 + cos(π·t/T))/2 over the steps after the warm-up;
//  - step: base·gamma^(milestones passed by the step's epoch, 1-based epochs);
//  - onecycle: PyTorch's OneCycleLR defaults (30 % rising from base/25 to base along a cosine,
//    then falling to base/25/10⁴ along a cosine; its own warm-up, so warmup_epochs is ignored);
//  - constant.
// With warmup_epochs > 0 the rate of the first warm-up steps is multiplied by (t + 1)/W.
double learning_rate(const ScheduleSettings& s, int64_t step);

struct SgdSettings {
  double momentum = 0.9;
  double weight_decay = 5e-4;
  bool nesterov = false;
};

// One step over every trainable parameter: g = grad + wd·w (weights only), v = μ·v + g,
// w −= lr·(g + μ·v) with Nesterov, else w −= lr·v.
void sgd_step(std::vector<Parameter>& parameters, const SgdSettings& settings, double lr);

}  // namespace cimsweep::train
