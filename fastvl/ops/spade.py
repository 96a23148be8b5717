"""SPADE normalisation (BachGAN / SPADE generator): parameter-free normalisation, then spatial modulation.

    x_hat = (x - mean) / sqrt(var + eps)
    out   = x_hat * (1 + gamma) + beta

with x, gamma, beta all [N, C, H, W] (gamma and beta come from SPADE's conv head on the resized layout map).

- ``norm='batch'`` (SPADE's default, ``spectralspadesyncbatch3x3``: synchronized BatchNorm without affine). In
  training, mean and biased variance over N, H, W per channel; running buffers, when given, are updated in place
  as ``F.batch_norm`` does: ``running = (1 - momentum) running + momentum stat`` with the UNBIASED variance for
  ``running_var``. With ``training=False`` the running statistics normalise (they are required then) and the
  gradient of x is elementwise. (Multi-GPU synchronisation of the statistics is not part of this op.)
- ``norm='instance'``: mean and biased variance over H, W per (n, c), always from the input (InstanceNorm2d
  without running statistics); running buffers must be None.

Statistics are float32 under bf16 / fp16 inputs (float64 in the reference for float64 inputs); the output and the
gradients have the inputs' dtype.

Backends (``fastvl.ops.spade.SPADE_NORM``): ``triton`` (GPU; one program per statistic group when it fits, else a
deterministic two-phase reduction, see ``fastvl/kernels/triton/spade.py``), ``cpu`` (C++ in fastvl._C,
``csrc/spade_norm/``: at::parallel_for over the statistic groups, two-pass float64-accumulated statistics) and
``reference`` (the PyTorch function below; any device and dtype). The module is not named after the function
(``fastvl.ops.spade_norm`` is the function; see ``fastvl/ops/__init__.py``).
"""

from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F

from . import _dispatch as D

__all__ = ["NORMS", "SPADE_NORM", "spade_norm", "spade_norm_reference"]

_OP = "spade_norm"
NORMS = ("batch", "instance")
FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ----------------------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------------------


def spade_norm_reference(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, norm: str = "batch",
                         eps: float = 1e-5, running_mean: torch.Tensor | None = None,
                         running_var: torch.Tensor | None = None, momentum: float = 0.1,
                         training: bool = True) -> torch.Tensor:
    """Plain PyTorch: ``F.batch_norm`` / ``F.instance_norm`` without affine, then ``x_hat * (1 + gamma) + beta``.

    Args:
        x, gamma, beta: [N, C, H, W] (computed in float32, or float64 when x is float64).
        norm: 'batch' or 'instance'. eps: added to the variance.
        running_mean, running_var: [C] buffers (batch norm only), updated in place in training; read in eval.
        momentum: running-statistics update factor. training: batch statistics (True) or running ones (False).
    Returns:
        [N, C, H, W] in x's dtype.
    """
    ct = torch.promote_types(x.dtype, torch.float32)
    xc = x.to(ct)
    if norm == "instance":
        x_hat = F.instance_norm(xc, eps=eps)
    else:
        rm = None if running_mean is None else running_mean.to(ct)
        rv = None if running_var is None else running_var.to(ct)
        x_hat = F.batch_norm(xc, rm, rv, training=training, momentum=momentum, eps=eps)
        for buf, work in ((running_mean, rm), (running_var, rv)):
            if buf is not None and work is not buf:
                buf.copy_(work)
    return (x_hat * (1 + gamma.to(ct)) + beta.to(ct)).to(x.dtype)


# ----------------------------------------------------------------------------------------------------------
# Backends
# ----------------------------------------------------------------------------------------------------------

SPADE_NORM = D.register_op("spade_norm", ["triton", "cpu", "reference"],
                           doc="SPADE: parameter-free batch / instance norm, then x_hat * (1 + gamma) + beta")


@SPADE_NORM.backend("reference", doc="F.batch_norm / F.instance_norm + modulation in PyTorch (any device, dtype)")
def _reference_supports(x, gamma, beta, norm, training) -> D.Reasons:
    return []


