// The command line: `cimsweep info | eval | sweep | merge | slurm | plot | train |
// train-blockdrop`, one file per subcommand in host/cli/. Returns the process exit code.
#pragma once

namespace cimsweep {
int run_cli(int argc, char** argv);
}
