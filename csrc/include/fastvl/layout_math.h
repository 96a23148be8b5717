// BachGAN layout retrieval: per-pixel query bit masks, shared by the CPU kernel and its C++ unit test (no torch).
// For a block of up to 64 queries, table[p * S1 + s] is the 64-bit mask of the queries whose box mask of class
// classes[s] covers pixel p (slot S1 - 1 is all zero: ids no query names, ignore_index, ids outside the classes).
// A memory map's pixel p with id v adds 1 to the intersection of every query in table[p * S1 + lut[v]].
#pragma once

#include <cstdint>

#include "fastvl/macros.h"

namespace fastvl {
namespace layout {

// Adds, for every query bit set in `mask`, one to counts[q].
FASTVL_HD inline void add_mask(uint64_t mask, int32_t* counts) {
  while (mask) {
#if defined(__CUDA_ARCH__)
    const int q = __ffsll(static_cast<long long>(mask)) - 1;
#else
    const int q = __builtin_ctzll(mask);
#endif
    counts[q] += 1;
    mask &= mask - 1;
  }
}

// The slot of class id v (any integer the memory dtype holds): lut has 65536 entries indexed by v's low 16 bits,
// which is exact for uint8 and int16 ids.
FASTVL_HD inline int32_t slot_of(int32_t v, const int32_t* lut) { return lut[static_cast<uint16_t>(v)]; }

// Intersection counts of one map of hw pixels against one block of queries: counts[q] for q < 64.
template <typename id_t>
FASTVL_HD inline void map_counts(const id_t* map, int64_t hw, const uint64_t* table, int64_t slots,
                                 const int32_t* lut, int32_t* counts) {
  for (int64_t p = 0; p < hw; ++p) add_mask(table[p * slots + slot_of(static_cast<int32_t>(map[p]), lut)], counts);
}

// Class histogram of one map: hist[lut[v]] += 1 for every pixel id v (lut by the low 16 bits, as slot_of).
template <typename id_t>
FASTVL_HD inline void map_histogram(const id_t* map, int64_t hw, const int32_t* lut, int32_t* hist) {
  for (int64_t p = 0; p < hw; ++p) hist[slot_of(static_cast<int32_t>(map[p]), lut)] += 1;
}

}  // namespace layout
}  // namespace fastvl
