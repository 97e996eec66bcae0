#include "host/cli/eval.h"

#include <CLI/CLI.hpp>

namespace cimsweep {

CLI::App* setup_eval(CLI::App& app, EvalOptions& o) {
  CLI::App* command =
      app.add_subcommand("eval", "evaluate one model at one σ over one or more chips");
  command->add_option("model", o.model, "model file (.safetensors)")->required();
  command->add_option("--sigma", o.sigma, "conductance variation σ (default 0)");
  add_run_options(*command, o.run);
  command->add_option("--predictions", o.run.predictions,
                      "write every image's label, predicted class and logits, per run (clean, "
                      "each trial), to this JSON Lines file (atomically)");
  return command;
}

int run_eval(const EvalOptions& o) {
  SweepPlan plan;
  plan.name = "eval";
  plan.models.push_back({default_label(o.model), o.model});
  plan.sigmas = {o.sigma};
  return run_plan(plan, o.run, {});
}

}  // namespace cimsweep
