// `cimsweep slurm SPEC --shards N --results-dir DIR`: the options of host/sweep/slurm.h's job,
// among them every option eval and sweep take to say what is computed (data, chips, CIM), which
// each array task's sweep gets as given. run_slurm (host/sweep/slurm.h) runs it.
#pragma once

#include "host/sweep/slurm.h"

namespace CLI {
class App;
}

namespace cimsweep {

CLI::App* setup_slurm(CLI::App& app, SlurmOptions& options);

}  // namespace cimsweep
