// CPU SPADE normalisation: at::parallel_for over statistic groups (channels for batch norm, planes for instance
// norm). Per group, the forward reads x twice for the statistics (mean, then the squared deviations: two-pass, so no
// cancellation) and once more with gamma and beta for the output; the backward reads dy, x, gamma once for the
// group sums (writing d_gamma, d_beta on the way) and once more for dx. Statistics are float32 from float64 group
// sums of float32 lane partials, whatever the input dtype; bf16 / fp16 are converted per element.
#include "spade_norm/spade_norm.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <array>

#include "fastvl/check.h"
#include "fastvl/dispatch.h"
#include "fastvl/spade_math.h"

namespace fastvl {
namespace {

constexpr const char* kOp = "spade_norm";

SpadeLayout layout_of(const at::Tensor& x, bool instance) {
  const int64_t n = x.size(0), c = x.size(1), hw = x.size(2) * x.size(3);
  if (instance) return SpadeLayout{n * c, 1, hw, hw, 0};
  return SpadeLayout{c, n, hw, hw, c * hw};
}

void check_nchw(const at::Tensor& x, const at::Tensor& t, const char* name) {
  FASTVL_CHECK_ARG(t.sizes() == x.sizes(), kOp, name, "must have the shape of 'x' ", x.sizes(), ", got ", t.sizes());
  FASTVL_CHECK_ARG(t.scalar_type() == x.scalar_type(), kOp, name, "must have the dtype of 'x' (", x.scalar_type(),
                   "), got ", t.scalar_type());
  FASTVL_CHECK_SAME_DEVICE(x, t, kOp, "x", name);
}

void check_stat(const at::Tensor& x, const at::Tensor& t, int64_t groups, const char* name) {
  FASTVL_CHECK_DTYPE(t, kOp, name, at::kFloat);
  FASTVL_CHECK_ARG(t.dim() == 1 && t.size(0) == groups, kOp, name, "must have shape [G] = [", groups, "], got ",
                   t.sizes());
  FASTVL_CHECK_SAME_DEVICE(x, t, kOp, "x", name);
}

void check_x(const at::Tensor& x, double eps) {
  FASTVL_CHECK_DIM(x, kOp, "x", 4);
  FASTVL_CHECK_ARG(is_float_type(x.scalar_type()), kOp, "x", "must be float32, bfloat16 or float16, got ",
                   x.scalar_type());
  FASTVL_CHECK_ARG(eps > 0.0, kOp, "eps", "must be > 0, got ", eps);
}

}  // namespace

SpadeLayout check_spade_fwd_args(const at::Tensor& x, const at::Tensor& gamma, const at::Tensor& beta,
                                 const std::optional<at::Tensor>& mean, const std::optional<at::Tensor>& var,
                                 bool instance, double eps) {
  check_x(x, eps);
  check_nchw(x, gamma, "gamma");
  check_nchw(x, beta, "beta");
  const SpadeLayout lay = layout_of(x, instance);
  FASTVL_CHECK_ARG(mean.has_value() == var.has_value(), kOp, mean.has_value() ? "var" : "mean",
                   "must be given together with '", mean.has_value() ? "mean" : "var", "'");
  if (mean.has_value()) {
    check_stat(x, *mean, lay.groups, "mean");
    check_stat(x, *var, lay.groups, "var");
  }
  return lay;
}

SpadeLayout check_spade_bwd_args(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& gamma,
                                 const at::Tensor& mean, const at::Tensor& var, bool instance, double eps) {
  check_x(x, eps);
  check_nchw(x, dy, "dout");
  check_nchw(x, gamma, "gamma");
  const SpadeLayout lay = layout_of(x, instance);
  check_stat(x, mean, lay.groups, "mean");
  check_stat(x, var, lay.groups, "var");
  return lay;
}

namespace {

constexpr int64_t kLanes = 8;     // independent float accumulators (vectorisable, short dependency chains)
constexpr int64_t kChunk = 1024;  // elements summed in float before the float64 group total

// Sums f(i) = {u, v} over i in [0, n): float lanes within chunks of kChunk, float64 across chunks. f is called
// exactly once per i, in order within a lane (it may write outputs as a side effect).
template <typename F>
std::array<double, 2> chunked_sum2(int64_t n, F f) {
  std::array<double, 2> total{0.0, 0.0};
  for (int64_t c0 = 0; c0 < n; c0 += kChunk) {
    const int64_t m = std::min(kChunk, n - c0);
    std::array<float, kLanes> lu{}, lv{};
    int64_t i = 0;
    for (; i + kLanes <= m; i += kLanes) {
      for (int64_t l = 0; l < kLanes; ++l) {
        const std::array<float, 2> uv = f(c0 + i + l);
        lu[l] += uv[0];
        lv[l] += uv[1];
      }
    }
    double su = 0.0, sv = 0.0;
    for (; i < m; ++i) {
      const std::array<float, 2> uv = f(c0 + i);
      su += uv[0];
      sv += uv[1];
    }
    for (int64_t l = 0; l < kLanes; ++l) {
      su += lu[l];
      sv += lv[l];
    }
    total[0] += su;
    total[1] += sv;
  }
  return total;
}

template <typename scalar_t>
inline float ld(const scalar_t* p, int64_t i) {
  return static_cast<float>(p[i]);
}

// Grain of the parallel loop over groups: about 64K elements per task.
int64_t grain(const SpadeLayout& lay) {
  return std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, lay.segments * lay.hw));
}

