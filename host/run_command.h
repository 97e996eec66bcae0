// Running another program (sbatch, the plotting script) and collecting what it printed.
#pragma once
#include <string>
#include <vector>

namespace cimsweep {

struct CommandOutput {
  int exit_code = -1;  // the exit status, or 128 + the signal that ended it
  std::string out, err;
};

// Whether `program` names an executable file, directly or through PATH.
bool is_runnable(const std::string& program);

// Runs argv[0] (looked up in PATH) and collects its stdout and stderr. UserError when it cannot
// be started at all (no pipe, no fork); a program that is not there exits 127.
CommandOutput run_command(const std::vector<std::string>& argv);

}  // namespace cimsweep
