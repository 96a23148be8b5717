// Unit test of the shared adversarial-step math (csrc/include/fastvl/adv_math.h) against a plain double-precision
// transcription of the VILLA / FreeLB step: masked gradient norm, ascent step, projection, padding 0. No torch.
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "fastvl/adv_math.h"

namespace {

using fastvl::adv::kL2;
using fastvl::adv::kLinf;

int failures = 0;

void expect(bool ok, const char* what, int norm, int L, int D, double max_norm, double err) {
  if (!ok) {
    ++failures;
    std::printf("FAIL %s: norm=%s L=%d D=%d max_norm=%g err=%.3e\n", what, norm == kL2 ? "l2" : "linf", L, D, max_norm,
                err);
  }
}

// The step written directly: the norm of the updated delta is computed from the updated delta itself.
std::vector<double> step_naive(const std::vector<float>& d, const std::vector<float>& g, const std::vector<bool>& m,
                               int L, int D, double lr, int norm, double max_norm) {
  double gn = 0;
  for (int l = 0; l < L; ++l)
    for (int i = 0; m[l] && i < D; ++i) {
      const double v = g[l * D + i];
      gn = norm == kL2 ? gn + v * v : std::max(gn, std::fabs(v));
    }
  if (norm == kL2) gn = std::sqrt(gn);
  const double s = lr / std::max(gn, 1e-8);
  std::vector<double> out(L * D, 0.0);
  double dn = 0;
  for (int l = 0; l < L; ++l)
    for (int i = 0; m[l] && i < D; ++i) {
      out[l * D + i] = d[l * D + i] + s * g[l * D + i];
      dn += out[l * D + i] * out[l * D + i];
    }
  dn = std::sqrt(dn);
  if (max_norm > 0) {
    for (double& v : out) {
      if (norm == kL2 && dn > max_norm) v *= max_norm / dn;
      if (norm == kLinf) v = std::min(max_norm, std::max(-max_norm, v));
    }
  }
  return out;
}

// The step as the CPU kernel runs it: row_stats per valid row, combined in double, coefficients, row_update.
std::vector<float> step_shared(const std::vector<float>& d, const std::vector<float>& g, const std::vector<bool>& m,
                               int L, int D, float lr, int norm, float max_norm) {
  const bool need_d = norm == kL2 && max_norm > 0;
  auto st = fastvl::adv::stats_zero<double>();
  for (int l = 0; l < L; ++l) {
    if (!m[l]) continue;
    const auto r = fastvl::adv::row_stats(&d[l * D], &g[l * D], D, need_d);
    st = fastvl::adv::combine(st, fastvl::adv::Stats<double>{r.gg, r.dd, r.dg, r.gmax});
  }
  const auto c = fastvl::adv::step_coeffs(st, static_cast<double>(lr), norm, static_cast<double>(max_norm));
  std::vector<float> out(L * D, NAN);
  for (int l = 0; l < L; ++l) {
    if (m[l])
      fastvl::adv::row_update(&out[l * D], &d[l * D], &g[l * D], D, c);
    else
      for (int i = 0; i < D; ++i) out[l * D + i] = 0.0f;
  }
  return out;
}

// The step as the CUDA kernel runs it: per-element accumulate() in float over chunks of rows, chunks combined.
std::vector<float> step_elementwise(const std::vector<float>& d, const std::vector<float>& g,
                                    const std::vector<bool>& m, int L, int D, float lr, int norm, float max_norm,
                                    int rows_per_chunk) {
  auto st = fastvl::adv::stats_zero<float>();
  for (int r0 = 0; r0 < L; r0 += rows_per_chunk) {
    auto part = fastvl::adv::stats_zero<float>();
    for (int l = r0; l < std::min(L, r0 + rows_per_chunk); ++l)
      for (int i = 0; m[l] && i < D; ++i) fastvl::adv::accumulate(part, d[l * D + i], g[l * D + i]);
    st = fastvl::adv::combine(st, part);
  }
  const auto c = fastvl::adv::step_coeffs(st, lr, norm, max_norm);
  std::vector<float> out(L * D);
  for (int l = 0; l < L; ++l)
    for (int i = 0; i < D; ++i) out[l * D + i] = m[l] ? fastvl::adv::update(d[l * D + i], g[l * D + i], c) : 0.0f;
  return out;
}

double max_err(const std::vector<float>& a, const std::vector<double>& b, double* scale) {
  double e = 0;
  *scale = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    const double diff = std::fabs(a[i] - b[i]);
    e = std::isnan(diff) ? INFINITY : std::max(e, diff);
    *scale = std::max(*scale, std::fabs(b[i]));
  }
  return e;
}

