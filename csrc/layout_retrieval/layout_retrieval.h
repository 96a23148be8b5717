// BachGAN layout retrieval: the F-restricted intersection counts of per-class box layouts against class maps.
// Math: csrc/include/fastvl/layout_math.h. Python API, reference and the running top-k: fastvl/ops/layout_ret.py.
#pragma once

#include <ATen/core/Tensor.h>

namespace fastvl {

// table: int64 [NB, HW, S1], for query block j (queries 64 j .. 64 j + 63) the per-pixel query masks of every slot
// (slot S1 - 1 all zero); lut: int32 [65536], slot of a class id by its low 16 bits; maps: uint8 or int16 [B, HW];
// num_queries: Q <= 64 NB. Returns inter [Q, B] int32, inter[q, b] = #{p : bit q % 64 of table[q / 64, p,
// lut[maps[b, p]]]}.
at::Tensor layout_intersections_cpu(const at::Tensor& table, const at::Tensor& lut, const at::Tensor& maps,
                                    int64_t num_queries);

// Per-map class areas: maps uint8 or int16 [B, HW] -> counts int32 [B, C + 1]: pixels of each class id in [0, C)
// (0 for ignore_index), and in column C the pixels whose id is neither in [0, C) nor ignore_index (bad ids).
at::Tensor layout_class_counts_cpu(const at::Tensor& maps, int64_t num_classes, int64_t ignore_index);

}  // namespace fastvl
