// CPU adversarial perturbation step: OpenMP over the examples of every slot (text and image in one parallel loop).
// Each example is one pass for the statistics (valid rows only) and one pass for the update, both over rows
// that stay cache-resident for UNITER's sizes; bf16 / fp16 rows are converted to float through a row buffer.
#include "adv_perturb/adv_perturb.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <type_traits>
#include <vector>

#include "fastvl/adv_math.h"
#include "fastvl/check.h"
#include "fastvl/dispatch.h"

namespace fastvl {
namespace {

int parse_norm(c10::string_view norm, const char* op) {
  if (norm == "l2") return adv::kL2;
  if (norm == "linf") return adv::kLinf;
  FASTVL_CHECK_ARG(false, op, "norm", "must be 'l2' or 'linf', got '", std::string(norm), "'");
  return -1;
}

}  // namespace

namespace {

// Validates masks[k] against a padded [B, L, D] or packed [T, D] delta and returns the layout.
AdvLayout check_layout(const at::Tensor& d, const at::Tensor& m, int64_t max_seqlen, const char* op,
                       const std::string& dn, const std::string& mn, const std::string& sn) {
  FASTVL_CHECK_ARG(d.dim() == 3 || d.dim() == 2, op, dn, "must be 3-d [B, L, D] (padded) or 2-d [T, D] (packed), ",
                   "got shape ", d.sizes());
  FASTVL_CHECK_SAME_DEVICE(d, m, op, dn, mn);
  if (d.dim() == 3) {
    FASTVL_CHECK_ARG(m.scalar_type() == at::kBool, op, mn, "must be a bool tensor (True = valid) for a padded ",
                     dn, ", got ", m.scalar_type());
    FASTVL_CHECK_ARG(m.dim() == 2 && m.size(0) == d.size(0) && m.size(1) == d.size(1), op, mn,
                     "must have shape [B, L] = [", d.size(0), ", ", d.size(1), "] (from ", dn, "), got ", m.sizes());
    return AdvLayout{d.size(0), d.size(1), d.size(2), false};
  }
  FASTVL_CHECK_ARG(m.scalar_type() == at::kInt && m.dim() == 1 && m.size(0) >= 1, op, mn,
                   "must be cu_seqlens, an int32 [B+1] tensor, for a packed ", dn, ", got ", m.scalar_type(), " ",
                   m.sizes());
  FASTVL_CHECK_ARG(max_seqlen >= 0, op, sn, "must be >= 0, got ", max_seqlen);
  return AdvLayout{m.size(0) - 1, max_seqlen, d.size(1), true};
}

}  // namespace

int check_adv_step_args(at::TensorList deltas, at::TensorList grads, at::TensorList masks, at::ArrayRef<double> lrs,
                        c10::string_view norm, at::ArrayRef<double> max_norms, at::IntArrayRef max_seqlens,
                        std::vector<AdvLayout>* layouts) {
  const char* op = "adv_perturb_step";
  const int code = parse_norm(norm, op);
  const size_t n = deltas.size();
  FASTVL_CHECK_ARG(grads.size() == n, op, "grads", "must have one tensor per delta (", n, "), got ", grads.size());
  FASTVL_CHECK_ARG(masks.size() == n, op, "masks", "must have one tensor per delta (", n, "), got ", masks.size());
  FASTVL_CHECK_ARG(lrs.size() == n, op, "lrs", "must have one value per delta (", n, "), got ", lrs.size());
  FASTVL_CHECK_ARG(max_norms.size() == n, op, "max_norms", "must have one value per delta (", n, "), got ",
                   max_norms.size());
  FASTVL_CHECK_ARG(max_seqlens.size() == n, op, "max_seqlens", "must have one value per delta (", n, "), got ",
                   max_seqlens.size());
  layouts->clear();
  for (size_t k = 0; k < n; ++k) {
    const auto& d = deltas[k];
    const auto& g = grads[k];
    const std::string ks = "[" + std::to_string(k) + "]";
    const std::string dn = "deltas" + ks, gn = "grads" + ks, mn = "masks" + ks, sn = "max_seqlens" + ks;
    layouts->push_back(check_layout(d, masks[k], max_seqlens[k], op, dn, mn, sn));
    FASTVL_CHECK_ARG(is_float_type(d.scalar_type()), op, dn, "must be float32, bfloat16 or float16, got ",
                     d.scalar_type());
    FASTVL_CHECK_ARG(d.is_contiguous(), op, dn, "must be contiguous (it is updated in place)");
    FASTVL_CHECK_ARG(g.sizes() == d.sizes(), op, gn, "must have the shape of ", dn, " ", d.sizes(), ", got ",
                     g.sizes());
    FASTVL_CHECK_ARG(g.scalar_type() == d.scalar_type(), op, gn, "must have the dtype of ", dn, " (", d.scalar_type(),
                     "), got ", g.scalar_type());
    FASTVL_CHECK_SAME_DEVICE(d, g, op, dn, gn);
    FASTVL_CHECK_SAME_DEVICE(deltas[0], d, op, "deltas[0]", dn);
    FASTVL_CHECK_ARG(lrs[k] >= 0.0, op, "lrs", "must be >= 0, got ", lrs[k], " at index ", k);
    FASTVL_CHECK_ARG(max_norms[k] >= 0.0, op, "max_norms", "must be >= 0 (0 = no projection), got ", max_norms[k],
                     " at index ", k);
  }
  return code;
}

int check_adv_init_args(const at::Tensor& noise, const at::Tensor& mask, double init_mag, c10::string_view norm,
                        int64_t max_seqlen, AdvLayout* layout) {
  const char* op = "adv_perturb_init";
  const int code = parse_norm(norm, op);
  *layout = check_layout(noise, mask, max_seqlen, op, "noise", "mask", "max_seqlen");
  FASTVL_CHECK_ARG(is_float_type(noise.scalar_type()), op, "noise", "must be float32, bfloat16 or float16, got ",
                   noise.scalar_type());
  FASTVL_CHECK_ARG(noise.is_contiguous(), op, "noise", "must be contiguous (it is scaled in place)");
  FASTVL_CHECK_ARG(init_mag >= 0.0, op, "init_mag", "must be >= 0, got ", init_mag);
  return code;
}

namespace {

// A row as float: the tensor's own memory for float32, else converted into buf.
template <typename scalar_t>
const float* load_row(const scalar_t* p, int64_t n, float* buf) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return p;
  } else {
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(p[i]);
    return buf;
  }
}