template <typename scalar_t>
void forward_groups(const SpadeLayout& lay, const scalar_t* x, const scalar_t* gamma, const scalar_t* beta,
                    scalar_t* out, float* mean, float* var, bool use_input_stats, float eps) {
  at::parallel_for(0, lay.groups, grain(lay), [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      const int64_t base = g * lay.group_stride;
      if (use_input_stats) {
        const double count = static_cast<double>(lay.segments * lay.hw);
        double sum = 0.0;
        for (int64_t s = 0; s < lay.segments; ++s) {
          const scalar_t* xs = x + base + s * lay.seg_stride;
          sum += chunked_sum2(lay.hw, [&](int64_t i) { return std::array<float, 2>{ld(xs, i), 0.0f}; })[0];
        }
        const double mu = sum / count;
        const float muf = static_cast<float>(mu);
        // Deviations from the float mean and their squares; M2 corrected by the mean's own rounding (two-pass).
        double dev = 0.0, m2 = 0.0;
        for (int64_t s = 0; s < lay.segments; ++s) {
          const scalar_t* xs = x + base + s * lay.seg_stride;
          const std::array<double, 2> dd = chunked_sum2(lay.hw, [&](int64_t i) {
            const float d = ld(xs, i) - muf;
            return std::array<float, 2>{d, d * d};
          });
          dev += dd[0];
          m2 += dd[1];
        }
        const spade::Moments<double> mom{count, mu, std::max(0.0, m2 - dev * dev / count)};
        mean[g] = static_cast<float>(mom.mean);
        var[g] = static_cast<float>(spade::biased_var(mom));
      }
      const float mu = mean[g];
      const float r = spade::rstd(var[g], eps);
      for (int64_t s = 0; s < lay.segments; ++s) {
        const int64_t off = base + s * lay.seg_stride;
        const scalar_t *xs = x + off, *gs = gamma + off, *bs = beta + off;
        scalar_t* os = out + off;
        for (int64_t i = 0; i < lay.hw; ++i)
          os[i] = static_cast<scalar_t>(spade::modulate(ld(xs, i), mu, r, ld(gs, i), ld(bs, i)));
      }
    }
  });
}

