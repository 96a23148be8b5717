"""Shared machinery of the fused "linear layer + loss" ops (MLM, MRC, MRC-kl, MRFR, ITM, VQA heads).

Every such op computes ``logits = hidden[indices] @ weight.T + bias`` and a loss over the last dim, without
ever holding the logits of all rows: rows are processed in chunks of ``chunk_rows``, and for each chunk

1. the chunk's hidden rows are gathered (``indices``) and multiplied into a ``[chunk, V]`` logits buffer;
2. a *row step* (a Triton kernel, or PyTorch for the ``torch_chunked`` backend) writes the chunk's losses and,
   when gradients are wanted, overwrites the logits buffer in place with ``dloss/dlogits`` (already scaled);
3. the gradients follow in the same pass: ``grad_rows = dlogits @ weight`` (the gradient of the N used rows;
   with ``indices`` the backward scatters it into hidden's [N_all, H] gradient with ``index_add_``, so the
   forward keeps only [N, H]), ``grad_weight += dlogits.T @ hidden_rows`` and ``grad_bias += dlogits.sum(0)``.

This is the Liger-kernel scheme: for the scalar reductions (``sum``, ``mean``, ...) the gradients are computed in
the forward pass and the backward only multiplies them by ``grad_output``. Two variants:
- DEFER (:func:`defer_mode`): when all rows fit in one chunk and ``dloss/dlogits`` [N, V] is no larger than the
  gradients ([N, H] + [V, H]; VQA: 256 x 3129 against 3129 x 1536), the forward keeps dlogits and the backward
  scales it and takes the two products, as eager autograd does: scaling grad_weight would cost more.
- ``reduction='none'``: the backward cannot scale precomputed gradients (each row or element has its own
  ``grad_output``), so the forward computes losses only and the backward reruns the chunked pass with the
  incoming gradient as the per-row (or per-element) scale.
Gradients are computed only for the inputs that require them (``grad_mask``); double backward is not supported.

Peak memory is one ``[chunk, V]`` buffer plus the gradients themselves. ``grad_weight`` is accumulated in the
weight's dtype (``addmm_`` with beta = 1, as Liger does); chunks are large (a ``chunk_bytes`` budget) so that
low-precision weights see few accumulation roundings.

Scale modes of a row step (:mod:`fastvl.kernels.scale_modes`): ``SCALE_SCALAR`` (one 0-d float32 tensor for all
rows, e.g. ``1/N`` of a mean), ``SCALE_PER_ROW`` (``[N]`` float32, one per row), ``SCALE_PER_ELEMENT`` (``[N, V]``
float32, one per logit). :mod:`fastvl.ops._register` turns these pieces into the ops' ``torch.library`` ops.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch

from ..kernels.scale_modes import SCALE_SCALAR
from . import _dispatch as D

GRAD_HIDDEN, GRAD_WEIGHT, GRAD_BIAS, DEFER = 1, 2, 4, 8
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Bytes of the [chunk, V] logits buffer per chunk. GPU: small enough that MLM's fused loss peaks far below
# eager; CPU: large, because every chunk re-reads and re-writes grad_weight (V x H), which costs more than
# the cache locality of small chunks gains (see benchmarks/bench_losses.py).
CHUNK_BYTES = {"cuda": 32 * 2**20, "cpu": 256 * 2**20}

RowStep = Callable[..., None]
SMALL_ON_CPU = 2**16  # outputs (rows x V) below which the eager reference serves CPU tensors


def chunk_bytes(device: torch.device) -> int:
    """The logits-buffer budget per chunk; ``FASTVL_LOSS_CHUNK_BYTES`` overrides it."""
    env = os.environ.get("FASTVL_LOSS_CHUNK_BYTES")
    if env:
        return max(1, int(env))
    return CHUNK_BYTES.get(device.type, CHUNK_BYTES["cuda"])


def default_chunk_rows(n_rows: int, vocab: int, dtype: torch.dtype, device: torch.device, backend: str) -> int:
    """Rows per chunk: the logits-buffer budget divided by the bytes of one row (multiple of 16, at least 16).

    A row costs V elements of the input dtype for ``triton`` (its kernel works in place on the buffer) and V
    float32 values for ``torch_chunked`` (its PyTorch step works in float32)."""
    size = dtype.itemsize
    per_row = max(1, vocab) * (size if backend == "triton" else max(4, size))
    rows = max(16, (chunk_bytes(device) // per_row) // 16 * 16)
    return int(max(1, min(rows, n_rows)))


def grad_mask(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> int:
    """Bit mask of the inputs that need a gradient now (0 outside autograd)."""
    if not torch.is_grad_enabled():
        return 0
    mask = GRAD_HIDDEN if hidden.requires_grad else 0
    mask |= GRAD_WEIGHT if weight.requires_grad else 0
    mask |= GRAD_BIAS if bias is not None and bias.requires_grad else 0
    return mask


def autocast_inputs(*tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """Under ``torch.autocast`` cast float inputs to the autocast dtype, as ``F.linear`` would."""
    first = next((t for t in tensors if isinstance(t, torch.Tensor)), None)
    if first is None:
        return tensors
    dev = first.device.type
    if dev not in ("cuda", "cpu") or not torch.is_autocast_enabled(dev):
        return tensors
    dtype = torch.get_autocast_dtype(dev)
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in tensors)


def should_validate(validate: bool | None, t: torch.Tensor) -> bool:
    """Value checks need a host read: on by default on CPU only, never while ``torch.compile`` traces."""
    if torch.compiler.is_compiling():
        return False
    return t.device.type == "cpu" if validate is None else bool(validate)


def scale_tensor(value: float | torch.Tensor, device: torch.device) -> torch.Tensor:
    """A 0-d float32 scale on ``device`` (no host synchronisation for a device tensor)."""
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=torch.float32).reshape(())
    return torch.full((), float(value), dtype=torch.float32, device=device)


# ----------------------------------------------------------------------------------------------------------
# Argument checks shared by the public functions
# ----------------------------------------------------------------------------------------------------------


def check_tensor(op: str, name: str, t, dims: int | Sequence[int], shape_doc: str, *, floating: bool | None = None,
                 device: torch.device | None = None) -> None:
    """Type, rank, dtype kind and device of one argument; errors name the argument."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"fastvl.ops.{op}: argument '{name}' must be a tensor, got {type(t).__name__}")
    dims = (dims,) if isinstance(dims, int) else tuple(dims)
    if t.dim() not in dims:
        raise ValueError(f"fastvl.ops.{op}: argument '{name}' must be {shape_doc}, got shape {list(t.shape)}")
    if floating is True and t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"fastvl.ops.{op}: argument '{name}' must be a float tensor, got {t.dtype}")
    if floating is False and t.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"fastvl.ops.{op}: argument '{name}' must be an int64 or int32 tensor, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"fastvl.ops.{op}: argument '{name}' is on {t.device} but 'hidden' is on {device}; "
                         "all inputs must be on one device")