template <typename scalar_t>
void store_row(scalar_t* p, const float* v, int64_t n) {
  for (int64_t i = 0; i < n; ++i) p[i] = static_cast<scalar_t>(v[i]);
}

// One example: delta, grad [L, D], mask [L] (nullptr: all rows valid); buf holds 3 rows of D floats.
template <typename scalar_t>
void step_example(scalar_t* d, const scalar_t* g, const bool* m, int64_t L, int64_t D, double lr, int norm,
                  double max_norm, float* buf) {
  float *bd = buf, *bg = buf + D, *bo = buf + 2 * D;
  const bool need_d = norm == adv::kL2 && max_norm > 0.0;
  auto st = adv::stats_zero<double>();
  for (int64_t l = 0; l < L; ++l) {
    if (m && !m[l]) continue;
    const float* gr = load_row(g + l * D, D, bg);
    const float* dr = need_d ? load_row(d + l * D, D, bd) : gr;
    const auto r = adv::row_stats(dr, gr, D, need_d);
    st = adv::combine(st, adv::Stats<double>{r.gg, r.dd, r.dg, r.gmax});
  }
  const adv::Coeffs c = adv::step_coeffs(st, lr, norm, max_norm);
  for (int64_t l = 0; l < L; ++l) {
    scalar_t* drow = d + l * D;
    if (m && !m[l]) {
      for (int64_t i = 0; i < D; ++i) drow[i] = static_cast<scalar_t>(0.0f);
      continue;
    }
    if constexpr (std::is_same_v<scalar_t, float>) {
      adv::row_update(drow, drow, g + l * D, D, c);
    } else {
      adv::row_update(bo, load_row(drow, D, bd), load_row(g + l * D, D, bg), D, c);
      store_row(drow, bo, D);
    }
  }
}

template <typename scalar_t>
void init_example(scalar_t* x, const bool* m, int64_t L, int64_t D, float init_mag, int norm, float* buf) {
  int64_t n_valid = m ? 0 : L;
  for (int64_t l = 0; m && l < L; ++l) n_valid += m[l] ? 1 : 0;
  const float coeff = adv::init_coeff(n_valid, D, init_mag, norm);
  for (int64_t l = 0; l < L; ++l) {
    scalar_t* row = x + l * D;
    if (m && !m[l]) {
      for (int64_t i = 0; i < D; ++i) row[i] = static_cast<scalar_t>(0.0f);
      continue;
    }
    const float* v = load_row(row, D, buf);
    for (int64_t i = 0; i < D; ++i) buf[D + i] = adv::init_value(v[i], coeff, init_mag, norm);
    store_row(row, buf + D, D);
  }
}

}  // namespace

