// Embedding-space adversarial perturbation (VILLA / FreeLB): the fused ascent step and the scaled random init.
// Math: csrc/include/fastvl/adv_math.h. Python API and reference: fastvl/ops/adv_perturb.py.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <vector>

namespace fastvl {

// In place, for every slot k (text and image deltas in one call), deltas[k] and grads[k] of one float dtype per
// slot, in one of two layouts:
//   padded: [B_k, L_k, D_k] with masks[k] bool [B_k, L_k] (true = valid); padding positions are written as 0;
//   packed: [T_k, D_k] with masks[k] = cu_seqlens int32 [B_k + 1] and max_seqlens[k] >= every length (rows of an
//           example longer than max_seqlens[k] are not touched).
// lrs[k] >= 0, max_norms[k] >= 0 (0 = no projection); norm "l2" or "linf". max_seqlens[k] is ignored when padded.
void adv_perturb_step_cpu(at::TensorList deltas, at::TensorList grads, at::TensorList masks, at::ArrayRef<double> lrs,
                          c10::string_view norm, at::ArrayRef<double> max_norms, at::IntArrayRef max_seqlens);
// In place: noise (uniform [-1, 1] or standard normal) becomes the scaled, masked init. Layouts as above:
// [B, L, D] + bool mask [B, L], or [T, D] + cu_seqlens int32 [B + 1] with max_seqlen.
void adv_perturb_init_cpu(const at::Tensor& noise, const at::Tensor& mask, double init_mag, c10::string_view norm,
                          int64_t max_seqlen);
#ifdef FASTVL_WITH_CUDA
void adv_perturb_step_cuda(at::TensorList deltas, at::TensorList grads, at::TensorList masks,
                           at::ArrayRef<double> lrs, c10::string_view norm, at::ArrayRef<double> max_norms,
                           at::IntArrayRef max_seqlens);
void adv_perturb_init_cuda(const at::Tensor& noise, const at::Tensor& mask, double init_mag, c10::string_view norm,
                           int64_t max_seqlen);
#endif

// One example's rows: padded example b = rows [b * L, b * L + L) with its mask row; packed example b = rows
// [cu[b], cu[b] + min(cu[b + 1] - cu[b], max_seqlen)), all valid.
struct AdvLayout {
  int64_t batch;    // B
  int64_t rows;     // L (padded) or max_seqlen (packed): rows per example at most
  int64_t dim;      // D
  bool packed;
};

// Shared argument checks (same messages for every device). Return the norm code (adv::kL2 / adv::kLinf) and
// fill each slot's layout.
int check_adv_step_args(at::TensorList deltas, at::TensorList grads, at::TensorList masks, at::ArrayRef<double> lrs,
                        c10::string_view norm, at::ArrayRef<double> max_norms, at::IntArrayRef max_seqlens,
                        std::vector<AdvLayout>* layouts);
int check_adv_init_args(const at::Tensor& noise, const at::Tensor& mask, double init_mag, c10::string_view norm,
                        int64_t max_seqlen, AdvLayout* layout);

}  // namespace fastvl
