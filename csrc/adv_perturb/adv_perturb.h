// Embedding-space adversarial perturbation (VILLA / FreeLB): the fused ascent step and the scaled random init.
// Math: csrc/include/fastvl/adv_math.h. Python API and reference: fastvl/ops/adv_perturb.py.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

namespace fastvl {

// In place, for every slot k (text and image deltas in one call): deltas[k], grads[k] [B_k, L_k, D_k] of one float
// dtype per slot, masks[k] bool [B_k, L_k] (true = valid), lrs[k] >= 0, max_norms[k] >= 0 (0 = no projection);
// norm "l2" or "linf". Padding positions of every delta are written as 0.
void adv_perturb_step_cpu(at::TensorList deltas, at::TensorList grads, at::TensorList masks, at::ArrayRef<double> lrs,
                          c10::string_view norm, at::ArrayRef<double> max_norms);
// In place: noise [B, L, D] (uniform [-1, 1] or standard normal) becomes the scaled, masked init.
void adv_perturb_init_cpu(const at::Tensor& noise, const at::Tensor& mask, double init_mag, c10::string_view norm);
#ifdef FASTVL_WITH_CUDA
void adv_perturb_step_cuda(at::TensorList deltas, at::TensorList grads, at::TensorList masks,
                           at::ArrayRef<double> lrs, c10::string_view norm, at::ArrayRef<double> max_norms);
void adv_perturb_init_cuda(const at::Tensor& noise, const at::Tensor& mask, double init_mag, c10::string_view norm);
#endif

// Shared argument checks (same messages for every device). Return the norm code (adv::kL2 / adv::kLinf).
int check_adv_step_args(at::TensorList deltas, at::TensorList grads, at::TensorList masks, at::ArrayRef<double> lrs,
                        c10::string_view norm, at::ArrayRef<double> max_norms);
int check_adv_init_args(const at::Tensor& noise, const at::Tensor& mask, double init_mag, c10::string_view norm);

}  // namespace fastvl