@SPADE_NORM.backend("triton", doc="Triton: one program per statistic group, or a two-phase reduction; fwd + bwd")
def _triton_supports(x, gamma, beta, norm, training) -> D.Reasons:
    why = D.triton_reasons(x) + D.needs_dtype(x, FUSED_DTYPES)
    if x.device.type == "cpu" and x.dtype != torch.float32:
        why.append("the Triton interpreter computes in float32 only")
    return why


@SPADE_NORM.backend("cpu", doc="C++ (fastvl._C), parallel over statistic groups, fp32 statistics; fwd + bwd")
def _cpu_supports(x, gamma, beta, norm, training) -> D.Reasons:
    return D.needs_device(x, "cpu") + D.needs_dtype(x, FUSED_DTYPES) + D.needs_extension("spade_norm_fwd_kernel")


def _example(device: str, dtype: torch.dtype) -> tuple[tuple, dict]:
    """BachGAN's first SPADE ResBlock on Cityscapes: batch 8, 1024 channels, the 8 x 4 latent grid x 2."""
    x = torch.empty(8, 1024, 16, 8, device=device, dtype=dtype)
    return (x, x, x, "batch", True), {}


SPADE_NORM.example = _example


# ----------------------------------------------------------------------------------------------------------
# Fused backends: one torch.library op pair + one autograd formula; the backend name is an argument
# ----------------------------------------------------------------------------------------------------------


def _fused_forward(backend, x, gamma, beta, running_mean, running_var, instance, use_input_stats, eps):
    mean, var = (None, None) if use_input_stats else (running_mean, running_var)
    if backend == "cpu":
        if mean is not None:
            mean, var = mean.to(torch.float32).contiguous(), var.to(torch.float32).contiguous()
        return torch.ops.fastvl.spade_norm_fwd_kernel(x, gamma, beta, mean, var, instance, eps)
    if backend != "triton":
        raise AssertionError(f"unhandled backend {backend!r}")
    from ..kernels.triton.spade import spade_norm_fwd_triton

    return spade_norm_fwd_triton(x.contiguous(), gamma.contiguous(), beta.contiguous(), mean, var, instance, eps)


def _fused_backward(backend, dout, x, gamma, mean, var, instance, use_input_stats, eps):
    if backend == "cpu":
        return torch.ops.fastvl.spade_norm_bwd_kernel(dout, x, gamma, mean, var, instance, use_input_stats, eps)
    if backend != "triton":
        raise AssertionError(f"unhandled backend {backend!r}")
    from ..kernels.triton.spade import spade_norm_bwd_triton

    return spade_norm_bwd_triton(dout.contiguous(), x.contiguous(), gamma.contiguous(), mean, var, instance,
                                 use_input_stats, eps)


def _groups(x: torch.Tensor, instance: bool) -> int:
    return x.shape[0] * x.shape[1] if instance else x.shape[1]


@torch.library.custom_op("fastvl::spade_norm_fwd", mutates_args=())
def _spade_fwd_op(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, running_mean: torch.Tensor | None,
                  running_var: torch.Tensor | None, instance: bool, use_input_stats: bool, eps: float, backend: str
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out [N, C, H, W], mean [G] float32, biased var [G] float32); G = C (batch) or N C (instance)."""
    return _fused_forward(backend, x, gamma, beta, running_mean, running_var, instance, use_input_stats, eps)


@_spade_fwd_op.register_fake
def _(x, gamma, beta, running_mean, running_var, instance, use_input_stats, eps, backend):
    g = _groups(x, instance)
    stat = x.new_empty((g,), dtype=torch.float32)
    return torch.empty_like(x, memory_format=torch.contiguous_format), stat, torch.empty_like(stat)


@torch.library.custom_op("fastvl::spade_norm_bwd", mutates_args=())
def _spade_bwd_op(dout: torch.Tensor, x: torch.Tensor, gamma: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
                  instance: bool, use_input_stats: bool, eps: float, backend: str
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d_x, d_gamma, d_beta), each [N, C, H, W]."""
    return _fused_backward(backend, dout, x, gamma, mean, var, instance, use_input_stats, eps)


