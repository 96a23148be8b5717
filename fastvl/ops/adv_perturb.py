"""Embedding-space adversarial perturbations (VILLA / FreeLB): the fused ascent step and the scaled random init.

VILLA perturbs the text word embeddings and the raw image region features with a delta of the padded input
shape [B, L, D]. After every adversarial backward pass the delta takes one normalised ascent step:

    n     = ||grad_b||                    per example b, over its valid positions x all dims
                                          (l2: sqrt of the sum of squares; linf: max |grad|)
    delta = delta + lr * grad / max(n, 1e-8)
    l2,   max_norm > 0:  delta_b *= max_norm / ||delta_b||_2   when ||delta_b||_2 > max_norm
    linf, max_norm > 0:  delta = clamp(delta, -max_norm, max_norm)

with padding positions written as exactly 0. The 1e-8 clamp of the norm is FreeLB's and VILLA's (a zero
gradient gives no update, never NaN). Upstream takes the norms over every position of the padded tensor;
fastvl takes them over the valid positions only and ignores whatever the padding holds (identical when the
gradient is 0 at padding, which it is for UNITER's masked embeddings, and robust when it is not).

Random init (FreeLB's scaled init; VILLA's default ``adv_init_mag = 0`` means a zero delta and no random draw):

    x     ~ U(-1, 1) (dist='uniform') or N(0, 1) (dist='normal'), drawn with ``generator``
    l2:   delta_b = x * init_mag / sqrt(n_valid_b * D)      (uniform: E||delta_b||^2 = init_mag^2 / 3)
    linf: delta   = clamp(x * init_mag, -init_mag, init_mag)
    and 0 at padding (an example without valid positions stays 0).

The noise is drawn by PyTorch (so every backend sees the same numbers for one generator state); the fused
op is the in-place scaling and masking.

Layouts: padded deltas [B, L, D] with a bool mask [B, L] (the drop-in UNITER interface), or packed deltas
[T, D] with ``cu_seqlens`` [B+1] and a Python-int ``max_seqlen`` (fastvl's native PackedVLBatch; every row of
an example is valid, no padding is stored). ``max_seqlen`` must be >= every length: the kernels size their
launch from it and leave rows of a longer example untouched (the CPU kernel also refuses offsets that run
outside the tensor; it can read them for free).

Backends (both ops): ``cuda`` (two-phase deterministic reduction: a block per chunk of rows, text and image
in one launch per phase), ``triton`` (the same scheme, both modalities in one launch), ``cpu`` (C++, OpenMP over
the examples of all modalities, each example cache-resident between its statistics and update passes) and
``reference`` (the PyTorch functions below). All compute in float32 (float64 in the reference when given
float64) and store in the delta's dtype.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch

from . import _dispatch as D
from .pack import check_cu_seqlens, padded_index

__all__ = [
    "DISTS",
    "NORMS",
    "NORM_EPS",
    "adv_perturb_init",
    "adv_perturb_init_reference",
    "adv_perturb_init_scale_reference",
    "adv_perturb_noise",
    "adv_perturb_step",
    "adv_perturb_init_scale_packed_reference",
    "adv_perturb_step_multi",
    "adv_perturb_step_packed",
    "adv_perturb_step_packed_reference",
    "adv_perturb_step_reference",
]

NORMS = ("l2", "linf")
DISTS = ("uniform", "normal")
NORM_EPS = 1e-8  # FreeLB / VILLA: the gradient norm is clamped below at 1e-8
FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# ----------------------------------------------------------------------------------------------------------
# Reference (the ground truth, and the fallback)
# ----------------------------------------------------------------------------------------------------------


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def adv_perturb_step_reference(delta: torch.Tensor, grad: torch.Tensor, mask: torch.Tensor, lr: float,
                               norm: str = "l2", max_norm: float = 0.0) -> torch.Tensor:
    """One VILLA ascent step in plain PyTorch (a new tensor; ``delta`` is not modified).

    Args:
        delta: [B, L, D] current perturbation (any float dtype; computed in float32, or float64 if given).
        grad: [B, L, D] gradient of the adversarial loss with respect to delta.
        mask: [B, L] bool, True at valid (non-padding) positions. Padding entries of delta and grad are ignored.
        lr: ascent step size. norm: 'l2' or 'linf'. max_norm: projection radius (0 = no projection).
    Returns:
        [B, L, D] updated delta in delta's dtype, exactly 0 at padding.
    """
    ct = _compute_dtype(delta.dtype)
    valid = mask[:, :, None]
    g = torch.where(valid, grad.to(ct), 0.0)
    d = torch.where(valid, delta.to(ct), 0.0)
    # (a zero column keeps the per-example max defined when an example has no entries at all)
    g_flat = torch.nn.functional.pad(g.flatten(1), (0, 1))
    gnorm = g_flat.norm(dim=1) if norm == "l2" else g_flat.abs().amax(dim=1)
    step = lr / gnorm.clamp_min(NORM_EPS)
    d = torch.where(valid, d + step[:, None, None] * g, 0.0)
    if max_norm > 0:
        if norm == "l2":
            dnorm = d.flatten(1).norm(dim=1)
            factor = torch.where(dnorm > max_norm, max_norm / dnorm, 1.0)
            d = d * factor[:, None, None]
        else:
            d = d.clamp(-max_norm, max_norm)
    return d.to(delta.dtype)


def adv_perturb_init_scale_reference(noise: torch.Tensor, mask: torch.Tensor, init_mag: float,
                                     norm: str = "l2") -> torch.Tensor:
    """The init's scaling and masking of raw noise (a new tensor).

    Args:
        noise: [B, L, D] raw noise, U(-1, 1) or N(0, 1). mask: [B, L] bool, True at valid positions.
        init_mag: FreeLB's ``adv_init_mag``. norm: 'l2' or 'linf'.
    Returns:
        [B, L, D] in noise's dtype: l2 ``x * init_mag / sqrt(n_valid * D)``, linf ``clamp(x * init_mag, ±init_mag)``,
        0 at padding.
    """
    ct = _compute_dtype(noise.dtype)
    valid = mask[:, :, None]
    x = torch.where(valid, noise.to(ct), 0.0)
    if norm == "l2":
        dims = mask.sum(1).to(ct) * noise.shape[2]
        x = x * (init_mag / dims.clamp_min(1).sqrt())[:, None, None]
    else:
        x = (x * init_mag).clamp(-init_mag, init_mag)
    return x.to(noise.dtype)


def adv_perturb_noise(shape: Sequence[int], dist: str = "uniform", generator: torch.Generator | None = None,
                      dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
    """Raw init noise of ``shape``: U(-1, 1) or N(0, 1) drawn with ``generator`` (shared by all backends)."""
    out = torch.empty(tuple(shape), dtype=dtype, device=device)
    return out.uniform_(-1.0, 1.0, generator=generator) if dist == "uniform" else out.normal_(generator=generator)


def adv_perturb_init_reference(shape: Sequence[int], mask: torch.Tensor, init_mag: float, dist: str = "uniform",
                               norm: str = "l2", generator: torch.Generator | None = None,
                               dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
    """The whole init in plain PyTorch: zeros when ``init_mag == 0`` (no random draw), else the scaled noise."""
    if init_mag == 0:
        return torch.zeros(tuple(shape), dtype=dtype, device=device)
    return adv_perturb_init_scale_reference(adv_perturb_noise(shape, dist, generator, dtype, device), mask,
                                            init_mag, norm)


def _padded_view(x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int):
    """Packed [T, D] -> (padded copy [B, max_seqlen, D], valid [B, max_seqlen], row index [B, max_seqlen])."""
    index, pad = padded_index(cu_seqlens, max_seqlen)
    return x[index], ~pad, index


def _scatter_rows(x: torch.Tensor, padded: torch.Tensor, valid: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """A copy of packed ``x`` [T, D] whose example rows are replaced by the valid rows of ``padded`` [B, L, D]."""
    buf = torch.cat([x, x.new_zeros(1, *x.shape[1:])])  # row T takes the padding slots, then is dropped
    dest = torch.where(valid, index, x.shape[0])
    return buf.index_copy(0, dest.flatten(), padded.flatten(0, 1).to(x.dtype))[:-1]


def adv_perturb_step_packed_reference(delta: torch.Tensor, grad: torch.Tensor, cu_seqlens: torch.Tensor,
                                      max_seqlen: int, lr: float, norm: str = "l2",
                                      max_norm: float = 0.0) -> torch.Tensor:
    """:func:`adv_perturb_step_reference` on packed rows: delta, grad [T, D], cu_seqlens [B+1] -> new [T, D]."""
    if delta.shape[0] == 0:
        return delta.clone()
    d, valid, index = _padded_view(delta, cu_seqlens, max_seqlen)
    g = _padded_view(grad, cu_seqlens, max_seqlen)[0]
    return _scatter_rows(delta, adv_perturb_step_reference(d, g, valid, lr, norm, max_norm), valid, index)


def adv_perturb_init_scale_packed_reference(noise: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                                            init_mag: float, norm: str = "l2") -> torch.Tensor:
    """:func:`adv_perturb_init_scale_reference` on packed rows: noise [T, D], cu_seqlens [B+1] -> new [T, D]."""
    if noise.shape[0] == 0:
        return noise.clone()
    x, valid, index = _padded_view(noise, cu_seqlens, max_seqlen)
    return _scatter_rows(noise, adv_perturb_init_scale_reference(x, valid, init_mag, norm), valid, index)


# ----------------------------------------------------------------------------------------------------------
# Backends
# ----------------------------------------------------------------------------------------------------------

STEP = D.register_op("adv_perturb_step", ["cuda", "triton", "cpu", "reference"],
                     doc="VILLA adversarial delta step (masked norm, ascent, projection), all modalities at once")
INIT = D.register_op("adv_perturb_init", ["cuda", "triton", "cpu", "reference"],
                     doc="VILLA / FreeLB scaled random init of the adversarial delta")


def _dtype_reasons(tensors: Sequence[torch.Tensor]) -> D.Reasons:
    why: D.Reasons = []
    for t in tensors:
        why += [r for r in D.needs_dtype(t, FUSED_DTYPES) if r not in why]
    return why


def _triton_dtype_reasons(first: torch.Tensor, tensors: Sequence[torch.Tensor]) -> D.Reasons:
    if first.device.type == "cpu" and any(t.dtype != torch.float32 for t in tensors):
        return ["the Triton interpreter computes in float32 only"]
    return []


@STEP.backend("reference", doc="PyTorch, one modality after the other (any device, any float dtype)")
def _step_reference_supports(first, deltas, grads, masks, norm) -> D.Reasons:
    return []


@STEP.backend("cpu", doc="C++ kernel, OpenMP over the examples of every modality, two cache-resident passes")
def _step_cpu_supports(first, deltas, grads, masks, norm) -> D.Reasons:
    return D.needs_device(first, "cpu") + _dtype_reasons(deltas) + D.needs_extension("adv_perturb_step_kernel")


@STEP.backend("cuda", doc="CUDA kernels, deterministic two-phase reduction, all modalities in one launch per phase")
def _step_cuda_supports(first, deltas, grads, masks, norm) -> D.Reasons:
    return _dtype_reasons(deltas) + D.needs_cuda_kernels("adv_perturb_step_kernel", first)


@STEP.backend("triton", doc="Triton kernels, two-phase reduction, two modalities per launch")
def _step_triton_supports(first, deltas, grads, masks, norm) -> D.Reasons:
    return D.triton_reasons(first) + _dtype_reasons(deltas) + _triton_dtype_reasons(first, deltas)


@INIT.backend("reference", doc="PyTorch (any device, any float dtype)")
def _init_reference_supports(noise, mask, init_mag, norm) -> D.Reasons:
    return []


@INIT.backend("cpu", doc="C++ kernel, OpenMP over examples")
def _init_cpu_supports(noise, mask, init_mag, norm) -> D.Reasons:
    return D.needs_device(noise, "cpu") + _dtype_reasons([noise]) + D.needs_extension("adv_perturb_init_kernel")


@INIT.backend("cuda", doc="CUDA kernel, a block per chunk of rows")
def _init_cuda_supports(noise, mask, init_mag, norm) -> D.Reasons:
    return _dtype_reasons([noise]) + D.needs_cuda_kernels("adv_perturb_init_kernel", noise)


@INIT.backend("triton", doc="Triton kernel, a program per chunk of rows")
def _init_triton_supports(noise, mask, init_mag, norm) -> D.Reasons:
    return D.triton_reasons(noise) + _dtype_reasons([noise]) + _triton_dtype_reasons(noise, [noise])


def _step_impl(backend: str, deltas, grads, masks, lrs, norm, max_norms, max_seqlens) -> None:
    if backend == "reference":
        for d, g, m, lr, mx, ms in zip(deltas, grads, masks, lrs, max_norms, max_seqlens, strict=True):
            if d.dim() == 2:
                d.copy_(adv_perturb_step_packed_reference(d, g, m, ms, lr, norm, mx))
            else:
                d.copy_(adv_perturb_step_reference(d, g, m, lr, norm, mx))
        return
    work = [d if d.is_contiguous() else d.contiguous() for d in deltas]
    grads = [g.contiguous() for g in grads]
    masks = [m.to(torch.int32).contiguous() if d.dim() == 2 else m.contiguous() for d, m in zip(deltas, masks,
                                                                                                  strict=True)]
    if backend in ("cpu", "cuda"):
        torch.ops.fastvl.adv_perturb_step_kernel(work, grads, masks, list(lrs), norm, list(max_norms),
                                                 list(max_seqlens))
    elif backend == "triton":
        from ..kernels.triton.adv_perturb import adv_perturb_step_triton

        adv_perturb_step_triton(work, grads, masks, list(lrs), norm, list(max_norms), list(max_seqlens))
    else:
        raise AssertionError(f"unhandled backend {backend!r}")
    for d, w in zip(deltas, work, strict=True):
        if w is not d:
            d.copy_(w)


def _init_impl(backend: str, noise, mask, init_mag, norm, max_seqlen) -> None:
    if backend == "reference":
        if noise.dim() == 2:
            noise.copy_(adv_perturb_init_scale_packed_reference(noise, mask, max_seqlen, init_mag, norm))
        else:
            noise.copy_(adv_perturb_init_scale_reference(noise, mask, init_mag, norm))
        return
    work = noise if noise.is_contiguous() else noise.contiguous()
    mask = mask.to(torch.int32).contiguous() if noise.dim() == 2 else mask.contiguous()
    if backend in ("cpu", "cuda"):
        torch.ops.fastvl.adv_perturb_init_kernel(work, mask, init_mag, norm, max_seqlen)
    elif backend == "triton":
        from ..kernels.triton.adv_perturb import adv_perturb_init_triton

        adv_perturb_init_triton(work, mask, init_mag, norm, max_seqlen)
    else:
        raise AssertionError(f"unhandled backend {backend!r}")
    if work is not noise:
        noise.copy_(work)


@torch.library.custom_op("fastvl::adv_perturb_step", mutates_args=("deltas",))
def _step_op(deltas: list[torch.Tensor], grads: list[torch.Tensor], masks: list[torch.Tensor], lrs: list[float],
             norm: str, max_norms: list[float], max_seqlens: list[int], backend: str) -> None:
    _step_impl(backend, deltas, grads, masks, lrs, norm, max_norms, max_seqlens)


@_step_op.register_fake
def _(deltas, grads, masks, lrs, norm, max_norms, max_seqlens, backend):
    return None


@torch.library.custom_op("fastvl::adv_perturb_init_scale", mutates_args=("noise",))
def _init_op(noise: torch.Tensor, mask: torch.Tensor, init_mag: float, norm: str, max_seqlen: int,
             backend: str) -> None:
    _init_impl(backend, noise, mask, init_mag, norm, max_seqlen)


@_init_op.register_fake
def _(noise, mask, init_mag, norm, max_seqlen, backend):
    return None


# ----------------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------------


def _err(op: str, name: str, msg: str) -> str:
    return f"fastvl.ops.{op}: argument '{name}' {msg}"


def _check_norm(norm, op: str) -> None:
    if norm not in NORMS:
        raise ValueError(_err(op, "norm", f"must be one of {NORMS}, got {norm!r}"))


def _check_scalar(value, name: str, op: str, what: str = "must be a number >= 0") -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(_err(op, name, f"{what}, got {type(value).__name__}"))
    if not value >= 0 or math.isinf(value):
        raise ValueError(_err(op, name, f"{what}, got {value}"))
    return float(value)


def _check_mask(mask, name: str, shape: tuple[int, ...], src: str, device: torch.device, op: str) -> None:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(_err(op, name, f"must be a bool tensor [B, L], got {type(mask).__name__}"))
    if mask.dtype != torch.bool:
        raise TypeError(_err(op, name, f"must be a bool tensor (True = valid position), got {mask.dtype}"))
    if tuple(mask.shape) != shape[:2]:
        raise ValueError(_err(op, name, f"must have shape [B, L] = {list(shape[:2])} (from '{src}'), "
                                        f"got {list(mask.shape)}"))
    _check_device(mask, name, device, src, op)


def _check_device(t: torch.Tensor, name: str, device: torch.device, src: str, op: str) -> None:
    if t.device != device:
        raise ValueError(_err(op, name, f"is on {t.device} but '{src}' is on {device}; all inputs must be on "
                                        "one device"))


def _check_packed(cu, name: str, max_seqlen, seq_name: str, src: str, device: torch.device, op: str) -> int:
    """cu_seqlens of a packed delta (metadata only) and its Python-int max_seqlen."""
    if not isinstance(cu, torch.Tensor):
        raise TypeError(_err(op, name, f"must be a cu_seqlens tensor [B+1] for the packed '{src}', "
                                       f"got {type(cu).__name__}"))
    if cu.dtype == torch.bool:
        raise TypeError(_err(op, name, f"must be cu_seqlens (int32/int64 [B+1]) for the packed 2-d '{src}', got a "
                                       f"bool tensor of shape {list(cu.shape)} (masks go with padded 3-d tensors)"))
    check_cu_seqlens(cu, 0, name, op)
    _check_device(cu, name, device, src, op)
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, numbers.Integral) or max_seqlen < 0:
        raise ValueError(_err(op, seq_name, f"must be a Python int >= every length (from collate) for the packed "
                                            f"'{src}', got {max_seqlen!r}"))
    return int(max_seqlen)


def _check_step(deltas, grads, masks, lrs, norm, max_norms, max_seqlens, names, op: str
                ) -> tuple[list[float], list[float], list[int]]:
    _check_norm(norm, op)
    n = len(deltas)
    for name, seq in ((names["grads"], grads), (names["masks"], masks), (names["lrs"], lrs),
                      (names["max_norms"], max_norms), (names["max_seqlens"], max_seqlens)):
        if len(seq) != n:
            raise ValueError(_err(op, name, f"must have one entry per delta ({n}), got {len(seq)}"))
    lr_out, mx_out, seq_out = [], [], []
    for k in range(n):
        d, g, m = deltas[k], grads[k], masks[k]
        dn, gn, mn = names["delta"](k), names["grad"](k), names["mask"](k)
        if not isinstance(d, torch.Tensor):
            raise TypeError(_err(op, dn, f"must be a tensor [B, L, D] or [T, D], got {type(d).__name__}"))
        if d.dim() not in names["dims"]:
            raise ValueError(_err(op, dn, f"must be {names['shape']}, got shape {list(d.shape)}"))
        if not d.is_floating_point():
            raise TypeError(_err(op, dn, f"must be a float tensor, got {d.dtype}"))
        if not isinstance(g, torch.Tensor):
            raise TypeError(_err(op, gn, f"must be a tensor shaped like '{dn}', got {type(g).__name__}"))
        if g.shape != d.shape:
            raise ValueError(_err(op, gn, f"must have the shape of '{dn}' {list(d.shape)}, got {list(g.shape)}"))
        if g.dtype != d.dtype:
            raise TypeError(_err(op, gn, f"must have the dtype of '{dn}' ({d.dtype}), got {g.dtype}"))
        _check_device(g, gn, d.device, dn, op)
        _check_device(d, dn, deltas[0].device, names["delta"](0), op)
        if d.dim() == 3:
            _check_mask(m, mn, tuple(d.shape), dn, d.device, op)
            seq_out.append(d.shape[1])
        else:
            seq_out.append(_check_packed(m, mn, max_seqlens[k], names["max_seqlen"](k), dn, d.device, op))
        lr_out.append(_check_scalar(lrs[k], names["lr"](k), op))
        mx_out.append(_check_scalar(max_norms[k], names["max_norm"](k), op,
                                    "must be a number >= 0 (0 = no projection)"))
    return lr_out, mx_out, seq_out


def _names(single: bool, packed: bool) -> dict:
    if single:
        mask = "cu_seqlens" if packed else "mask"
        return dict(delta=lambda k: "delta", grad=lambda k: "grad", mask=lambda k: mask, lr=lambda k: "lr",
                    max_norm=lambda k: "max_norm", max_seqlen=lambda k: "max_seqlen", grads="grad", masks=mask,
                    lrs="lr", max_norms="max_norm", max_seqlens="max_seqlen", dims=(2,) if packed else (3,),
                    shape="2-d [T, D]" if packed else "3-d [B, L, D]")
    return dict(delta=lambda k: f"deltas[{k}]", grad=lambda k: f"grads[{k}]", mask=lambda k: f"masks[{k}]",
                lr=lambda k: f"lrs[{k}]", max_norm=lambda k: f"max_norms[{k}]",
                max_seqlen=lambda k: f"max_seqlens[{k}]", grads="grads", masks="masks", lrs="lrs",
                max_norms="max_norms", max_seqlens="max_seqlens", dims=(2, 3),
                shape="3-d [B, L, D] (padded) or 2-d [T, D] (packed)")


# ----------------------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------------------


def _step(deltas, grads, masks, lrs, norm, max_norms, max_seqlens, backend, names, op) -> list[torch.Tensor]:
    lrs, max_norms, max_seqlens = _check_step(deltas, grads, masks, lrs, norm, max_norms, max_seqlens, names, op)
    if not deltas:
        return []
    grads = [g.detach() for g in grads]
    name = STEP.select(deltas[0], deltas, grads, masks, norm, backend=backend)
    with torch.no_grad():
        _step_op(list(deltas), grads, list(masks), lrs, norm, max_norms, max_seqlens, name)
    return list(deltas)


def adv_perturb_step(delta: torch.Tensor, grad: torch.Tensor, mask: torch.Tensor, lr: float, norm: str = "l2",
                     max_norm: float = 0.0, *, backend: str | None = None) -> torch.Tensor:
    """One VILLA / FreeLB ascent step of a padded adversarial perturbation, in place (see the module docstring).

    Args:
        delta: [B, L, D] perturbation (float32, bfloat16 or float16 for the fused backends; any float for the
            reference). Updated in place, also when it is a leaf that requires grad (no autograd graph is built).
        grad: [B, L, D] gradient with respect to delta, same dtype and device.
        mask: [B, L] bool, True at valid (non-padding) positions.
        lr: ascent step size >= 0. norm: 'l2' or 'linf'. max_norm: projection radius >= 0 (0 = no projection).
        backend: force a backend (``reference``, ``cpu``, ``cuda``, ``triton``); default: the fastest that fits.
    Returns:
        ``delta`` itself, holding the updated perturbation (exactly 0 at padding).
    """
    return _step([delta], [grad], [mask], [lr], norm, [max_norm], [0], backend, _names(True, False),
                 "adv_perturb_step")[0]


def adv_perturb_step_packed(delta: torch.Tensor, grad: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                            lr: float, norm: str = "l2", max_norm: float = 0.0, *,
                            backend: str | None = None) -> torch.Tensor:
    """:func:`adv_perturb_step` on a packed perturbation (rows of example b: cu_seqlens[b] .. cu_seqlens[b+1]).

    Args:
        delta: [T, D] perturbation of all examples' rows concatenated; updated in place.
        grad: [T, D] its gradient. cu_seqlens: [B+1] int32/int64 cumulative lengths.
        max_seqlen: Python int >= every length (from collate; no host sync).
        lr, norm, max_norm, backend: as in :func:`adv_perturb_step`.
    Returns:
        ``delta`` itself.
    """
    return _step([delta], [grad], [cu_seqlens], [lr], norm, [max_norm], [max_seqlen], backend, _names(True, True),
                 "adv_perturb_step_packed")[0]


def adv_perturb_step_multi(deltas: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                           masks: Sequence[torch.Tensor], lrs: Sequence[float], norm: str = "l2",
                           max_norms: Sequence[float] | None = None, *, max_seqlens: Sequence[int] | None = None,
                           backend: str | None = None) -> list[torch.Tensor]:
    """:func:`adv_perturb_step` for several perturbations at once (VILLA: text and image) in one kernel launch.

    Args:
        deltas: k tensors, each padded [B_i, L_i, D_i] or packed [T_i, D_i] (e.g. text [B, L_txt, 768] and image
            [B, L_img, 2048]), all on one device.
        grads: their gradients, each with its delta's shape and dtype.
        masks: per delta, a bool [B_i, L_i] mask (True at valid positions) for a padded delta, or its cu_seqlens
            [B_i + 1] for a packed one.
        lrs: one step size per delta (VILLA: adv_lr_txt, adv_lr_img). norm: 'l2' or 'linf' for all.
        max_norms: one projection radius per delta (default: 0 = no projection for all).
        max_seqlens: per delta, the Python-int max length of a packed delta (required for packed ones, ignored for
            padded ones).
        backend: force a backend; default: the fastest that fits.
    Returns:
        ``list(deltas)``, each updated in place.
    """
    deltas, grads, masks, lrs = list(deltas), list(grads), list(masks), list(lrs)
    max_norms = [0.0] * len(deltas) if max_norms is None else list(max_norms)
    max_seqlens = [None] * len(deltas) if max_seqlens is None else list(max_seqlens)
    return _step(deltas, grads, masks, lrs, norm, max_norms, max_seqlens, backend, _names(False, False),
                 "adv_perturb_step_multi")


def adv_perturb_init(like: torch.Tensor | Sequence[int], mask: torch.Tensor, init_mag: float, dist: str = "uniform",
                     norm: str = "l2", generator: torch.Generator | None = None, *, max_seqlen: int | None = None,
                     dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                     backend: str | None = None) -> torch.Tensor:
    """Initial adversarial perturbation (FreeLB's scaled init; zeros when ``init_mag == 0``, as VILLA's default).

    Args:
        like: a tensor whose shape, dtype and device the result takes, or a shape: padded (B, L, D) or packed (T, D).
        mask: padded: [B, L] bool, True at valid positions (padding stays 0); packed: cu_seqlens [B+1].
        init_mag: FreeLB's ``adv_init_mag`` >= 0. dist: 'uniform' (U(-1, 1), FreeLB) or 'normal' (N(0, 1)).
        norm: 'l2' (scaled by init_mag / sqrt(n_valid * D)) or 'linf' (init_mag * noise clamped to ±init_mag).
        generator: torch.Generator for the noise (on the result's device); default: the global RNG.
        max_seqlen: packed only: Python int >= every length.
        dtype, device: of the result when ``like`` is a shape (default float32, mask's device).
        backend: force the scaling backend; default: the fastest that fits.
    Returns:
        a new tensor of ``like``'s shape (no grad).
    """
    op = "adv_perturb_init"
    if isinstance(like, torch.Tensor):
        shape = tuple(like.shape)
        dtype, device = dtype or like.dtype, torch.device(device) if device is not None else like.device
    else:
        try:
            shape = tuple(int(s) for s in like)
        except TypeError:
            raise TypeError(_err(op, "like", f"must be a tensor or a shape, got {type(like).__name__}")) from None
        dtype = dtype or torch.float32
        device = torch.device(device) if device is not None else (mask.device if isinstance(mask, torch.Tensor)
                                                                  else torch.device("cpu"))
    if len(shape) not in (2, 3) or any(s < 0 for s in shape):
        raise ValueError(_err(op, "like", f"must describe a padded [B, L, D] or packed [T, D] shape, got "
                                          f"{list(shape)}"))
    if not dtype.is_floating_point:
        raise TypeError(_err(op, "dtype", f"must be a float dtype, got {dtype}"))
    if len(shape) == 3:
        _check_mask(mask, "mask", shape, "like", device, op)
        max_seqlen = shape[1]
    else:
        max_seqlen = _check_packed(mask, "mask", max_seqlen, "max_seqlen", "like", device, op)
    init_mag = _check_scalar(init_mag, "init_mag", op)
    if dist not in DISTS:
        raise ValueError(_err(op, "dist", f"must be one of {DISTS}, got {dist!r}"))
    _check_norm(norm, op)
    if init_mag == 0:
        return torch.zeros(shape, dtype=dtype, device=device)
    noise = adv_perturb_noise(shape, dist, generator, dtype, device)
    name = INIT.select(noise, mask, init_mag, norm, backend=backend)
    _init_op(noise, mask, init_mag, norm, max_seqlen, name)
    return noise


def _step_example(device: str, dtype: torch.dtype) -> tuple[tuple, dict]:
    """VILLA base sizes for ``python -m fastvl.info``: text [32, 60, 768] and image [32, 100, 2048]."""
    txt = torch.empty(32, 60, 768, device=device, dtype=dtype)
    img = torch.empty(32, 100, 2048, device=device, dtype=dtype)
    masks = [torch.ones(32, 60, dtype=torch.bool, device=device), torch.ones(32, 100, dtype=torch.bool, device=device)]
    return (txt, [txt, img], [txt, img], masks, "l2"), {}


def _init_example(device: str, dtype: torch.dtype) -> tuple[tuple, dict]:
    noise = torch.empty(32, 60, 768, device=device, dtype=dtype)
    return (noise, torch.ones(32, 60, dtype=torch.bool, device=device), 1.0, "l2"), {}


STEP.example = _step_example
INIT.example = _init_example
