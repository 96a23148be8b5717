// CPU layout retrieval intersections: at::parallel_for over the maps of a chunk; per map and query block, one pass
// over the pixels, each a table lookup (the 64-bit mask of the queries covering that pixel with the pixel's class)
// and one increment per set bit. The per-pixel tables of a query block (HW x slots x 8 bytes) stay cache-resident.
#include "layout_retrieval/layout_retrieval.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <vector>

#include "fastvl/check.h"
#include "fastvl/layout_math.h"

namespace fastvl {
namespace {

constexpr const char* kOp = "layout_retrieval";

template <typename id_t>
void intersections(const uint64_t* table, const int32_t* lut, const id_t* maps, int64_t blocks, int64_t hw,
                   int64_t slots, int64_t num_maps, int64_t num_queries, int32_t* out) {
  at::parallel_for(0, num_maps, 16, [&](int64_t begin, int64_t end) {
    std::array<int32_t, 64> counts;
    for (int64_t b = begin; b < end; ++b) {
      for (int64_t j = 0; j < blocks; ++j) {
        counts.fill(0);
        layout::map_counts(maps + b * hw, hw, table + j * hw * slots, slots, lut, counts.data());
        for (int64_t q = j * 64; q < num_queries && q < (j + 1) * 64; ++q) out[q * num_maps + b] = counts[q - j * 64];
      }
    }
  });
}

}  // namespace

at::Tensor layout_intersections_cpu(const at::Tensor& table_, const at::Tensor& lut_, const at::Tensor& maps_,
                                    int64_t num_queries) {
  FASTVL_CHECK_DIM(table_, kOp, "table", 3);
  FASTVL_CHECK_DTYPE(table_, kOp, "table", at::kLong);
  FASTVL_CHECK_ARG(table_.size(2) >= 1, kOp, "table", "needs at least the empty slot, got shape ", table_.sizes());
  FASTVL_CHECK_DTYPE(lut_, kOp, "lut", at::kInt);
  FASTVL_CHECK_ARG(lut_.dim() == 1 && lut_.size(0) == 65536, kOp, "lut", "must have shape [65536], got ",
                   lut_.sizes());
  FASTVL_CHECK_DIM(maps_, kOp, "maps", 2);
  FASTVL_CHECK_ARG(maps_.scalar_type() == at::kByte || maps_.scalar_type() == at::kShort, kOp, "maps",
                   "must be uint8 or int16 class ids, got ", maps_.scalar_type());
  FASTVL_CHECK_ARG(maps_.size(1) == table_.size(1), kOp, "maps", "must have H W = ", table_.size(1),
                   " pixels per map (from 'table'), got shape ", maps_.sizes());
  FASTVL_CHECK_ARG(num_queries >= 0 && num_queries <= 64 * table_.size(0), kOp, "num_queries",
                   "must be in [0, 64 x blocks] = [0, ", 64 * table_.size(0), "], got ", num_queries);
  FASTVL_CHECK_SAME_DEVICE(table_, lut_, kOp, "table", "lut");
  FASTVL_CHECK_SAME_DEVICE(table_, maps_, kOp, "table", "maps");
  FASTVL_CHECK_ARG(maps_.device().is_cpu(), kOp, "maps", "must be a CPU tensor for the cpu kernel, got ",
                   maps_.device());
  const at::Tensor table = table_.contiguous(), lut = lut_.contiguous(), maps = maps_.contiguous();
  const int64_t num_maps = maps.size(0), hw = maps.size(1), slots = table.size(2);
  at::Tensor out = at::empty({num_queries, num_maps}, maps.options().dtype(at::kInt));
  if (out.numel() == 0) return out;
  const auto* tab = reinterpret_cast<const uint64_t*>(table.data_ptr<int64_t>());
  const int32_t* lp = lut.data_ptr<int32_t>();
  // Every slot index the lut yields must address the table.
  for (int64_t i = 0; i < 65536; ++i)
    FASTVL_CHECK_ARG(lp[i] >= 0 && lp[i] < slots, kOp, "lut", "entries must be slots in [0, ", slots, "), got ",
                     lp[i], " at ", i);
  if (maps.scalar_type() == at::kByte) {
    intersections(tab, lp, maps.data_ptr<uint8_t>(), table.size(0), hw, slots, num_maps, num_queries,
                  out.data_ptr<int32_t>());
  } else {
    intersections(tab, lp, maps.data_ptr<int16_t>(), table.size(0), hw, slots, num_maps, num_queries,
                  out.data_ptr<int32_t>());
  }
  return out;
}

at::Tensor layout_class_counts_cpu(const at::Tensor& maps_, int64_t num_classes, int64_t ignore_index) {
  FASTVL_CHECK_DIM(maps_, kOp, "maps", 2);
  FASTVL_CHECK_ARG(maps_.scalar_type() == at::kByte || maps_.scalar_type() == at::kShort, kOp, "maps",
                   "must be uint8 or int16 class ids, got ", maps_.scalar_type());
  FASTVL_CHECK_ARG(num_classes >= 1 && num_classes <= 32768, kOp, "num_classes", "must be in [1, 32768], got ",
                   num_classes);
  FASTVL_CHECK_ARG(maps_.device().is_cpu(), kOp, "maps", "must be a CPU tensor for the cpu kernel, got ",
                   maps_.device());
  const at::Tensor maps = maps_.contiguous();
  const bool u8 = maps.scalar_type() == at::kByte;
  const int64_t num_maps = maps.size(0), hw = maps.size(1), c = num_classes;
  // Slot of every value the dtype holds (by its low 16 bits): the class, C (bad id) or C + 1 (ignore_index).
  std::vector<int32_t> lut(65536, static_cast<int32_t>(c));
  for (int64_t v = 0; v < 65536; ++v) {
    const int64_t id = u8 ? v : static_cast<int64_t>(static_cast<int16_t>(static_cast<uint16_t>(v)));
    if (u8 && v > 255) continue;
    if (id == ignore_index) lut[v] = static_cast<int32_t>(c + 1);
    else if (id >= 0 && id < c) lut[v] = static_cast<int32_t>(id);
  }
  at::Tensor out = at::empty({num_maps, c + 1}, maps.options().dtype(at::kInt));
  int32_t* op = out.data_ptr<int32_t>();
  at::parallel_for(0, num_maps, 16, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> hist(static_cast<size_t>(c + 2));
    for (int64_t b = begin; b < end; ++b) {
      std::fill(hist.begin(), hist.end(), 0);
      if (u8) layout::map_histogram(maps.data_ptr<uint8_t>() + b * hw, hw, lut.data(), hist.data());
      else layout::map_histogram(maps.data_ptr<int16_t>() + b * hw, hw, lut.data(), hist.data());
      std::copy(hist.begin(), hist.begin() + c + 1, op + b * (c + 1));
    }
  });
  return out;
}

TORCH_LIBRARY_IMPL(fastvl, CPU, m) {
  m.impl("layout_intersections_kernel", &layout_intersections_cpu);
  m.impl("layout_class_counts_kernel", &layout_class_counts_cpu);
}

}  // namespace fastvl
