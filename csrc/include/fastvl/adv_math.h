// Embedding-space adversarial perturbation math (VILLA / FreeLB) shared by the CPU and CUDA kernels.
//
// One example is delta, grad [L, D] with a row mask [L] (true = valid position). The ascent step is
//     n     = ||grad||  over valid entries (L2: sqrt of the sum of squares; linf: max |grad|)
//     s     = lr / max(n, 1e-8)                               (FreeLB / VILLA clamp; grad == 0 -> no update)
//     delta = delta + s * grad                                (valid entries; padding written as exactly 0)
//     l2 and max_norm > 0:   delta *= max_norm / ||delta||_2  if ||delta||_2 > max_norm
//     linf and max_norm > 0: delta = clamp(delta, -max_norm, max_norm)
// ||delta + s grad||^2 is expanded as dd + 2 s dg + s^2 gg from the sums of one read pass, so the kernels
// read delta and grad once for the statistics and once for the update.
//
// Random init (FreeLB's scaled init): x is noise (uniform in [-1, 1] or standard normal) and
//     l2:   delta = x * init_mag / sqrt(n_valid_rows * D)     (so E||delta||^2 = init_mag^2 / 3 for uniform noise)
//     linf: delta = clamp(x * init_mag, -init_mag, init_mag)
// at valid rows, 0 at padding; an example without valid rows stays 0.
#pragma once

#include <math.h>
#include <stdint.h>

#include "fastvl/macros.h"

namespace fastvl {
namespace adv {

constexpr float kNormEps = 1e-8f;

enum Norm : int { kL2 = 0, kLinf = 1 };

FASTVL_HD inline float sqrt_(float x) { return sqrtf(x); }
FASTVL_HD inline double sqrt_(double x) { return sqrt(x); }

// max that propagates NaN from either side (like torch.amax), so a NaN gradient is never silently dropped.
template <typename T>
FASTVL_HD inline T nan_max(T a, T b) {
  return (a > b || a != a) ? a : b;
}

template <typename T>
FASTVL_HD inline T abs_(T x) {
  return x < T(0) ? -x : x;
}

// Sums over the valid entries of one example (or of part of it): sum g^2, sum d^2, sum d*g, max |g|.
template <typename T>
struct Stats {
  T gg, dd, dg, gmax;
};

template <typename T>
FASTVL_HD inline Stats<T> stats_zero() {
  return Stats<T>{T(0), T(0), T(0), T(0)};
}

template <typename T>
FASTVL_HD inline void accumulate(Stats<T>& s, T d, T g) {
  s.gg += g * g;
  s.dd += d * d;
  s.dg += d * g;
  s.gmax = nan_max(s.gmax, abs_(g));
}

template <typename T>
FASTVL_HD inline Stats<T> combine(const Stats<T>& a, const Stats<T>& b) {
  return Stats<T>{a.gg + b.gg, a.dd + b.dd, a.dg + b.dg, nan_max(a.gmax, b.gmax)};
}

// What the update does to one valid entry: out = clip((d + scale * g) * factor).
struct Coeffs {
  float scale;   // lr / max(||g||, eps)
  float factor;  // L2 projection rescale (1 when inside the ball or no projection)
  float clip;    // linf projection bound; only used when do_clip
  bool do_clip;
};

// Per-example step coefficients from the example's statistics (T = accumulation type: float or double).
template <typename T>
FASTVL_HD inline Coeffs step_coeffs(const Stats<T>& s, T lr, int norm, T max_norm) {
  Coeffs c{0.0f, 1.0f, 0.0f, false};
  const T gnorm = norm == kL2 ? sqrt_(s.gg) : s.gmax;
  const T scale = lr / nan_max(gnorm, T(kNormEps));
  c.scale = static_cast<float>(scale);
  if (max_norm > T(0)) {
    if (norm == kL2) {
      T n2 = s.dd + T(2) * scale * s.dg + scale * scale * s.gg;
      n2 = n2 > T(0) ? n2 : T(0);
      const T n = sqrt_(n2);
      if (n > max_norm) c.factor = static_cast<float>(max_norm / n);
    } else {
      c.clip = static_cast<float>(max_norm);
      c.do_clip = true;
    }
  }
  return c;
}

FASTVL_HD inline float update(float d, float g, const Coeffs& c) {
  float v = (d + c.scale * g) * c.factor;
  if (c.do_clip) v = v > c.clip ? c.clip : (v < -c.clip ? -c.clip : v);
  return v;
}

// Scale of the random init for an example with n_valid valid rows of width dim.
FASTVL_HD inline float init_coeff(int64_t n_valid, int64_t dim, float init_mag, int norm) {
  if (n_valid <= 0 || dim <= 0) return 0.0f;
  if (norm == kL2) return init_mag / sqrtf(static_cast<float>(n_valid) * static_cast<float>(dim));
  return init_mag;
}

FASTVL_HD inline float init_value(float x, float coeff, float init_mag, int norm) {
  float v = x * coeff;
  if (norm == kLinf) v = v > init_mag ? init_mag : (v < -init_mag ? -init_mag : v);
  return v;
}

// ---- Row loops for one CPU thread (contiguous rows of n floats; vectorised with omp simd) ----------------

// Statistics of one valid row; with need_d false, dd and dg stay 0 and d is not read.
FASTVL_HD inline Stats<float> row_stats(const float* FASTVL_RESTRICT d, const float* FASTVL_RESTRICT g, int64_t n,
                                        bool need_d) {
  float gg = 0.0f, dd = 0.0f, dg = 0.0f, gmax = 0.0f;
  int has_nan = 0;
  if (need_d) {
#if !defined(__CUDA_ARCH__)
#pragma omp simd reduction(+ : gg, dd, dg) reduction(max : gmax) reduction(| : has_nan)
#endif
    for (int64_t i = 0; i < n; ++i) {
      gg += g[i] * g[i];
      dd += d[i] * d[i];
      dg += d[i] * g[i];
      const float a = abs_(g[i]);
      gmax = gmax > a ? gmax : a;
      has_nan |= static_cast<int>(a != a);
    }
  } else {
#if !defined(__CUDA_ARCH__)
#pragma omp simd reduction(+ : gg) reduction(max : gmax) reduction(| : has_nan)
#endif
    for (int64_t i = 0; i < n; ++i) {
      gg += g[i] * g[i];
      const float a = abs_(g[i]);
      gmax = gmax > a ? gmax : a;
      has_nan |= static_cast<int>(a != a);
    }
  }
  if (has_nan) gmax = NAN;
  return Stats<float>{gg, dd, dg, gmax};
}

// out[i] = update(d[i], g[i]) over one valid row (out may alias d).
FASTVL_HD inline void row_update(float* out, const float* d, const float* FASTVL_RESTRICT g, int64_t n,
                                 const Coeffs& c) {
#if !defined(__CUDA_ARCH__)
#pragma omp simd
#endif
  for (int64_t i = 0; i < n; ++i) out[i] = update(d[i], g[i], c);
}

}  // namespace adv
}  // namespace fastvl
