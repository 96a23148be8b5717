// CUDA IPOT: one thread block per (text, image) pair; all iterations in one launch.
// Thread (warp w, lane l) owns the plan entries (i, j) with i = w (mod kWarps), j = l (mod 32), so Q never
// crosses threads: only the column sums (via per-warp partials) and the row dots (warp shuffles) are shared.
// A and Q live in shared memory when they fit (60 x 100 pairs: ~52 KB), else in a global workspace.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include "fastvl/check.h"
#include "fastvl/ot_math.h"
#include "ot/ot.h"

namespace fastvl {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__global__ void __launch_bounds__(kThreads) ipot_kernel(const float* __restrict__ cost, const bool* __restrict__ txt_pad,
                                                        const bool* __restrict__ img_pad, float* __restrict__ plan,
                                                        float* __restrict__ workspace, int n, int m, float beta,
                                                        int iterations, int k, bool in_shared) {
  extern __shared__ float smem[];
  __shared__ int extent[4];
  const int64_t b = blockIdx.x;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const float* C = cost + b * n * m;
  const bool* tp = txt_pad + b * n;
  const bool* ip = img_pad + b * m;
  float* P = plan + b * n * m;
  float* delta = smem;
  float* sigma = delta + m;
  float* part = sigma + n;  // [kWarps, m] per-warp column partial sums
  float* a = in_shared ? part + kWarps * m : workspace + b * 2 * n * m;
  float* q = a + n * m;

  if (tid == 0) {
    ot::valid_extent(tp, 1, n, &extent[0], &extent[1]);
    ot::valid_extent(ip, 1, m, &extent[2], &extent[3]);
  }
  __syncthreads();
  const int n_len = extent[0], n_hi = extent[1], m_len = extent[2], m_hi = extent[3];
  if (n_len == 0 || m_len == 0 || iterations <= 0) {
    const bool ones = iterations <= 0 && n_len > 0 && m_len > 0;
    for (int idx = tid; idx < n * m; idx += kThreads) P[idx] = (ones && !tp[idx / m] && !ip[idx % m]) ? 1.0f : 0.0f;
    return;
  }
  const float txt_len = static_cast<float>(n_len), img_len = static_cast<float>(m_len);
  for (int idx = tid; idx < n_hi * m; idx += kThreads) {
    const int i = idx / m, j = idx % m;
    a[idx] = j < m_hi ? ot::proximal_kernel(C[idx], beta, tp[i] || ip[j]) : 0.0f;
  }
  for (int i = tid; i < n_hi; i += kThreads) sigma[i] = tp[i] ? 0.0f : 1.0f / txt_len;
  __syncthreads();

  for (int it = 0; it < iterations; ++it) {
    for (int r = 0; r < k; ++r) {
      // Column partial sums of Q sigma (on r == 0 fused with Q = A .* P, P = sigma Q delta of the last iteration).
      for (int j = lane; j < m_hi; j += 32) {
        const float dj = it == 0 ? 1.0f : delta[j];
        float acc = 0.0f;
        for (int i = warp; i < n_hi; i += kWarps) {
          const float si = sigma[i];
          float qij;
          if (r == 0) {
            qij = a[i * m + j] * (it == 0 ? 1.0f : si * q[i * m + j] * dj);
            q[i * m + j] = qij;
          } else {
            qij = q[i * m + j];
          }
          acc += qij * si;
        }
        part[warp * m + j] = acc;
      }
      __syncthreads();
      for (int j = tid; j < m_hi; j += kThreads) {
        float s = 0.0f;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) s += part[w * m + j];
        delta[j] = ot::scaling(img_len, s, ip[j]);
      }
      __syncthreads();
      for (int i = warp; i < n_hi; i += kWarps) {
        float s = 0.0f;
        for (int j = lane; j < m_hi; j += 32) s += q[i * m + j] * delta[j];
        s = warp_sum(s);
        if (lane == 0) sigma[i] = ot::scaling(txt_len, s, tp[i]);
      }
      __syncthreads();
    }
  }
  for (int idx = tid; idx < n * m; idx += kThreads) {
    const int i = idx / m, j = idx % m;
    const bool live = i < n_hi && j < m_hi && !tp[i] && !ip[j];
    P[idx] = live ? sigma[i] * q[idx] * delta[j] : 0.0f;
  }
}

}  // namespace

at::Tensor ipot_plan_cuda(const at::Tensor& cost, const at::Tensor& txt_pad, const at::Tensor& img_pad, double beta,
                          int64_t iterations, int64_t k) {
  check_ipot_args(cost, txt_pad, img_pad, beta, iterations, k);
  FASTVL_CHECK_ARG(cost.is_cuda(), "ipot_plan", "cost", "must be a CUDA tensor for the cuda kernel, got ",
                   cost.device());
  const c10::cuda::CUDAGuard guard(cost.device());
  const auto c = cost.contiguous();
  const auto tp = txt_pad.contiguous();
  const auto ip = img_pad.contiguous();
  auto plan = at::empty(c.sizes(), c.options());
  const int64_t B = c.size(0);
  const int n = static_cast<int>(c.size(1)), m = static_cast<int>(c.size(2));
  if (B == 0 || n == 0 || m == 0) return plan.zero_();

  int dev = 0, optin = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  // The block's static __shared__ arrays count against the same limit as the dynamic part.
  cudaFuncAttributes attr{};
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, ipot_kernel));
  const auto smem = ot::ipot_smem_plan(n, m, kWarps, attr.sharedSizeBytes, static_cast<size_t>(optin));
  FASTVL_CHECK_ARG(smem.fits, "ipot_plan", "cost", "has ", m, " regions: the kernel's per-block vectors need ",
                   smem.dynamic_bytes, " + ", attr.sharedSizeBytes, " bytes of shared memory, over the device's ",
                   optin, " (use the triton or reference backend)");
  const bool in_shared = smem.in_shared;
  const size_t bytes = smem.dynamic_bytes;
  at::Tensor workspace;
  if (!in_shared) workspace = at::empty({B, 2, n, m}, c.options());
  if (bytes + attr.sharedSizeBytes > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(ipot_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes));
  ipot_kernel<<<B, kThreads, bytes, c10::cuda::getCurrentCUDAStream()>>>(
      c.data_ptr<float>(), tp.data_ptr<bool>(), ip.data_ptr<bool>(), plan.data_ptr<float>(),
      in_shared ? nullptr : workspace.data_ptr<float>(), n, m, static_cast<float>(beta), static_cast<int>(iterations),
      static_cast<int>(k), in_shared);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return plan;
}

TORCH_LIBRARY_IMPL(fastvl, CUDA, m) { m.impl("ipot_plan", &ipot_plan_cuda); }

}  // namespace fastvl
