// SPADE normalisation math shared by the CPU and CUDA kernels (no torch): statistics of a group (Chan's
// combination of partial moments), the modulated output and the input gradient.
//   x_hat = (x - mean) * rstd,  rstd = 1 / sqrt(var + eps),  y = x_hat * (1 + gamma) + beta
//   backward with input statistics: dxh = dy * (1 + gamma);  a = mean(dxh);  b = mean(dxh * x_hat)
//                                   dx = rstd * (dxh - a - x_hat * b);  d_gamma = dy * x_hat;  d_beta = dy
//   backward with running statistics: dx = rstd * dxh.
#pragma once

#include <cmath>

#include "fastvl/macros.h"

namespace fastvl {
namespace spade {

// Count, mean and M2 (sum of squared deviations from the mean) of a set of values.
template <typename acc_t>
struct Moments {
  acc_t count;
  acc_t mean;
  acc_t m2;
};

template <typename acc_t>
FASTVL_HD inline Moments<acc_t> moments_zero() {
  return Moments<acc_t>{acc_t(0), acc_t(0), acc_t(0)};
}

// Chan et al.: the moments of the union of two disjoint sets.
template <typename acc_t>
FASTVL_HD inline Moments<acc_t> combine(const Moments<acc_t>& a, const Moments<acc_t>& b) {
  const acc_t n = a.count + b.count;
  if (n == acc_t(0)) return a;
  const acc_t d = b.mean - a.mean;
  const acc_t wb = b.count / n;
  return Moments<acc_t>{n, a.mean + d * wb, a.m2 + b.m2 + d * d * a.count * wb};
}

// Biased variance of the moments (0 for an empty set).
template <typename acc_t>
FASTVL_HD inline acc_t biased_var(const Moments<acc_t>& m) {
  return m.count > acc_t(0) ? m.m2 / m.count : acc_t(0);
}

FASTVL_HD inline float rstd(float var, float eps) { return 1.0f / sqrtf(var + eps); }

FASTVL_HD inline float modulate(float x, float mean, float rstd_, float gamma, float beta) {
  return (x - mean) * rstd_ * (1.0f + gamma) + beta;
}

// dx of one element; a = mean(dxh), b = mean(dxh * x_hat) over the group (ignored without input statistics).
FASTVL_HD inline float grad_x(float dxh, float x_hat, float rstd_, float a, float b, bool use_input_stats) {
  return use_input_stats ? rstd_ * (dxh - a - x_hat * b) : rstd_ * dxh;
}

}  // namespace spade
}  // namespace fastvl
