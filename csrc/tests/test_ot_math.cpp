// Unit test of the shared IPOT math (csrc/include/fastvl/ot_math.h) against a plain double-precision
// transcription of REFERENCE.md's iteration (UNITER orientation: T [M_img, N_txt]). No torch needed.
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "fastvl/ot_math.h"

namespace {

// REFERENCE.md, literally: sigma = 1/x_len; T = 1; A = exp(-C^T / beta); per iteration Q = A*T,
// delta = 1/(y_len*(Q@sigma) + 1e4*y_pad), sigma = 1/(x_len*(delta@Q) + 1e4*x_pad), T = delta*Q*sigma.
std::vector<double> ipot_naive(const std::vector<float>& C, const std::vector<bool>& tp, const std::vector<bool>& ip,
                               int n, int m, double beta, int iters, int k) {
  double xl = 0, yl = 0;
  for (bool p : tp) xl += p ? 0 : 1;
  for (bool p : ip) yl += p ? 0 : 1;
  std::vector<double> T(m * n), A(m * n), Q(m * n), sigma(n), delta(m);
  for (int i = 0; i < n; ++i) sigma[i] = tp[i] ? 0.0 : 1.0 / xl;
  for (int j = 0; j < m; ++j)
    for (int i = 0; i < n; ++i) {
      const bool pad = tp[i] || ip[j];
      T[j * n + i] = pad ? 0.0 : 1.0;
      A[j * n + i] = pad ? 0.0 : std::exp(-C[i * m + j] / beta);
    }
  for (int it = 0; it < iters; ++it) {
    for (int e = 0; e < m * n; ++e) Q[e] = A[e] * T[e];
    for (int r = 0; r < k; ++r) {
      for (int j = 0; j < m; ++j) {
        double s = 0;
        for (int i = 0; i < n; ++i) s += Q[j * n + i] * sigma[i];
        delta[j] = 1.0 / (yl * s + (ip[j] ? 1e4 : 0.0));
      }
      for (int i = 0; i < n; ++i) {
        double s = 0;
        for (int j = 0; j < m; ++j) s += delta[j] * Q[j * n + i];
        sigma[i] = 1.0 / (xl * s + (tp[i] ? 1e4 : 0.0));
      }
    }
    for (int j = 0; j < m; ++j)
      for (int i = 0; i < n; ++i) T[j * n + i] = delta[j] * Q[j * n + i] * sigma[i];
  }
  std::vector<double> plan(n * m);  // back to fastvl orientation [n, m]
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < m; ++j) plan[i * m + j] = (tp[i] || ip[j]) ? 0.0 : T[j * n + i];
  return plan;
}

int failures = 0;

void check_case(std::mt19937& rng, int n, int m, int n_len, int m_len, int iters, int k) {
  std::uniform_real_distribution<float> u(0.0f, 2.0f);
  std::vector<float> C(n * m);
  std::vector<bool> tp(n), ip(m);
  for (int i = 0; i < n; ++i) tp[i] = i >= n_len;
  for (int j = 0; j < m; ++j) ip[j] = j >= m_len;
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < m; ++j) C[i * m + j] = (tp[i] || ip[j]) ? 0.0f : u(rng);
  std::vector<float> a(n * m), q(n * m), delta(m), col(m), sigma(n), plan(n * m, NAN);
  // std::vector<bool> is packed; the kernel takes bool arrays.
  std::vector<char> tpc(tp.begin(), tp.end()), ipc(ip.begin(), ip.end());
  fastvl::ot::ipot_pair(C.data(), m, reinterpret_cast<const bool*>(tpc.data()),
                        reinterpret_cast<const bool*>(ipc.data()), n, m, 0.5f, iters, k, a.data(), q.data(),
                        delta.data(), col.data(), sigma.data(), plan.data(), m);
  const auto ref = ipot_naive(C, tp, ip, n, m, 0.5, iters, k);
  double dist = 0, dist_ref = 0, max_err = 0, scale = 0;
  for (int e = 0; e < n * m; ++e) {
    if (!std::isfinite(plan[e])) {
      std::printf("FAIL n=%d m=%d len=(%d,%d): non-finite plan entry %d\n", n, m, n_len, m_len, e);
      ++failures;
      return;
    }
    dist += static_cast<double>(C[e]) * plan[e];
    dist_ref += C[e] * ref[e];
    max_err = std::fmax(max_err, std::fabs(plan[e] - ref[e]));
    scale = std::fmax(scale, std::fabs(ref[e]));
  }
  const bool empty = n_len == 0 || m_len == 0;
  const bool ok = empty ? (dist == 0.0 && max_err == 0.0)
                        : (std::fabs(dist - dist_ref) <= 1e-5 * std::fabs(dist_ref) + 1e-7 && max_err <= 1e-5 * scale);
  std::printf("%s n=%d m=%d len=(%d,%d) iters=%d k=%d dist=%.7f ref=%.7f max_err=%.2e\n", ok ? "ok  " : "FAIL", n, m,
              n_len, m_len, iters, k, dist, dist_ref, max_err);
  failures += ok ? 0 : 1;
}

}  // namespace

int main() {
  std::mt19937 rng(1234);
  check_case(rng, 1, 1, 1, 1, 50, 1);
  check_case(rng, 7, 13, 7, 13, 50, 1);
  check_case(rng, 40, 100, 23, 71, 50, 1);
  check_case(rng, 60, 100, 60, 100, 50, 1);
  check_case(rng, 12, 9, 5, 9, 10, 3);
  check_case(rng, 5, 5, 0, 5, 50, 1);  // all-padding text: zero plan, never NaN
  check_case(rng, 5, 5, 5, 0, 50, 1);  // all-padding image
  if (failures) std::printf("%d case(s) failed\n", failures);
  return failures ? 1 : 0;
}