namespace {

// Rows of example b of a slot: first row, row count and mask row (nullptr when packed).
struct ExampleRows {
  int64_t row0, n;
  const bool* mask;
};

ExampleRows example_rows(const AdvLayout& lay, const at::Tensor& mask, int64_t b) {
  if (lay.packed) {
    const int* cu = mask.data_ptr<int>();
    const int64_t a = cu[b], len = static_cast<int64_t>(cu[b + 1]) - a;
    return {a, std::max<int64_t>(0, std::min(len, lay.rows)), nullptr};
  }
  return {b * lay.rows, lay.rows, mask.data_ptr<bool>() + b * lay.rows};
}

// On the CPU the offsets can be read for free: refuse ones that would index outside the packed tensor.
void check_cu_values(const at::Tensor& cu, int64_t total, const char* op, const std::string& name) {
  const int* c = cu.data_ptr<int>();
  const int64_t B = cu.size(0) - 1;
  FASTVL_CHECK_ARG(c[0] == 0 && c[B] == total, op, name, "must run from 0 to the packed row count ", total,
                   ", got ", c[0], " ... ", c[B]);
  for (int64_t b = 0; b < B; ++b)
    FASTVL_CHECK_ARG(c[b] <= c[b + 1], op, name, "must be non-decreasing, got ", c[b], " then ", c[b + 1]);
}

}  // namespace

void adv_perturb_step_cpu(at::TensorList deltas, at::TensorList grads, at::TensorList masks, at::ArrayRef<double> lrs,
                          c10::string_view norm, at::ArrayRef<double> max_norms, at::IntArrayRef max_seqlens) {
  std::vector<AdvLayout> lay;
  const int code = check_adv_step_args(deltas, grads, masks, lrs, norm, max_norms, max_seqlens, &lay);
  const size_t n = deltas.size();
  if (n == 0) return;
  FASTVL_CHECK_ARG(deltas[0].device().is_cpu(), "adv_perturb_step", "deltas[0]",
                   "must be a CPU tensor for the cpu kernel, got ", deltas[0].device());
  std::vector<at::Tensor> g(n), m(n);
  std::vector<int64_t> first(n + 1, 0);  // global index of each slot's first example
  int64_t max_d = 1;
  for (size_t k = 0; k < n; ++k) {
    g[k] = grads[k].contiguous();
    m[k] = masks[k].contiguous();
    if (lay[k].packed)
      check_cu_values(m[k], deltas[k].size(0), "adv_perturb_step", "masks[" + std::to_string(k) + "]");
    first[k + 1] = first[k] + (lay[k].dim > 0 ? lay[k].batch : 0);
    max_d = std::max<int64_t>(max_d, lay[k].dim);
  }
  at::parallel_for(0, first[n], 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(3 * static_cast<size_t>(max_d));
    size_t k = 0;
    for (int64_t e = begin; e < end; ++e) {
      while (e >= first[k + 1]) ++k;
      const at::Tensor& d = deltas[k];
      const int64_t D = lay[k].dim;
      const ExampleRows ex = example_rows(lay[k], m[k], e - first[k]);
      if (ex.n == 0) continue;
      FASTVL_DISPATCH_FLOAT_TYPES(d.scalar_type(), "adv_perturb", [&] {
        step_example(d.data_ptr<scalar_t>() + ex.row0 * D, g[k].data_ptr<scalar_t>() + ex.row0 * D, ex.mask, ex.n,
                     D, lrs[k], code, max_norms[k], buf.data());
      });
    }
  });
}

void adv_perturb_init_cpu(const at::Tensor& noise, const at::Tensor& mask, double init_mag, c10::string_view norm,
                          int64_t max_seqlen) {
  AdvLayout lay;
  const int code = check_adv_init_args(noise, mask, init_mag, norm, max_seqlen, &lay);
  FASTVL_CHECK_ARG(noise.device().is_cpu(), "adv_perturb_init", "noise",
                   "must be a CPU tensor for the cpu kernel, got ", noise.device());
  if (noise.numel() == 0) return;
  const auto m = mask.contiguous();
  if (lay.packed) check_cu_values(m, noise.size(0), "adv_perturb_init", "mask");
  const int64_t D = lay.dim;
  FASTVL_DISPATCH_FLOAT_TYPES(noise.scalar_type(), "adv_perturb", [&] {
    scalar_t* x = noise.data_ptr<scalar_t>();
    at::parallel_for(0, lay.batch, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> buf(2 * static_cast<size_t>(D));
      for (int64_t b = begin; b < end; ++b) {
        const ExampleRows ex = example_rows(lay, m, b);
        init_example(x + ex.row0 * D, ex.mask, ex.n, D, static_cast<float>(init_mag), code, buf.data());
      }
    });
  });
}

TORCH_LIBRARY_IMPL(fastvl, CPU, m) {
  m.impl("adv_perturb_step_kernel", &adv_perturb_step_cpu);
  m.impl("adv_perturb_init_kernel", &adv_perturb_init_cpu);
}

}  // namespace fastvl
