// `cimsweep train`: its options (a CLI11 subcommand) and the run that loads the data, trains and
// writes the model file.
#pragma once
#include <memory>

namespace CLI {
class App;
}

namespace cimsweep::train {

class TrainCommand {
 public:
  // Adds the `train` subcommand and its options to `app`.
  explicit TrainCommand(CLI::App& app);
  ~TrainCommand();
  bool parsed() const;
  // After app.parse(): runs the training; returns the exit code. UserError on bad input.
  int run(int argc, char** argv);

 private:
  struct Options;
  std::unique_ptr<Options> options_;
  CLI::App* command_ = nullptr;
};

}  // namespace cimsweep::train
