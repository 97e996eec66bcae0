#include "host/cli/cli.h"

#include <cstdio>
#include <iostream>
#include <new>
#include <string>

#include <CLI/CLI.hpp>

#include "common/errors.h"
#include "host/cli/eval.h"
#include "host/cli/info.h"
#include "host/cli/merge.h"
#include "host/cli/plot.h"
#include "host/cli/slurm.h"
#include "host/cli/sweep.h"
#include "host/cli/train.h"
#include "host/cli/train_blockdrop.h"
#include "host/run_command.h"

namespace cimsweep {

int run_cli(int argc, char** argv) {
  CLI::App app{
      "cimsweep: how accurate is this network on a compute-in-memory chip with noisy cells?\n"
      "Monte-Carlo sweeps of ResNets over conductance variation σ (see README.md)."};
  app.set_version_flag("--version", std::string("cimsweep ") + CIMSWEEP_VERSION);
  app.require_subcommand(1);

  // Every subcommand: its options (host/cli/<name>.h), registered here, run below once parsed.
  InfoOptions info_options;
  CLI::App* info = setup_info(app, info_options);
  EvalOptions eval_options;
  CLI::App* eval = setup_eval(app, eval_options);
  SweepCommandOptions sweep_options;
  CLI::App* sweep = setup_sweep(app, sweep_options);
  MergeOptions merge_options;
  CLI::App* merge = setup_merge(app, merge_options);
  SlurmOptions slurm_options;
  CLI::App* slurm = setup_slurm(app, slurm_options);
  PlotOptions plot_options;
  CLI::App* plot = setup_plot(app, plot_options);
  // The trainers write the command as typed into the model's provenance.
  const std::string command_line = shell_command_line(argc, argv);
  TrainOptions train_options;
  train_options.settings.command_line = command_line;
  CLI::App* train = setup_train(app, train_options);
  TrainBlockDropOptions blockdrop_options;
  blockdrop_options.settings.command_line = command_line;
  CLI::App* train_blockdrop = setup_train_blockdrop(app, blockdrop_options);

  try {
    try {
      app.parse(argc, argv);
    } catch (const CLI::ParseError& e) {
      return app.exit(e);
    }
    if (info->parsed()) return run_info(info_options);
    if (eval->parsed()) return run_eval(eval_options);
    if (sweep->parsed()) return run_sweep_command(sweep_options);
    if (merge->parsed()) return run_merge(merge_options);
    if (slurm->parsed()) return run_slurm(slurm_options, std::cout);
    if (plot->parsed()) return run_plot(plot_options);
    if (train->parsed()) return run_train(train_options);
    if (train_blockdrop->parsed()) return run_train_blockdrop(blockdrop_options);
    throw std::logic_error("a subcommand was parsed that run_cli does not run");
  } catch (const UserError& e) {
    std::fprintf(stderr, "cimsweep: error: %s\n", e.what());
    return 2;
  } catch (const std::bad_alloc&) {
    std::fprintf(stderr, "cimsweep: error: out of memory: use a smaller --batch\n");
    return 3;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "cimsweep: internal error: %s (please report it)\n", e.what());
    return 4;
  }
}

}  // namespace cimsweep
