// Running another program (sbatch, the plotting script) and collecting what it printed; command
// lines as a POSIX shell reads them.
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

// Single-quotes text for a POSIX shell when it holds anything beyond [A-Za-z0-9_./:=,+@%-].
std::string shell_quote(const std::string& text);

// The command line as a shell would need it (argv[0] as its file name), for a model's provenance.
std::string shell_command_line(int argc, char** argv);

}  // namespace cimsweep