void check_step(std::mt19937& rng, int L, int D, int n_valid, int norm, float max_norm, bool zero_grad) {
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<float> d(L * D), g(L * D);
  std::vector<bool> m(L);
  for (int l = 0; l < L; ++l) m[l] = l < n_valid;
  for (int e = 0; e < L * D; ++e) {
    const bool pad = !m[e / D];
    d[e] = pad ? NAN : 0.01f * nd(rng);  // padding entries are never read: poison them
    g[e] = pad ? NAN : (zero_grad ? 0.0f : nd(rng));
  }
  const float lr = 0.05f;
  const auto ref = step_naive(d, g, m, L, D, lr, norm, max_norm);
  // float rounding is relative to the terms of d + s * g (|s * g| <= lr for both norms), not to their sum
  double terms = lr;
  for (int e = 0; e < L * D; ++e) terms = m[e / D] ? std::max(terms, std::fabs(double(d[e])) + lr) : terms;
  double scale = 0;
  const auto a = step_shared(d, g, m, L, D, lr, norm, max_norm);
  double err = max_err(a, ref, &scale);
  expect(err <= 1e-6 * std::max(scale, terms), "row path", norm, L, D, max_norm, err);
  const auto b = step_elementwise(d, g, m, L, D, lr, norm, max_norm, 3);
  err = max_err(b, ref, &scale);
  expect(err <= 1e-6 * std::max(scale, terms), "element path", norm, L, D, max_norm, err);
  for (int e = 0; e < L * D; ++e) {
    const bool pad = !m[e / D];
    if (pad && (a[e] != 0.0f || b[e] != 0.0f)) {
      expect(false, "padding is exactly 0", norm, L, D, max_norm, a[e]);
      break;
    }
    if (zero_grad && !pad && (a[e] != d[e] && max_norm == 0.0f)) {
      expect(false, "zero gradient leaves delta unchanged", norm, L, D, max_norm, a[e] - d[e]);
      break;
    }
  }
}

void check_projection_bound(std::mt19937& rng) {
  // After a projected l2 step the delta's norm is at most max_norm (up to rounding); linf entries within the bound.
  std::normal_distribution<float> nd(0.0f, 1.0f);
  const int L = 9, D = 33;
  std::vector<float> d(L * D), g(L * D);
  std::vector<bool> m(L, true);
  for (int e = 0; e < L * D; ++e) d[e] = nd(rng), g[e] = nd(rng);
  for (int norm : {kL2, kLinf}) {
    const float max_norm = 0.5f;
    const auto out = step_shared(d, g, m, L, D, 1.0f, norm, max_norm);
    double n2 = 0, mx = 0;
    for (float v : out) n2 += double(v) * v, mx = std::max(mx, std::fabs(double(v)));
    const double got = norm == kL2 ? std::sqrt(n2) : mx;
    expect(got <= max_norm * (1 + 1e-6) && got >= max_norm * (1 - 1e-3), "projection lands on the ball", norm, L, D,
           max_norm, got - max_norm);
  }
}

void check_nan_gradient_propagates() {
  const int L = 2, D = 5;
  std::vector<float> d(L * D, 0.0f), g(L * D, 1.0f);
  std::vector<bool> m(L, true);
  g[7] = NAN;
  for (int norm : {kL2, kLinf}) {
    const auto a = step_shared(d, g, m, L, D, 0.1f, norm, 0.0f);
    const auto b = step_elementwise(d, g, m, L, D, 0.1f, norm, 0.0f, 1);
    expect(std::isnan(a[0]) && std::isnan(b[0]), "NaN gradient is not hidden", norm, L, D, 0.0, 0.0);
  }
}

void check_init(std::mt19937& rng) {
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  const int D = 17;
  for (int n_valid : {0, 1, 5}) {
    for (int norm : {kL2, kLinf}) {
      const float mag = 0.7f;
      const float c = fastvl::adv::init_coeff(n_valid, D, mag, norm);
      const double want = n_valid == 0 ? 0.0 : (norm == kL2 ? mag / std::sqrt(double(n_valid) * D) : mag);
      expect(std::fabs(c - want) <= 1e-6 * want + 1e-12, "init coefficient", norm, n_valid, D, mag, c - want);
      for (int t = 0; t < 50; ++t) {
        const float x = 3.0f * u(rng);  // normal-like tails beyond [-1, 1]
        const float v = fastvl::adv::init_value(x, c, mag, norm);
        double w = double(x) * c;
        if (norm == kLinf) w = std::min<double>(mag, std::max<double>(-mag, w));
        expect(std::fabs(v - w) <= 1e-6 * std::fabs(w) + 1e-12, "init value", norm, n_valid, D, mag, v - w);
      }
    }
  }
}

}  // namespace

int main() {
  std::mt19937 rng(20201124u);
  const int shapes[][3] = {{1, 1, 1}, {1, 7, 1}, {5, 13, 3}, {60, 48, 17}, {7, 129, 7}, {4, 64, 0}, {3, 5, 2}};
  for (const auto& s : shapes) {
    for (int norm : {kL2, kLinf}) {
      for (float max_norm : {0.0f, 1e-3f, 0.05f, 100.0f}) {
        check_step(rng, s[0], s[1], s[2], norm, max_norm, false);
        check_step(rng, s[0], s[1], s[2], norm, max_norm, true);
      }
    }
  }
  check_projection_bound(rng);
  check_nan_gradient_propagates();
  check_init(rng);
  if (failures) {
    std::printf("test_adv_math: %d failure(s)\n", failures);
    return 1;
  }
  std::printf("test_adv_math: all checks passed\n");
  return 0;
}
