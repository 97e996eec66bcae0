// A random-weight CIFAR-family ResNet (by default 32×32×3, width 16, kernel 3, 10 classes, shortcut
// A) with He weights and plausible batch-norm statistics, written to a model file and read back:
// what the benchmarks time when no trained model is at hand, and the networks of the backend tests.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "host/io/model_file.h"
#include "networks/resnet.h"

namespace cimsweep::bench {

struct RandomModel {
  LoadedModel loaded;
  std::vector<int64_t> macs;  // per CIM layer, one image
  int64_t total_macs = 0;
};

// `tag` names the temporary file and the seed's metadata key (e.g. "bench_cim_cpu").
RandomModel make_random_resnet(int depth, uint64_t seed, const std::string& tag);
// Any architecture of the family (the tests' small and wide ones); input ranges as above.
RandomModel make_random_resnet(const ResNetArch& arch, uint64_t seed, const std::string& tag);

}  // namespace cimsweep::bench
