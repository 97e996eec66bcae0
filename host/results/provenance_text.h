// A model file's metadata as lines a person reads (`cimsweep info`): how the model was made (the
// `cimsweep.provenance` object: trainer, command, data, accuracies, a one-line history), its
// classes and, for a BlockDrop policy, its backbone. `info --format json` keeps the raw strings.
#pragma once

#include <map>
#include <ostream>
#include <string>

namespace cimsweep {

void print_metadata_text(const std::map<std::string, std::string>& metadata, std::ostream& out);

}  // namespace cimsweep
