// SPADE normalisation (BachGAN / SPADE generator): parameter-free batch / instance norm, then
// x_hat * (1 + gamma) + beta. Math: csrc/include/fastvl/spade_math.h. Python API and reference: fastvl/ops/spade.py.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace fastvl {

// Forward. x, gamma, beta: [N, C, H, W] of one float dtype (float32, bfloat16, float16); mean, var: float32 [G]
// running statistics (they normalise: eval) or both absent (statistics from x). G = C (batch norm: over N, H, W per
// channel) or N C (instance: over H, W per plane). Returns (out [N, C, H, W] contiguous in x's dtype, mean [G]
// float32, biased var [G] float32); copies of the given statistics in eval.
std::tuple<at::Tensor, at::Tensor, at::Tensor> spade_norm_fwd_cpu(const at::Tensor& x, const at::Tensor& gamma,
                                                                  const at::Tensor& beta,
                                                                  const std::optional<at::Tensor>& mean,
                                                                  const std::optional<at::Tensor>& var, bool instance,
                                                                  double eps);
// Backward. dy, x, gamma: [N, C, H, W]; mean, var: the forward's float32 [G]. use_input_stats: the statistics came
// from x (their gradient flows into dx). Returns (dx, d_gamma, d_beta), each [N, C, H, W] contiguous.
std::tuple<at::Tensor, at::Tensor, at::Tensor> spade_norm_bwd_cpu(const at::Tensor& dy, const at::Tensor& x,
                                                                  const at::Tensor& gamma, const at::Tensor& mean,
                                                                  const at::Tensor& var, bool instance,
                                                                  bool use_input_stats, double eps);

// The grouping of [N, C, H, W]: `groups` statistics, each over `segments` contiguous runs of `hw` elements; run s of
// group g starts at g * group_stride + s * seg_stride.
struct SpadeLayout {
  int64_t groups;
  int64_t segments;
  int64_t hw;
  int64_t group_stride;
  int64_t seg_stride;
};

// Shared argument checks (same messages for every device); returns the layout.
SpadeLayout check_spade_fwd_args(const at::Tensor& x, const at::Tensor& gamma, const at::Tensor& beta,
                                 const std::optional<at::Tensor>& mean, const std::optional<at::Tensor>& var,
                                 bool instance, double eps);
SpadeLayout check_spade_bwd_args(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& gamma,
                                 const at::Tensor& mean, const at::Tensor& var, bool instance, double eps);

}  // namespace fastvl
