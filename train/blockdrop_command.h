// `cimsweep train-blockdrop`: its options (a CLI11 subcommand) and the run that loads the backbone
// and the data, trains a BlockDrop policy (train/blockdrop.h) and writes the policy file (and,
// after joint fine-tuning, the fine-tuned backbone beside it).
#pragma once
#include <memory>

namespace CLI {
class App;
}

namespace cimsweep::train {

class BlockDropCommand {
 public:
  // Adds the `train-blockdrop` subcommand and its options to `app`.
  explicit BlockDropCommand(CLI::App& app);
  ~BlockDropCommand();
  bool parsed() const;
  // After app.parse(): trains and writes the policy; returns the exit code. UserError on bad input.
  int run(int argc, char** argv);

 private:
  struct Options;
  std::unique_ptr<Options> options_;
  CLI::App* command_ = nullptr;
};

}  // namespace cimsweep::train
