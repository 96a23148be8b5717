// CPU IPOT: OpenMP over pairs; one pair's whole iteration runs in a thread-local, cache-resident workspace.
#include "ot/ot.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <vector>

#include "fastvl/check.h"
#include "fastvl/ot_math.h"

namespace fastvl {

void check_ipot_args(const at::Tensor& cost, const at::Tensor& txt_pad, const at::Tensor& img_pad, double beta,
                     int64_t iterations, int64_t k) {
  const char* op = "ipot_plan";
  FASTVL_CHECK_DIM(cost, op, "cost", 3);
  FASTVL_CHECK_DTYPE(cost, op, "cost", at::kFloat);
  FASTVL_CHECK_DIM(txt_pad, op, "txt_pad", 2);
  FASTVL_CHECK_DIM(img_pad, op, "img_pad", 2);
  FASTVL_CHECK_DTYPE(txt_pad, op, "txt_pad", at::kBool);
  FASTVL_CHECK_DTYPE(img_pad, op, "img_pad", at::kBool);
  FASTVL_CHECK_SAME_DEVICE(cost, txt_pad, op, "cost", "txt_pad");
  FASTVL_CHECK_SAME_DEVICE(cost, img_pad, op, "cost", "img_pad");
  FASTVL_CHECK_ARG(txt_pad.size(0) == cost.size(0) && txt_pad.size(1) == cost.size(1), op, "txt_pad",
                   "must have shape [B, N] = [", cost.size(0), ", ", cost.size(1), "] (from cost), got ",
                   txt_pad.sizes());
  FASTVL_CHECK_ARG(img_pad.size(0) == cost.size(0) && img_pad.size(1) == cost.size(2), op, "img_pad",
                   "must have shape [B, M] = [", cost.size(0), ", ", cost.size(2), "] (from cost), got ",
                   img_pad.sizes());
  FASTVL_CHECK_ARG(beta > 0.0, op, "beta", "must be > 0, got ", beta);
  FASTVL_CHECK_ARG(iterations >= 0, op, "iteration", "must be >= 0, got ", iterations);
  FASTVL_CHECK_ARG(k >= 1, op, "k", "must be >= 1, got ", k);
}

namespace {

// target_clones: the same source gets an AVX2+FMA build picked at load time on CPUs that have it.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("arch=haswell", "default")))
#endif
void ipot_pairs(const float* cost, const bool* txt_pad, const bool* img_pad, float* plan, int64_t begin, int64_t end,
                int n, int m, float beta, int iterations, int k) {
  std::vector<float> ws(2 * static_cast<size_t>(n) * m + 2 * m + n);
  float* a = ws.data();
  float* q = a + static_cast<size_t>(n) * m;
  float* delta = q + static_cast<size_t>(n) * m;
  float* col = delta + m;
  float* sigma = col + m;
  for (int64_t b = begin; b < end; ++b) {
    const int64_t off = b * n * m;
    ot::ipot_pair(cost + off, m, txt_pad + b * n, img_pad + b * m, n, m, beta, iterations, k, a, q, delta, col, sigma,
                  plan + off, m);
  }
}

}  // namespace

at::Tensor ipot_plan_cpu(const at::Tensor& cost, const at::Tensor& txt_pad, const at::Tensor& img_pad, double beta,
                         int64_t iterations, int64_t k) {
  check_ipot_args(cost, txt_pad, img_pad, beta, iterations, k);
  FASTVL_CHECK_ARG(cost.device().is_cpu(), "ipot_plan", "cost", "must be a CPU tensor for the cpu kernel, got ",
                   cost.device());
  const auto c = cost.contiguous();
  const auto tp = txt_pad.contiguous();
  const auto ip = img_pad.contiguous();
  auto plan = at::empty(c.sizes(), c.options());
  const int64_t B = c.size(0);
  const int n = static_cast<int>(c.size(1)), m = static_cast<int>(c.size(2));
  const float* cp = c.data_ptr<float>();
  const bool* tpp = tp.data_ptr<bool>();
  const bool* ipp = ip.data_ptr<bool>();
  float* pp = plan.data_ptr<float>();
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    ipot_pairs(cp, tpp, ipp, pp, begin, end, n, m, static_cast<float>(beta), static_cast<int>(iterations),
               static_cast<int>(k));
  });
  return plan;
}

TORCH_LIBRARY_IMPL(fastvl, CPU, m) { m.impl("ipot_plan", &ipot_plan_cpu); }

}  // namespace fastvl