@_spade_bwd_op.register_fake
def _(dout, x, gamma, mean, var, instance, use_input_stats, eps, backend):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (x, gamma, gamma))


# The autograd formula: save x, gamma and the statistics; the backward is the backend's. ``bwd`` is the library op
# under torch.compile and the plain function in eager mode.
_NO_GRAD = (None,) * 6


def _save(ctx, inputs, mean, var) -> None:
    x, gamma, _beta, _rm, _rv, instance, use_input_stats, eps, backend = inputs
    ctx.save_for_backward(x, gamma, mean, var)
    ctx.meta = (instance, use_input_stats, eps, backend)


def _grads(ctx, dout, bwd) -> tuple:
    x, gamma, mean, var = ctx.saved_tensors
    instance, use_input_stats, eps, backend = ctx.meta
    if bwd is _fused_backward:
        dx, dgamma, dbeta = bwd(backend, dout, x, gamma, mean, var, instance, use_input_stats, eps)
    else:
        dx, dgamma, dbeta = bwd(dout, x, gamma, mean, var, instance, use_input_stats, eps, backend)
    return dx, dgamma, dbeta, *_NO_GRAD


def _setup_context(ctx, inputs, output) -> None:
    _save(ctx, inputs, output[1], output[2])


def _backward(ctx, dout, _dmean, _dvar):
    return _grads(ctx, dout, _spade_bwd_op)


_spade_fwd_op.register_autograd(_backward, setup_context=_setup_context)


class _FusedSpadeNorm(torch.autograd.Function):
    """Eager-mode entry to the same formula (less Python per call than the library op); torch.compile traces the
    library op instead."""

    @staticmethod
    def forward(ctx, *inputs):
        out, mean, var = _fused_forward(inputs[-1], *inputs[:-1])
        _save(ctx, inputs, mean, var)
        ctx.mark_non_differentiable(mean, var)
        return out, mean, var

    @staticmethod
    def backward(ctx, dout, _dmean, _dvar):
        return _grads(ctx, dout, _fused_backward)


# ----------------------------------------------------------------------------------------------------------
# Validation and the public function
# ----------------------------------------------------------------------------------------------------------


def _err(name: str, msg: str) -> str:
    return f"fastvl.ops.{_OP}: argument '{name}' {msg}"


