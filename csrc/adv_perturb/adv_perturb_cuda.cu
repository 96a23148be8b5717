// CUDA adversarial perturbation step: a deterministic two-phase reduction, every slot (text and image) in one launch
// per phase. Each example is cut into chunks of whole rows (~8K elements); one thread block per chunk. A padded slot's
// example b is rows [b L, b L + L) with its mask row; a packed slot's example b is rows [cu[b], cu[b+1]) (at most
// max_seqlen of them), all valid; chunks past a packed example's end have nothing to do.
//   phase 1 (stats_kernel):  a block sums g^2, d^2, d*g and max |g| over its chunk's valid rows -> partials[chunk]
//   phase 2 (update_kernel): a block combines its example's partials in a fixed order (warp 0), derives the step
//                            coefficients (adv_math.h) and updates its chunk in place, padding rows written as 0.
// Rows are read with 16-byte vector loads when the row width and the pointers allow it.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "adv_perturb/adv_perturb.h"
#include "fastvl/adv_math.h"
#include "fastvl/check.h"
#include "fastvl/dispatch.h"

namespace fastvl {
namespace {

constexpr int kMaxSlots = 4;
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kChunkElems = 8192;

struct Slot {
  void* delta;
  const void* grad;
  const bool* mask;  // padded: [B, L]
  const int* cu;     // packed: cu_seqlens [B + 1] (nullptr when padded)
  int64_t L, D;      // L: rows per example (padded) or max_seqlen (packed)
  int64_t first;  // global index of the slot's first chunk
  int rows;       // rows per chunk
  int chunks;     // chunks per example
  float lr, max_norm;
  bool vec;  // rows can be read as 16-byte vectors
};

struct Slots {
  Slot s[kMaxSlots];
  int n;
  int norm;
};

struct Partial {
  float gg, dd, dg, gmax;
};

template <typename scalar_t>
struct alignas(16) Pack {
  static constexpr int kN = 16 / sizeof(scalar_t);
  scalar_t v[kN];
};

__device__ __forceinline__ int find_slot(const Slots& S, int64_t chunk) {
  int k = 0;
  while (k + 1 < S.n && chunk >= S.s[k + 1].first) ++k;
  return k;
}

__device__ __forceinline__ adv::Stats<float> warp_combine(adv::Stats<float> s) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    adv::Stats<float> other{__shfl_xor_sync(0xffffffffu, s.gg, o), __shfl_xor_sync(0xffffffffu, s.dd, o),
                            __shfl_xor_sync(0xffffffffu, s.dg, o), __shfl_xor_sync(0xffffffffu, s.gmax, o)};
    s = adv::combine(s, other);
  }
  return s;
}

struct Rows {
  int64_t row0;       // first row of the example
  int64_t n;          // its rows (padded: L, padding included; packed: its length, at most L)
  const bool* mask;   // its mask row, nullptr when every row is valid
};

__device__ __forceinline__ Rows example_rows(const Slot& s, int64_t b) {
  if (s.cu != nullptr) {
    const int64_t a = s.cu[b], len = static_cast<int64_t>(s.cu[b + 1]) - a;
    return Rows{a, max(int64_t{0}, min(len, s.L)), nullptr};
  }
  return Rows{b * s.L, s.L, s.mask + b * s.L};
}

