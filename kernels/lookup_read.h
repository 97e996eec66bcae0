// Table-lookup reads of a `device` chip (cim-model.md §4, "Summation order"): the chip is fixed
// for a whole trial and every read multiplies it by a vector of bits, so per sub-array and group of
// kLookupRows rows the sums of the rows' conductances are tabulated for every bit pattern, and a
// read is one look-up and one add per group instead of one multiply-add per row. Both the table
// entries and the reads add in one fixed order, written here once per element, so that every
// executor (any SIMD width, thread count or GPU) gets the same float32 partial sums bit for bit.
#pragma once
#include <stddef.h>
#include <stdint.h>

#include "kernels/host_device.h"

namespace cim {

constexpr int kLookupRows = 4;                     // rows per group
constexpr int kLookupPatterns = 1 << kLookupRows;  // bit patterns per group
constexpr int kLookupColumnAlign = 8;              // table rows padded to 8 floats (32 bytes)

HOST_DEVICE inline int lookup_groups(int rows) {
  return (rows + kLookupRows - 1) / kLookupRows;
}
HOST_DEVICE inline int lookup_stride(int columns) {
  return (columns + kLookupColumnAlign - 1) / kLookupColumnAlign * kLookupColumnAlign;
}

// Entry (pattern, column) of one group's table: the conductances `cell[i·row_step]` of the group's
// rows i = 0 … rows − 1 whose bit i is set in `pattern`, added in ascending row order from 0.
HOST_DEVICE inline float lookup_table_entry(const float* cell, int row_step, int rows,
                                            int pattern) {
  float sum = 0.0f;
  for (int i = 0; i < rows; ++i)
    if ((pattern >> i) & 1) sum = sum + cell[i * row_step];
  return sum;
}

// The bit pattern of one group for input bit t: bit i is bit t of the input level of row i.
HOST_DEVICE inline int lookup_pattern(const uint16_t* levels, size_t level_step, int rows,
                                      int bit) {
  int pattern = 0;
  for (int i = 0; i < rows; ++i) pattern |= ((levels[i * level_step] >> bit) & 1) << i;
  return pattern;
}

// Column `column` of one read at one output position: Σ_g table[g][pattern_g][column] over the
// sub-array's groups, starting from group 0 and adding the groups in ascending order. `table`
// holds groups × kLookupPatterns rows of `stride` floats; `patterns[g·pattern_step]` is group g's.
HOST_DEVICE inline float lookup_partial_sum(const float* table, int stride, int groups,
                                            const uint8_t* patterns, int pattern_step, int column) {
  float sum = table[size_t(patterns[0]) * stride + column];
  for (int g = 1; g < groups; ++g)
    sum = sum + table[(size_t(g) * kLookupPatterns + patterns[g * pattern_step]) * stride + column];
  return sum;
}

// The same partial sum without a table, for an executor that does not tabulate the chip (the CUDA
// backend and its CPU reference): `cell` is one operand row (width conductances), `levels[k·
// level_step]` row k's input level. Each group's entry is computed as lookup_table_entry would hold
// it for the group's bit pattern, and the entries are added as lookup_partial_sum adds them, so the
// float32 result is the table read's bit for bit.
HOST_DEVICE inline float lookup_order_sum(const float* cell, int width, const uint16_t* levels,
                                          size_t level_step, int bit) {
  float sum = 0.0f;
  for (int first = 0; first < width; first += kLookupRows) {
    const int rows = width - first < kLookupRows ? width - first : kLookupRows;
    const float entry = lookup_table_entry(
        cell + first, 1, rows, lookup_pattern(levels + first * level_step, level_step, rows, bit));
    sum = first == 0 ? entry : sum + entry;
  }
  return sum;
}

}  // namespace cim
