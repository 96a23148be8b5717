// Inexact proximal-point optimal transport (IPOT) math shared by the CPU and CUDA kernels.
//
// Layout (fastvl convention): the plan P is [n, m] with n = text positions (rows) and m = image
// regions (columns), i.e. the transpose of UNITER's T [m_img, n_txt]. With A = exp(-C / beta) (0 at
// pads), every outer iteration does
//     Q = A .* P
//     repeat k:  delta_j = 1 / (img_len * sum_i Q_ij sigma_i + 1e4 * img_pad_j)     (columns)
//                sigma_i = 1 / (txt_len * sum_j Q_ij delta_j + 1e4 * txt_pad_i)     (rows)
//     P = diag(sigma) Q diag(delta)
// starting from P = 1 (0 at pads), sigma = 1 / txt_len (0 at pads).
#pragma once

#include <math.h>
#include <stddef.h>
#include <stdint.h>

#include "fastvl/macros.h"

namespace fastvl {
namespace ot {

constexpr float kPadPenalty = 1e4f;

// 1 / (len * dot + 1e4 * pad): the delta / sigma scaling update.
FASTVL_HD inline float scaling(float len, float dot, bool pad) {
  return 1.0f / (len * dot + (pad ? kPadPenalty : 0.0f));
}

// Entry of the proximal kernel A = exp(-C / beta), zero on a padded pair.
FASTVL_HD inline float proximal_kernel(float cost, float beta, bool joint_pad) {
  return joint_pad ? 0.0f : expf(-cost / beta);
}

// Number of valid (non-pad) positions and the extent [0, hi) that contains all of them.
FASTVL_HD inline void valid_extent(const bool* pad, int64_t stride, int size, int* count, int* hi) {
  int c = 0, h = 0;
#if defined(__CUDA_ARCH__)
#pragma unroll 1  // once per block, on one thread: unrolled, it spilled on sm_80 (16 bytes, ptxas -v)
#endif
  for (int i = 0; i < size; ++i) {
    if (!pad[i * stride]) {
      ++c;
      h = i + 1;
    }
  }
  *count = c;
  *hi = h;
}

// Row dot product sum_j q[j] * v[j] (vectorised on the CPU through the omp simd reduction).
FASTVL_HD inline float row_dot(const float* FASTVL_RESTRICT q, const float* FASTVL_RESTRICT v, int m) {
  float dot = 0.0f;
#if !defined(__CUDA_ARCH__)
#pragma omp simd reduction(+ : dot)
#endif
  for (int j = 0; j < m; ++j) dot += q[j] * v[j];
  return dot;
}

// One pair on one thread: cost [n, m] (row stride ld_c), pads, plan out [n, m] (row stride ld_p),
// written everywhere (0 at pads and outside the valid box). Work happens only inside the valid box
// [0, n_hi) x [0, m_hi), which lives in the workspace (cache-resident for UNITER's sizes):
//   a, q: [n_hi * m_hi]; delta, col: [m_hi]; sigma: [n_hi].
// Each outer iteration makes two passes over Q: (1) Q = A .* P fused with the column sums of Q sigma,
// (2) the row dots of Q delta (plus two more per extra inner step when k > 1).
FASTVL_HD inline void ipot_pair(const float* cost, int64_t ld_c, const bool* txt_pad, const bool* img_pad, int n,
                                int m, float beta, int iterations, int k, float* FASTVL_RESTRICT a,
                                float* FASTVL_RESTRICT q, float* FASTVL_RESTRICT delta, float* FASTVL_RESTRICT col,
                                float* FASTVL_RESTRICT sigma, float* plan, int64_t ld_p) {
  int n_len, n_hi, m_len, m_hi;
  valid_extent(txt_pad, 1, n, &n_len, &n_hi);
  valid_extent(img_pad, 1, m, &m_len, &m_hi);
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < m; ++j) plan[i * ld_p + j] = 0.0f;
  if (n_len == 0 || m_len == 0 || iterations <= 0) {
    if (iterations <= 0 && n_len > 0 && m_len > 0)  // no iteration: the plan is the initial P = 1 (0 at pads)
      for (int i = 0; i < n_hi; ++i)
        for (int j = 0; j < m_hi; ++j) plan[i * ld_p + j] = (txt_pad[i] || img_pad[j]) ? 0.0f : 1.0f;
    return;  // an all-padding side transports nothing: distance 0
  }
  const float txt_len = static_cast<float>(n_len), img_len = static_cast<float>(m_len);