def check_linear_args(op: str, hidden, weight, bias, indices, *, weight_name: str = "weight",
                      transposed: bool = False) -> tuple[int, int, int]:
    """Checks hidden [N_all, H], weight [V, H] (or [H, V] when ``transposed``), bias [V], indices [N].

    Returns (N rows of the loss, V outputs per row, H hidden size).
    """
    check_tensor(op, "hidden", hidden, 2, "2-d [N, H]", floating=True)
    dev = hidden.device
    w_doc = "2-d [H, D]" if transposed else "2-d [V, H]"
    check_tensor(op, weight_name, weight, 2, w_doc, floating=True, device=dev)
    H = hidden.shape[1]
    w_h = weight.shape[0] if transposed else weight.shape[1]
    V = weight.shape[1] if transposed else weight.shape[0]
    if w_h != H:
        where = "rows" if transposed else "columns"
        raise ValueError(f"fastvl.ops.{op}: argument '{weight_name}' has {w_h} {where} but 'hidden' has hidden size "
                         f"{H}; expected {weight_name} of shape {[H, V] if transposed else [V, H]}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"fastvl.ops.{op}: argument '{weight_name}' has dtype {weight.dtype} but 'hidden' has "
                        f"{hidden.dtype}; pass one dtype (or call under torch.autocast)")
    if bias is not None:
        check_tensor(op, "bias", bias, 1, f"1-d [{V}] or None", floating=True, device=dev)
        if bias.shape[0] != V:
            raise ValueError(f"fastvl.ops.{op}: argument 'bias' must have shape [{V}] (from '{weight_name}'), "
                             f"got {list(bias.shape)}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"fastvl.ops.{op}: argument 'bias' has dtype {bias.dtype} but 'hidden' has "
                            f"{hidden.dtype}")
    if indices is None:
        return hidden.shape[0], V, H
    check_tensor(op, "indices", indices, 1, "1-d [N] row indices into 'hidden' or None", floating=False, device=dev)
    return indices.shape[0], V, H


