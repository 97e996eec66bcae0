// The command line: `cimsweep info | eval | sweep`. Returns the process exit code.
#pragma once

namespace cimsweep {
int run_cli(int argc, char** argv);
}
