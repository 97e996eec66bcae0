// One error type for everything a user can get wrong (paths, files, shapes, parameters).
// The message is one line: what is wrong and what to do. main() prints it and exits non-zero.
#pragma once
#include <stdexcept>
#include <string>

namespace cimsweep {

class UserError : public std::runtime_error {
 public:
  explicit UserError(const std::string& what) : std::runtime_error(what) {}
};

}  // namespace cimsweep
