// splitmix64: a tiny generator whose sequence is fixed by its definition, unlike std::shuffle or
// std::uniform_real_distribution, whose results differ between standard libraries. Whatever must
// be a pure function of a seed (calibration splits, learned policies) draws from it.
#pragma once
#include <cstdint>

namespace cimsweep {

struct SplitMix64 {
  uint64_t state;
  uint64_t next() {
    uint64_t z = (state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  uint64_t below(uint64_t n) { return next() % n; }              // bias < n / 2^64: irrelevant here
  double uniform() { return double(next() >> 11) * 0x1.0p-53; }  // [0, 1)
};

}  // namespace cimsweep