template <typename scalar_t>
void backward_groups(const SpadeLayout& lay, const scalar_t* dy, const scalar_t* x, const scalar_t* gamma,
                     const float* mean, const float* var, scalar_t* dx, scalar_t* dgamma, scalar_t* dbeta,
                     bool use_input_stats, float eps) {
  at::parallel_for(0, lay.groups, grain(lay), [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      const int64_t base = g * lay.group_stride;
      const float mu = mean[g];
      const float r = spade::rstd(var[g], eps);
      double sa = 0.0, sb = 0.0;
      for (int64_t s = 0; s < lay.segments; ++s) {
        const int64_t off = base + s * lay.seg_stride;
        const scalar_t *dys = dy + off, *xs = x + off, *gs = gamma + off;
        scalar_t *dgs = dgamma + off, *dbs = dbeta + off;
        const std::array<double, 2> ab = chunked_sum2(lay.hw, [&](int64_t i) {
          const float d = ld(dys, i);
          const float xh = (ld(xs, i) - mu) * r;
          const float dxh = d * (1.0f + ld(gs, i));
          dgs[i] = static_cast<scalar_t>(d * xh);
          dbs[i] = dys[i];
          return std::array<float, 2>{dxh, dxh * xh};
        });
        sa += ab[0];
        sb += ab[1];
      }
      const double count = static_cast<double>(lay.segments * lay.hw);
      const float a = static_cast<float>(sa / count), b = static_cast<float>(sb / count);
      for (int64_t s = 0; s < lay.segments; ++s) {
        const int64_t off = base + s * lay.seg_stride;
        const scalar_t *dys = dy + off, *xs = x + off, *gs = gamma + off;
        scalar_t* dxs = dx + off;
        for (int64_t i = 0; i < lay.hw; ++i) {
          const float dxh = ld(dys, i) * (1.0f + ld(gs, i));
          dxs[i] = static_cast<scalar_t>(spade::grad_x(dxh, (ld(xs, i) - mu) * r, r, a, b, use_input_stats));
        }
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> spade_norm_fwd_cpu(const at::Tensor& x_, const at::Tensor& gamma_,
                                                                  const at::Tensor& beta_,
                                                                  const std::optional<at::Tensor>& mean_,
                                                                  const std::optional<at::Tensor>& var_,
                                                                  bool instance, double eps) {
  const SpadeLayout lay = check_spade_fwd_args(x_, gamma_, beta_, mean_, var_, instance, eps);
  FASTVL_CHECK_ARG(x_.device().is_cpu(), kOp, "x", "must be a CPU tensor for the cpu kernel, got ", x_.device());
  const at::Tensor x = x_.contiguous(), gamma = gamma_.contiguous(), beta = beta_.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options());
  const bool use_input_stats = !mean_.has_value();
  at::Tensor mean = use_input_stats ? at::empty({lay.groups}, x.options().dtype(at::kFloat)) : mean_->clone();
  at::Tensor var = use_input_stats ? at::empty({lay.groups}, x.options().dtype(at::kFloat)) : var_->clone();
  mean = mean.contiguous();
  var = var.contiguous();
  if (x.numel() == 0) return {out, mean, var};
  FASTVL_DISPATCH_FLOAT_TYPES(x.scalar_type(), kOp, [&] {
    forward_groups<scalar_t>(lay, x.data_ptr<scalar_t>(), gamma.data_ptr<scalar_t>(), beta.data_ptr<scalar_t>(),
                             out.data_ptr<scalar_t>(), mean.data_ptr<float>(), var.data_ptr<float>(), use_input_stats,
                             static_cast<float>(eps));
  });
  return {out, mean, var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> spade_norm_bwd_cpu(const at::Tensor& dy_, const at::Tensor& x_,
                                                                  const at::Tensor& gamma_, const at::Tensor& mean_,
                                                                  const at::Tensor& var_, bool instance,
                                                                  bool use_input_stats, double eps) {
  const SpadeLayout lay = check_spade_bwd_args(dy_, x_, gamma_, mean_, var_, instance, eps);
  FASTVL_CHECK_ARG(x_.device().is_cpu(), kOp, "x", "must be a CPU tensor for the cpu kernel, got ", x_.device());
  const at::Tensor dy = dy_.contiguous(), x = x_.contiguous(), gamma = gamma_.contiguous();
  const at::Tensor mean = mean_.contiguous(), var = var_.contiguous();
  at::Tensor dx = at::empty(x.sizes(), x.options());
  at::Tensor dgamma = at::empty(x.sizes(), x.options());
  at::Tensor dbeta = at::empty(x.sizes(), x.options());
  if (x.numel() == 0) return {dx, dgamma, dbeta};
  FASTVL_DISPATCH_FLOAT_TYPES(x.scalar_type(), kOp, [&] {
    backward_groups<scalar_t>(lay, dy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), gamma.data_ptr<scalar_t>(),
                              mean.data_ptr<float>(), var.data_ptr<float>(), dx.data_ptr<scalar_t>(),
                              dgamma.data_ptr<scalar_t>(), dbeta.data_ptr<scalar_t>(), use_input_stats,
                              static_cast<float>(eps));
  });
  return {dx, dgamma, dbeta};
}

TORCH_LIBRARY_IMPL(fastvl, CPU, m) {
  m.impl("spade_norm_fwd_kernel", &spade_norm_fwd_cpu);
  m.impl("spade_norm_bwd_kernel", &spade_norm_bwd_cpu);
}

}  // namespace fastvl