def check_rows(op: str, name: str, t: torch.Tensor, n: int, what: str) -> None:
    """``t``'s first dim must equal the number of loss rows ``n``."""
    if t.shape[0] != n:
        raise ValueError(f"fastvl.ops.{op}: argument '{name}' has {t.shape[0]} rows but there are {n} {what}")


def validate_indices(op: str, indices: torch.Tensor | None, n_all: int) -> None:
    if indices is None or indices.numel() == 0:
        return
    lo, hi = int(indices.min()), int(indices.max())
    if lo < 0 or hi >= n_all:
        raise ValueError(f"fastvl.ops.{op}: argument 'indices' must lie in [0, {n_all}) (rows of 'hidden'), "
                         f"got values in [{lo}, {hi}]")


def check_reduction(op: str, reduction: str, allowed: Sequence[str]) -> str:
    if reduction not in allowed:
        raise ValueError(f"fastvl.ops.{op}: argument 'reduction' must be one of {list(allowed)}, got {reduction!r}")
    return reduction


def check_chunk_rows(op: str, chunk_rows: int | None) -> None:
    if chunk_rows is not None and (int(chunk_rows) != chunk_rows or chunk_rows < 1):
        raise ValueError(f"fastvl.ops.{op}: argument 'chunk_rows' must be an int >= 1 or None, got {chunk_rows}")


# ----------------------------------------------------------------------------------------------------------
# The chunked pass
# ----------------------------------------------------------------------------------------------------------