// Visits chunk c of an example: fn(row_valid, element_offset_in_example, n) with n = 1 or one Pack of elements.
// Consecutive threads take consecutive vectors (coalesced); indices inside a chunk are 32-bit (a chunk holds
// ~kChunkElems elements, or one row).
template <typename scalar_t, typename Fn>
__device__ __forceinline__ void for_chunk(const Slot& s, const Rows& ex, int c, Fn&& fn) {
  const int64_t r0 = static_cast<int64_t>(c) * s.rows;
  if (r0 >= ex.n) return;
  const int n_rows = static_cast<int>(min(ex.n - r0, static_cast<int64_t>(s.rows)));
  const bool* m = ex.mask == nullptr ? nullptr : ex.mask + r0;
  const int64_t begin = r0 * s.D;
  const int V = s.vec ? Pack<scalar_t>::kN : 1;
  const int per_row = static_cast<int>(s.D / V);
  const int total = n_rows * per_row;
  for (int p = threadIdx.x; p < total; p += kThreads)
    fn(m == nullptr || m[p / per_row], begin + static_cast<int64_t>(p) * V, V);
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) stats_kernel(Slots S, Partial* __restrict__ partials) {
  const int64_t chunk = blockIdx.x;
  const Slot& s = S.s[find_slot(S, chunk)];
  const int64_t local = chunk - s.first;
  const int64_t b = local / s.chunks;
  const int c = static_cast<int>(local % s.chunks);
  const bool need_d = S.norm == adv::kL2 && s.max_norm > 0.0f;
  const Rows ex = example_rows(s, b);
  const scalar_t* g = static_cast<const scalar_t*>(s.grad) + ex.row0 * s.D;
  const scalar_t* d = static_cast<const scalar_t*>(s.delta) + ex.row0 * s.D;
  auto st = adv::stats_zero<float>();
  for_chunk<scalar_t>(s, ex, c, [&](bool valid, int64_t e, int n) {
    if (!valid) return;
    if (n != Pack<scalar_t>::kN) {
      adv::accumulate(st, need_d ? static_cast<float>(d[e]) : 0.0f, static_cast<float>(g[e]));
      return;
    }
    const Pack<scalar_t> gp = *reinterpret_cast<const Pack<scalar_t>*>(g + e);
    Pack<scalar_t> dp;
    if (need_d) dp = *reinterpret_cast<const Pack<scalar_t>*>(d + e);
#pragma unroll
    for (int i = 0; i < Pack<scalar_t>::kN; ++i)
      adv::accumulate(st, need_d ? static_cast<float>(dp.v[i]) : 0.0f, static_cast<float>(gp.v[i]));
  });
  __shared__ adv::Stats<float> warp_stats[kWarps];
  st = warp_combine(st);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) warp_stats[warp] = st;
  __syncthreads();
  if (threadIdx.x == 0) {
    auto total = warp_stats[0];
    for (int w = 1; w < kWarps; ++w) total = adv::combine(total, warp_stats[w]);
    partials[chunk] = Partial{total.gg, total.dd, total.dg, total.gmax};
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) update_kernel(Slots S, const Partial* __restrict__ partials) {
  const int64_t chunk = blockIdx.x;
  const Slot& s = S.s[find_slot(S, chunk)];
  const int64_t local = chunk - s.first;
  const int64_t b = local / s.chunks;
  const int c = static_cast<int>(local % s.chunks);
  __shared__ adv::Coeffs coeffs;
  if (threadIdx.x < 32) {
    // Warp 0 combines the example's partials; the order is fixed, so the result is deterministic.
    const Partial* p = partials + s.first + b * s.chunks;
    auto st = adv::stats_zero<float>();
    for (int k = threadIdx.x; k < s.chunks; k += 32) st = adv::combine(st, adv::Stats<float>{p[k].gg, p[k].dd,
                                                                                              p[k].dg, p[k].gmax});
    st = warp_combine(st);
    if (threadIdx.x == 0) coeffs = adv::step_coeffs(st, s.lr, S.norm, s.max_norm);
  }
  __syncthreads();
  const adv::Coeffs cf = coeffs;
  const Rows ex = example_rows(s, b);
  scalar_t* d = static_cast<scalar_t*>(s.delta) + ex.row0 * s.D;
  const scalar_t* g = static_cast<const scalar_t*>(s.grad) + ex.row0 * s.D;
  for_chunk<scalar_t>(s, ex, c, [&](bool valid, int64_t e, int n) {
    if (n != Pack<scalar_t>::kN) {
      d[e] = static_cast<scalar_t>(valid ? adv::update(static_cast<float>(d[e]), static_cast<float>(g[e]), cf) : 0.0f);
      return;
    }
    Pack<scalar_t> out;
    if (valid) {
      const Pack<scalar_t> dp = *reinterpret_cast<const Pack<scalar_t>*>(d + e);
      const Pack<scalar_t> gp = *reinterpret_cast<const Pack<scalar_t>*>(g + e);
#pragma unroll
      for (int i = 0; i < Pack<scalar_t>::kN; ++i)
        out.v[i] = static_cast<scalar_t>(adv::update(static_cast<float>(dp.v[i]), static_cast<float>(gp.v[i]), cf));
    } else {
#pragma unroll
      for (int i = 0; i < Pack<scalar_t>::kN; ++i) out.v[i] = static_cast<scalar_t>(0.0f);
    }
    *reinterpret_cast<Pack<scalar_t>*>(d + e) = out;
  });
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) init_kernel(Slot s, float init_mag, int norm) {
  const int64_t b = blockIdx.x / s.chunks;
  const int c = static_cast<int>(blockIdx.x % s.chunks);
  const Rows ex = example_rows(s, b);
  int64_t n_valid = ex.n;
  if (ex.mask != nullptr) {
    n_valid = 0;
    for (int64_t base = 0; base < ex.n; base += kThreads) {  // uniform trip count: every thread reaches the barrier
      const int64_t r = base + threadIdx.x;
      n_valid += __syncthreads_count(r < ex.n && ex.mask[r]);
    }
  }
  const float coeff = adv::init_coeff(n_valid, s.D, init_mag, norm);
  scalar_t* x = static_cast<scalar_t*>(s.delta) + ex.row0 * s.D;
  for_chunk<scalar_t>(s, ex, c, [&](bool valid, int64_t e, int n) {
    for (int i = 0; i < n; ++i)
      x[e + i] = static_cast<scalar_t>(valid ? adv::init_value(static_cast<float>(x[e + i]), coeff, init_mag, norm)
                                             : 0.0f);
  });
}

