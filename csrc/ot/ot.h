// Word-region alignment optimal transport: IPOT plan for a batch of (text, image) pairs.
#pragma once

#include <ATen/core/Tensor.h>

namespace fastvl {

// cost [B, N, M] float32 (already 0 at padded pairs), txt_pad [B, N] bool, img_pad [B, M] bool
// -> plan [B, N, M] float32 (0 at pads; an all-padding side gives an all-zero plan).
at::Tensor ipot_plan_cpu(const at::Tensor& cost, const at::Tensor& txt_pad, const at::Tensor& img_pad, double beta,
                         int64_t iterations, int64_t k);
#ifdef FASTVL_WITH_CUDA
at::Tensor ipot_plan_cuda(const at::Tensor& cost, const at::Tensor& txt_pad, const at::Tensor& img_pad, double beta,
                          int64_t iterations, int64_t k);
#endif

// Shared argument checks (same messages for every device).
void check_ipot_args(const at::Tensor& cost, const at::Tensor& txt_pad, const at::Tensor& img_pad, double beta,
                     int64_t iterations, int64_t k);

}  // namespace fastvl