def chunked_linear_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                        indices: torch.Tensor | None, data: Sequence[torch.Tensor], step: RowStep, *,
                        loss: torch.Tensor, scale: torch.Tensor, scale_mode: int, mask: int, chunk_rows: int,
                        transposed: bool = False
                        ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Run the chunked pass (module docstring).

    Args:
        hidden: [N_all, H]; indices: [N] rows of ``hidden`` to use (None: all N_all rows, N = N_all).
        weight: [V, H], or [H, V] when ``transposed`` (the regression op's tied ``weight_t``); any strides.
        bias: [V] or None.
        data: per-row target tensors with first dim N, sliced per chunk and handed to ``step``.
        step: ``step(logits [n, V], data_chunk, loss_chunk, scale_chunk, scale_mode, compute_grad)``; writes the
            loss rows and, when ``compute_grad``, replaces ``logits`` in place by the scaled ``dloss/dlogits``.
        loss: preallocated float32 output, first dim N.
        scale: float32 scale: 0-d (SCALE_SCALAR), [N] (SCALE_PER_ROW) or [N, V] (SCALE_PER_ELEMENT).
        mask: which gradients to compute (GRAD_HIDDEN | GRAD_WEIGHT | GRAD_BIAS); 0 = loss only. With DEFER
            all rows form one chunk and no product is taken: the first output is the scaled ``dloss/dlogits``
            [N, V] and the backward takes the products (see :func:`defer_mode`).
        chunk_rows: rows per chunk.
    Returns:
        (grad of the used rows [N, H] (``hidden[indices]``'s gradient; :func:`scatter_rows` turns it into
        hidden's) or None, grad_weight (weight's shape, contiguous) or None, grad_bias [V] float32
        or None). The first chunk writes grad_weight / grad_bias, later chunks add to them (no zero fill).
    """
    n = indices.shape[0] if indices is not None else hidden.shape[0]
    compute = mask != 0
    gh = gw = gb = None
    if mask & DEFER:  # one chunk of all rows, whatever chunk_rows says
        chunk_rows = max(n, 1)
    if mask & GRAD_HIDDEN and not mask & DEFER:
        gh = torch.empty(n, hidden.shape[1], dtype=hidden.dtype, device=hidden.device)
    w_vh = weight.t() if transposed else weight  # [V, H] view
    w_hv = weight if transposed else weight.t()  # [H, V] view
    for s in range(0, n, chunk_rows):
        e = min(n, s + chunk_rows)
        hc = hidden[s:e] if indices is None else hidden.index_select(0, indices[s:e])
        logits = torch.addmm(bias, hc, w_hv) if bias is not None else torch.mm(hc, w_hv)  # [n, V] contiguous
        sc = scale if scale_mode == SCALE_SCALAR else scale[s:e]
        step(logits, [d[s:e] for d in data], loss[s:e], sc, scale_mode, compute)
        if mask & DEFER:
            return logits, None, None
        if not compute:
            continue
        if gh is not None:
            torch.mm(logits, w_vh, out=gh[s:e])
        if mask & GRAD_WEIGHT:
            a, b = (hc.t(), logits) if transposed else (logits.t(), hc)
            gw = torch.mm(a, b) if gw is None else gw.addmm_(a, b)
        if mask & GRAD_BIAS and bias is not None:
            part = logits.sum(0, dtype=torch.float32)
            gb = part if gb is None else gb.add_(part)
    if mask & DEFER:  # no chunk ran
        return torch.empty(0, w_vh.shape[0], dtype=hidden.dtype, device=hidden.device), None, None
    if compute and n == 0:  # no chunk ran: the gradients of an empty batch are zero
        if mask & GRAD_WEIGHT:
            gw = torch.zeros(weight.shape, dtype=weight.dtype, device=weight.device)
        if mask & GRAD_BIAS and bias is not None:
            gb = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device)
    return gh, gw, gb


def empty_grads(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gh, gw, gb
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fill absent gradients with 0-element placeholders and cast grad_bias to the bias dtype."""
    gh = gh if gh is not None else hidden.new_empty(0)
    gw = gw if gw is not None else weight.new_empty(0)
    if gb is None:
        gb = (bias if bias is not None else weight).new_empty(0)
    else:
        gb = gb.to(bias.dtype)
    return gh, gw, gb


def fake_grads(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, mask: int, n: int,
               transposed: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Shapes of the gradient outputs for a ``register_fake`` implementation (n = rows used)."""
    if mask & DEFER:
        return hidden.new_empty(n, weight.shape[1] if transposed else weight.shape[0]), weight.new_empty(0), \
            (bias if bias is not None else weight).new_empty(0)
    gh = hidden.new_empty(n, hidden.shape[1]) if mask & GRAD_HIDDEN else hidden.new_empty(0)
    gw = torch.empty_like(weight, memory_format=torch.contiguous_format) if mask & GRAD_WEIGHT \
        else weight.new_empty(0)
    if bias is not None and mask & GRAD_BIAS:
        gb = torch.empty_like(bias, memory_format=torch.contiguous_format)
    else:
        gb = (bias if bias is not None else weight).new_empty(0)
    return gh, gw, gb


def scatter_rows(grad_rows: torch.Tensor, indices: torch.Tensor, n_all: int) -> torch.Tensor:
    """[N, H] gradient of ``hidden[indices]`` -> [n_all, H] gradient of ``hidden`` (duplicates add up)."""
    out = grad_rows.new_zeros(n_all, grad_rows.shape[1])
    return out.index_add_(0, indices, grad_rows)


def select_backend(op, args: tuple, rows: int, width: int, backend: str | None) -> str:
    """``op.select(*args)``, except that a tiny problem on CPU goes to the eager ``reference`` when nothing forces a
    backend: below :data:`SMALL_ON_CPU` outputs the chunked pass's fixed overhead outweighs its savings
    (measured in benchmarks/bench_losses.py, case ``itm``)."""
    name = op.select(*args, backend=backend)
    t = args[0]
    if (name == "torch_chunked" and backend is None and D._forced_from_env(op) is None and t.device.type == "cpu"
            and rows * width < SMALL_ON_CPU):
        return "reference"
    return name


def deferred_grads(dl: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, indices: torch.Tensor | None,
                    need: Sequence[bool], transposed: bool) -> tuple:
    """The products of a DEFER forward: dl [N, V] (already scaled by grad_output) -> (grad rows, weight, bias), each
    None unless ``need``-ed (bias: ``need[2]`` only when there is a bias)."""
    gh = gw = gb = None
    if need[0]:
        gh = torch.mm(dl, weight.t() if transposed else weight)
    if need[1]:
        hc = hidden if indices is None else hidden.index_select(0, indices)
        gw = torch.mm(hc.t(), dl) if transposed else torch.mm(dl.t(), hc)
    if need[2]:
        gb = dl.sum(0, dtype=torch.float32).to(dl.dtype)
    return gh, gw, gb


def defer_mode(mask: int, reduction: str, n: int, width: int, hidden_size: int, chunk_rows: int) -> int:
    """DEFER when gradients are wanted, all rows fit in one chunk and ``dloss/dlogits`` [N, V] is no larger than
    the gradients it replaces ([N, H] + [V, H]): then the forward keeps dlogits and the backward scales it by
    ``grad_output`` and takes the two products, as eager autograd does (VQA: 256 x 3129 vs 3129 x 1536). The
    Liger scheme would instead scale grad_weight, a larger tensor, in the backward."""
    if mask and reduction != "none" and n <= chunk_rows and n * width <= (n + width) * hidden_size:
        return DEFER
    return 0