int rows_per_chunk(int64_t L, int64_t D) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(L, kChunkElems / std::max<int64_t>(D, 1))));
}

template <typename scalar_t>
Slot make_slot(void* delta, const void* grad, const at::Tensor& mask, const AdvLayout& lay) {
  Slot s{};
  s.delta = delta;
  s.grad = grad;
  s.mask = lay.packed ? nullptr : mask.data_ptr<bool>();
  s.cu = lay.packed ? mask.data_ptr<int>() : nullptr;
  s.L = lay.rows;
  s.D = lay.dim;
  s.rows = rows_per_chunk(s.L, s.D);
  s.chunks = static_cast<int>((s.L + s.rows - 1) / s.rows);
  constexpr int V = Pack<scalar_t>::kN;
  s.vec = s.D % V == 0 && reinterpret_cast<uintptr_t>(delta) % 16 == 0 && reinterpret_cast<uintptr_t>(grad) % 16 == 0;
  return s;
}

template <typename scalar_t>
void launch_group(const std::vector<int>& idx, at::TensorList deltas, const std::vector<at::Tensor>& g,
                  const std::vector<at::Tensor>& m, const std::vector<AdvLayout>& lay, at::ArrayRef<double> lrs,
                  at::ArrayRef<double> max_norms, int norm, const at::Tensor& like) {
  Slots S{};
  S.n = static_cast<int>(idx.size());
  S.norm = norm;
  int64_t total = 0;
  for (int j = 0; j < S.n; ++j) {
    const int k = idx[j];
    Slot& s = S.s[j];
    s = make_slot<scalar_t>(deltas[k].data_ptr(), g[k].data_ptr(), m[k], lay[k]);
    s.first = total;
    s.lr = static_cast<float>(lrs[k]);
    s.max_norm = static_cast<float>(max_norms[k]);
    total += lay[k].batch * s.chunks;
  }
  if (total == 0) return;
  TORCH_CHECK(total < (int64_t{1} << 31), "fastvl adv_perturb_step: too many chunks (", total, ")");
  auto partials = at::empty({total, 4}, like.options().dtype(at::kFloat));
  auto stream = c10::cuda::getCurrentCUDAStream();
  const auto grid = static_cast<unsigned>(total);
  auto* part = reinterpret_cast<Partial*>(partials.data_ptr<float>());
  stats_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(S, part);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  update_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(S, part);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void adv_perturb_step_cuda(at::TensorList deltas, at::TensorList grads, at::TensorList masks,
                           at::ArrayRef<double> lrs, c10::string_view norm, at::ArrayRef<double> max_norms,
                           at::IntArrayRef max_seqlens) {
  std::vector<AdvLayout> lay;
  const int code = check_adv_step_args(deltas, grads, masks, lrs, norm, max_norms, max_seqlens, &lay);
  const size_t n = deltas.size();
  if (n == 0) return;
  FASTVL_CHECK_ARG(deltas[0].is_cuda(), "adv_perturb_step", "deltas[0]",
                   "must be a CUDA tensor for the cuda kernel, got ", deltas[0].device());
  const c10::cuda::CUDAGuard guard(deltas[0].device());
  std::vector<at::Tensor> g(n), m(n);
  for (size_t k = 0; k < n; ++k) {
    g[k] = grads[k].contiguous();
    m[k] = masks[k].contiguous();
  }
  // Slots of one dtype share a launch (up to kMaxSlots); empty slots have nothing to write.
  for (at::ScalarType t : kFloatTypes) {
    std::vector<int> idx;
    for (size_t k = 0; k < n; ++k)
      if (deltas[k].scalar_type() == t && deltas[k].numel() > 0) idx.push_back(static_cast<int>(k));
    for (size_t start = 0; start < idx.size(); start += kMaxSlots) {
      const std::vector<int> group(idx.begin() + start, idx.begin() + std::min(idx.size(), start + kMaxSlots));
      FASTVL_DISPATCH_FLOAT_TYPES(t, "adv_perturb", [&] {
        launch_group<scalar_t>(group, deltas, g, m, lay, lrs, max_norms, code, deltas[0]);
      });
    }
  }
}

void adv_perturb_init_cuda(const at::Tensor& noise, const at::Tensor& mask, double init_mag, c10::string_view norm,
                           int64_t max_seqlen) {
  AdvLayout lay;
  const int code = check_adv_init_args(noise, mask, init_mag, norm, max_seqlen, &lay);
  FASTVL_CHECK_ARG(noise.is_cuda(), "adv_perturb_init", "noise", "must be a CUDA tensor for the cuda kernel, got ",
                   noise.device());
  const c10::cuda::CUDAGuard guard(noise.device());
  if (noise.numel() == 0) return;
  const auto m = mask.contiguous();
  FASTVL_DISPATCH_FLOAT_TYPES(noise.scalar_type(), "adv_perturb", [&] {
    const Slot s = make_slot<scalar_t>(noise.data_ptr(), noise.data_ptr(), m, lay);
    const int64_t total = lay.batch * s.chunks;
    if (total == 0) return;
    TORCH_CHECK(total < (int64_t{1} << 31), "fastvl adv_perturb_init: too many chunks (", total, ")");
    init_kernel<scalar_t><<<static_cast<unsigned>(total), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        s, static_cast<float>(init_mag), code);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

TORCH_LIBRARY_IMPL(fastvl, CUDA, m) {
  m.impl("adv_perturb_step_kernel", &adv_perturb_step_cuda);
  m.impl("adv_perturb_init_kernel", &adv_perturb_init_cuda);
}

}  // namespace fastvl