  for (int i = 0; i < n_hi; ++i) {
    sigma[i] = txt_pad[i] ? 0.0f : 1.0f / txt_len;
    for (int j = 0; j < m_hi; ++j) a[i * m_hi + j] = proximal_kernel(cost[i * ld_c + j], beta, txt_pad[i] || img_pad[j]);
  }
  for (int j = 0; j < m_hi; ++j) delta[j] = 1.0f;
  for (int it = 0; it < iterations; ++it) {
    for (int j = 0; j < m_hi; ++j) col[j] = 0.0f;
    for (int i = 0; i < n_hi; ++i) {
      float* FASTVL_RESTRICT qi = q + i * m_hi;
      const float* FASTVL_RESTRICT ai = a + i * m_hi;
      const float si = sigma[i];
      // P_ij = sigma_i Q_ij delta_j from the last iteration; P = 1 before the first (sigma, delta = 1).
      const float ps = it == 0 ? 1.0f : si;
      for (int j = 0; j < m_hi; ++j) {
        const float p = it == 0 ? 1.0f : ps * qi[j] * delta[j];
        qi[j] = ai[j] * p;
        col[j] += qi[j] * si;
      }
    }
    for (int r = 0; r < k; ++r) {
      if (r > 0) {
        for (int j = 0; j < m_hi; ++j) col[j] = 0.0f;
        for (int i = 0; i < n_hi; ++i)
          for (int j = 0; j < m_hi; ++j) col[j] += q[i * m_hi + j] * sigma[i];
      }
      for (int j = 0; j < m_hi; ++j) delta[j] = scaling(img_len, col[j], img_pad[j]);
      for (int i = 0; i < n_hi; ++i) sigma[i] = scaling(txt_len, row_dot(q + i * m_hi, delta, m_hi), txt_pad[i]);
    }
  }
  for (int i = 0; i < n_hi; ++i)
    for (int j = 0; j < m_hi; ++j)
      plan[i * ld_p + j] = (txt_pad[i] || img_pad[j]) ? 0.0f : sigma[i] * q[i * m_hi + j] * delta[j];
}

// ---------------------------------------------------------------------------------------------------------------
// Shared-memory plan of the CUDA kernel (host side; csrc/ot/ot_cuda.cu launches with it, ctest checks it).
// A block uses static shared memory (the kernel's own __shared__ arrays, from cudaFuncGetAttributes) plus the
// dynamic part: delta [m], sigma [n] and the per-warp column partials [warps, m] always, and A, Q [n, m] too when
// they fit. A launch succeeds only when static + dynamic <= the device's opt-in limit per block
// (cudaDevAttrMaxSharedMemoryPerBlockOptin, which already excludes the 1 KB the system reserves).

struct IpotSmem {
  bool in_shared;        // A and Q in shared memory (else in a global workspace)
  bool fits;             // the chosen layout fits the block at all
  size_t dynamic_bytes;  // dynamic shared memory to launch with
};

// optin - static - dynamic, in bytes (negative: the launch would fail).
inline long long smem_headroom(size_t optin_bytes, size_t static_bytes, size_t dynamic_bytes) {
  return static_cast<long long>(optin_bytes) - static_cast<long long>(static_bytes) -
         static_cast<long long>(dynamic_bytes);
}

// Dynamic bytes of the small layout (vectors and partials only) and of the big one (plus A and Q).
inline size_t ipot_smem_small(int64_t n, int64_t m, int warps) {
  return sizeof(float) * static_cast<size_t>(m + n + static_cast<int64_t>(warps) * m);
}
inline size_t ipot_smem_big(int64_t n, int64_t m, int warps) {
  return ipot_smem_small(n, m, warps) + sizeof(float) * 2 * static_cast<size_t>(n) * static_cast<size_t>(m);
}

// The layout to launch with: A and Q in shared memory when static + big fits, else the small layout.
inline IpotSmem ipot_smem_plan(int64_t n, int64_t m, int warps, size_t static_bytes, size_t optin_bytes) {
  const size_t big = ipot_smem_big(n, m, warps);
  if (smem_headroom(optin_bytes, static_bytes, big) >= 0) return {true, true, big};
  const size_t small = ipot_smem_small(n, m, warps);
  return {false, smem_headroom(optin_bytes, static_bytes, small) >= 0, small};
}

}  // namespace ot
}  // namespace fastvl
