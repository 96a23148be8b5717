// Unit test of the SPADE normalisation math (csrc/include/fastvl/spade_math.h) and the layout-retrieval pixel
// masks and class histograms (csrc/include/fastvl/layout_math.h) against plain transcriptions. No torch.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include "fastvl/layout_math.h"
#include "fastvl/spade_math.h"

namespace {

int failures = 0;

void expect(bool ok, const char* what, double err) {
  if (!ok) {
    ++failures;
    std::printf("FAIL %s: err=%.3e\n", what, err);
  }
}

// Chan's combination of block moments equals the moments of all values at once; the backward of
// y = x_hat (1 + gamma) + beta by central differences of a scalar loss sum(w * y).
void test_spade(std::mt19937& rng) {
  using fastvl::spade::Moments;
  std::normal_distribution<double> nd(0.5, 2.0);
  for (int n : {1, 2, 7, 97, 1000}) {
    std::vector<double> x(n);
    for (auto& v : x) v = nd(rng);
    double mean = 0, m2 = 0;
    for (double v : x) mean += v / n;
    for (double v : x) m2 += (v - mean) * (v - mean);
    Moments<double> acc = fastvl::spade::moments_zero<double>();
    for (int start = 0; start < n; start += 13) {  // blocks of 13 (and a partial last one)
      Moments<double> blk = fastvl::spade::moments_zero<double>();
      for (int i = start; i < n && i < start + 13; ++i) {
        blk = fastvl::spade::combine(blk, Moments<double>{1.0, x[i], 0.0});
      }
      acc = fastvl::spade::combine(acc, blk);
    }
    expect(std::fabs(acc.mean - mean) <= 1e-12 * (1 + std::fabs(mean)), "combine mean", acc.mean - mean);
    expect(std::fabs(fastvl::spade::biased_var(acc) - m2 / n) <= 1e-10 * (1 + m2 / n), "combine var",
           fastvl::spade::biased_var(acc) - m2 / n);
  }
  // Backward: one group of n values, input statistics, against central differences in double.
  const int n = 23;
  const float eps = 1e-5f;
  std::vector<float> x(n), g(n), w(n);
  std::uniform_real_distribution<float> ud(-1.0f, 1.0f);
  for (int i = 0; i < n; ++i) x[i] = 2.0f * ud(rng) + 0.3f, g[i] = 0.3f * ud(rng), w[i] = ud(rng);
  auto loss = [&](const std::vector<double>& xs) {
    double mu = 0, var = 0;
    for (double v : xs) mu += v / n;
    for (double v : xs) var += (v - mu) * (v - mu) / n;
    double l = 0;
    for (int i = 0; i < n; ++i) l += w[i] * ((xs[i] - mu) / std::sqrt(var + eps) * (1 + g[i]));
    return l;
  };
  double mu = 0, var = 0;
  for (float v : x) mu += v / double(n);
  for (float v : x) var += (v - mu) * (v - mu) / n;
  const float r = fastvl::spade::rstd(static_cast<float>(var), eps);
  double a = 0, b = 0;
  for (int i = 0; i < n; ++i) {
    const double xh = (x[i] - mu) * r;
    a += w[i] * (1 + g[i]) / n;
    b += w[i] * (1 + g[i]) * xh / n;
  }
  for (int i = 0; i < n; ++i) {
    const float xh = static_cast<float>((x[i] - mu) * r);
    const float dx = fastvl::spade::grad_x(w[i] * (1 + g[i]), xh, r, static_cast<float>(a), static_cast<float>(b),
                                           true);
    std::vector<double> xp(x.begin(), x.end()), xm(x.begin(), x.end());
    xp[i] += 1e-6;
    xm[i] -= 1e-6;
    const double fd = (loss(xp) - loss(xm)) / 2e-6;
    expect(std::fabs(dx - fd) <= 1e-4 * (1 + std::fabs(fd)), "grad_x vs central differences", dx - fd);
  }
  const float y = fastvl::spade::modulate(1.5f, 0.5f, 2.0f, 0.25f, -1.0f);  // (1.5 - 0.5) * 2 * 1.25 - 1
  expect(std::fabs(y - 1.5f) < 1e-6f, "modulate", y - 1.5f);
}

// map_counts: per query, the pixels whose class the query's box of that class covers.
void test_layout(std::mt19937& rng) {
  const int hw = 37, n_q = 64, n_cls = 5, ignore = 255;
  std::vector<std::vector<std::vector<bool>>> q(n_q, std::vector<std::vector<bool>>(n_cls, std::vector<bool>(hw)));
  std::bernoulli_distribution cover(0.3);
  for (auto& qq : q)
    for (auto& c : qq)
      for (int p = 0; p < hw; ++p) c[p] = cover(rng);
  // slots: classes 0..4 -> 0..4, slot 5 empty; lut by the low 16 bits of an id
  const int slots = n_cls + 1;
  std::vector<int32_t> lut(65536, n_cls);
  for (int c = 0; c < n_cls; ++c) lut[c] = c;
  std::vector<uint64_t> table(static_cast<size_t>(hw) * slots, 0);
  for (int p = 0; p < hw; ++p)
    for (int c = 0; c < n_cls; ++c)
      for (int i = 0; i < n_q; ++i)
        if (q[i][c][p]) table[p * slots + c] |= uint64_t{1} << i;
  std::uniform_int_distribution<int> id(0, n_cls);  // n_cls stands for ignore
  for (int trial = 0; trial < 5; ++trial) {
    std::vector<uint8_t> map(hw);
    for (auto& v : map) {
      const int c = id(rng);
      v = static_cast<uint8_t>(c == n_cls ? ignore : c);
    }
    std::vector<int32_t> counts(64, 0);
    fastvl::layout::map_counts(map.data(), hw, table.data(), slots, lut.data(), counts.data());
    for (int i = 0; i < n_q; ++i) {
      int want = 0;
      for (int p = 0; p < hw; ++p) want += map[p] != ignore && q[i][map[p]][p];
      expect(counts[i] == want, "map_counts", counts[i] - want);
    }
  }
  // map_histogram with the class-count lut: classes 0..4, bad ids -> 5, ignore (255) -> 6
  std::vector<int32_t> hlut(65536, n_cls);
  for (int c = 0; c < n_cls; ++c) hlut[c] = c;
  hlut[ignore] = n_cls + 1;
  std::vector<uint8_t> ids = {0, 4, 4, 255, 7, 2, 255, 200, 0, 0};
  std::vector<int32_t> hist(n_cls + 2, 0);
  fastvl::layout::map_histogram(ids.data(), static_cast<int64_t>(ids.size()), hlut.data(), hist.data());
  const std::vector<int32_t> want_hist = {3, 0, 1, 0, 2, 2, 2};
  for (int i = 0; i < n_cls + 2; ++i) expect(hist[i] == want_hist[i], "map_histogram", hist[i] - want_hist[i]);
  // int16 ids: a negative id (low 16 bits 0xFFFF) lands in the empty slot
  std::vector<int16_t> neg(hw, -1);
  std::vector<int32_t> counts(64, 0);
  fastvl::layout::map_counts(neg.data(), hw, table.data(), slots, lut.data(), counts.data());
  for (int i = 0; i < n_q; ++i) expect(counts[i] == 0, "negative ids count nothing", counts[i]);
}

}  // namespace

int main() {
  std::mt19937 rng(1234);
  test_spade(rng);
  test_layout(rng);
  if (failures) {
    std::printf("%d failure(s)\n", failures);
    return 1;
  }
  std::printf("spade / layout math: all checks passed\n");
  return 0;
}