def _check(x, gamma, beta, norm, eps, running_mean, running_var, momentum, training) -> None:
    if norm not in NORMS:
        raise ValueError(_err("norm", f"must be one of {list(NORMS)}, got {norm!r}"))
    for name, t in (("x", x), ("gamma", gamma), ("beta", beta)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(_err(name, f"must be a tensor [N, C, H, W], got {type(t).__name__}"))
    if x.dim() != 4:
        raise ValueError(_err("x", f"must be 4-d [N, C, H, W], got shape {list(x.shape)}"))
    if not x.is_floating_point():
        raise TypeError(_err("x", f"must be a float tensor, got {x.dtype}"))
    for name, t in (("gamma", gamma), ("beta", beta)):
        if t.shape != x.shape:
            raise ValueError(_err(name, f"must have the shape of 'x' {list(x.shape)}, got {list(t.shape)}"))
        if t.dtype != x.dtype:
            raise TypeError(_err(name, f"must have the dtype of 'x' ({x.dtype}), got {t.dtype}"))
        if t.device != x.device:
            raise ValueError(_err(name, f"is on {t.device} but 'x' is on {x.device}; all inputs must be on one device"))
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not eps > 0:
        raise ValueError(_err("eps", f"must be a number > 0, got {eps!r}"))
    if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real) or not 0 <= momentum <= 1:
        raise ValueError(_err("momentum", f"must be a number in [0, 1], got {momentum!r}"))
    if not isinstance(training, bool):
        raise TypeError(_err("training", f"must be a bool, got {type(training).__name__}"))
    buffers = (("running_mean", running_mean), ("running_var", running_var))
    if norm == "instance":
        for name, t in buffers:
            if t is not None:
                raise ValueError(_err(name, "must be None with norm='instance' (instance statistics always come "
                                            "from the input)"))
    else:
        given = [name for name, t in buffers if t is not None]
        if len(given) == 1:
            missing = "running_var" if given[0] == "running_mean" else "running_mean"
            raise ValueError(_err(missing, f"must be given together with '{given[0]}'"))
        if not training and not given:
            raise ValueError(_err("running_mean", "and 'running_var' are required with training=False (the running "
                                                  "statistics normalise in eval)"))
        for name, t in buffers:
            if t is None:
                continue
            if not isinstance(t, torch.Tensor):
                raise TypeError(_err(name, f"must be a tensor [C] or None, got {type(t).__name__}"))
            if tuple(t.shape) != (x.shape[1],):
                raise ValueError(_err(name, f"must have shape [C] = [{x.shape[1]}], got {list(t.shape)}"))
            if not t.is_floating_point():
                raise TypeError(_err(name, f"must be a float tensor, got {t.dtype}"))
            if t.device != x.device:
                raise ValueError(_err(name, f"is on {t.device} but 'x' is on {x.device}"))
    reduced = x.shape[2] * x.shape[3] * (1 if norm == "instance" else x.shape[0])
    if (training or norm == "instance") and reduced <= 1:
        over = "H x W" if norm == "instance" else "N x H x W"
        raise ValueError(_err("x", f"needs more than 1 value per statistic ({over}) to normalise with input "
                                   f"statistics, got shape {list(x.shape)}"))


def spade_norm(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, *, norm: str = "batch", eps: float = 1e-5,
               running_mean: torch.Tensor | None = None, running_var: torch.Tensor | None = None,
               momentum: float = 0.1, training: bool = True, backend: str | None = None) -> torch.Tensor:
    """SPADE normalisation: parameter-free ``norm`` of x, then ``x_hat * (1 + gamma) + beta`` (module docstring).

    Args:
        x: [N, C, H, W] float. gamma, beta: [N, C, H, W], x's dtype and device (the SPADE head's outputs).
        norm: 'batch' (SPADE's default) or 'instance'. eps: added to the variance (SPADE: 1e-5).
        running_mean, running_var: [C] float buffers on x's device, batch norm only; updated in place in training
            (unbiased variance for running_var, as ``F.batch_norm``), required and read with ``training=False``.
        momentum: running-statistics update factor (SPADE: 0.1). training: batch (True) or running statistics.
        backend: force a backend ('triton', 'cpu', 'reference'); default: the first that fits.
    Returns:
        [N, C, H, W] in x's dtype, differentiable w.r.t. x, gamma and beta.
    """
    _check(x, gamma, beta, norm, eps, running_mean, running_var, momentum, training)
    name = SPADE_NORM.select(x, gamma, beta, norm, training, backend=backend)
    if name == "reference":
        return spade_norm_reference(x, gamma, beta, norm, eps, running_mean, running_var, momentum, training)
    instance = norm == "instance"
    use_input_stats = instance or training
    rm, rv = (None, None) if use_input_stats else (running_mean, running_var)
    fused = (x, gamma, beta, rm, rv, instance, use_input_stats, float(eps), name)
    if torch.compiler.is_compiling():
        out, mean, var = _spade_fwd_op(*fused)
    else:
        out, mean, var = _FusedSpadeNorm.apply(*fused)
    if not instance and training and running_mean is not None:
        count = x.shape[0] * x.shape[2] * x.shape[3]
        with torch.no_grad():
            running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
            unbiased = var * (count / max(count - 1, 1))
            running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)
    return out
