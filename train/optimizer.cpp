#include "train/optimizer.h"

#include <algorithm>
#include <cmath>

#include "common/errors.h"

namespace cimsweep::train {

Schedule parse_schedule(const std::string& name) {
  if (name == "cosine") return Schedule::kCosine;
  if (name == "step") return Schedule::kStep;
  if (name == "onecycle") return Schedule::kOneCycle;
  if (name == "constant") return Schedule::kConstant;
  throw UserError("unknown --schedule '" + name + "': use cosine, step, onecycle or constant");
}

std::string to_string(Schedule schedule) {
  switch (schedule) {
    case Schedule::kCosine:
      return "cosine";
    case Schedule::kStep:
      return "step";
    case Schedule::kOneCycle:
      return "onecycle";
    case Schedule::kConstant:
      return "constant";
  }
  return "?";
}

double learning_rate(const ScheduleSettings& s, int64_t step) {
  const double pi = 3.14159265358979323846;
  const int64_t total = std::max<int64_t>(1, int64_t(s.epochs) * s.steps_per_epoch);
  if (s.kind == Schedule::kOneCycle) {
    // torch.optim.lr_scheduler.OneCycleLR(max_lr=base, total_steps=total), anneal 'cos'.
    const double initial = s.base_lr / 25.0, final_lr = initial / 1e4;
    const double rise_end = 0.3 * double(total) - 1.0, fall_end = double(total) - 1.0;
    const double t = double(step);
    auto cosine = [&](double from, double to, double fraction) {
      return to + (from - to) * (1.0 + std::cos(pi * std::clamp(fraction, 0.0, 1.0))) / 2.0;
    };
    if (t <= rise_end) return cosine(initial, s.base_lr, rise_end > 0 ? t / rise_end : 1.0);
    return cosine(s.base_lr, final_lr, (t - rise_end) / std::max(1e-12, fall_end - rise_end));
  }
  const int64_t warmup = int64_t(s.warmup_epochs) * s.steps_per_epoch;
  double lr = s.base_lr;
  switch (s.kind) {
    case Schedule::kCosine: {
      const int64_t span = std::max<int64_t>(1, total - warmup);
      const double t = double(std::clamp<int64_t>(step - warmup, 0, span));
      lr = s.base_lr * (1.0 + std::cos(pi * t / double(span))) / 2.0;
      break;
    }
    case Schedule::kStep: {
      const int epoch = int(step / std::max<int64_t>(1, s.steps_per_epoch)) + 1;  // 1-based
      for (int milestone : s.milestones)
        if (epoch > milestone) lr *= s.gamma;
      break;
    }
    default:
      break;
  }
  if (step < warmup) lr *= double(step + 1) / double(warmup);
  return lr;
}

void sgd_step(std::vector<Parameter>& parameters, const SgdSettings& settings, double lr) {
  const float mu = float(settings.momentum), decay = float(settings.weight_decay);
  const float rate = float(lr);
  for (Parameter& p : parameters) {
    if (!p.trainable) continue;
    const bool decays = p.weight_decay && decay > 0;
    for (size_t i = 0; i < p.value.size(); ++i) {
      float g = p.grad[i];
      if (decays) g += decay * p.value[i];
      p.momentum[i] = mu * p.momentum[i] + g;
      const float update = settings.nesterov ? g + mu * p.momentum[i] : p.momentum[i];
      p.value[i] -= rate * update;
    }
  }
}

}  // namespace cimsweep::train
