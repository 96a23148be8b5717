"""Word-region alignment (WRA) by optimal transport: UNITER's ``optimal_transport_dist``.

The distance between a text and an image is ``trace(C @ T)``: C is the cosine cost between word and
region embeddings, and T the transport plan found by IPOT (inexact proximal point, 50 iterations)
with T detached, so the gradient flows through C only.

The fused op is the IPOT plan (:func:`ipot_plan`): it needs no gradient and is where the time goes
(50 iterations of small batched products). The cost matrix is one batched matmul left to the BLAS.

Backends of ``ipot``: ``cuda`` (one thread block per pair, all iterations in one launch, plan in shared
memory), ``triton`` (one program per pair: plan in registers up to a 64 x 128 tile, beyond it tiled over a
global workspace, so every size is served), ``cpu`` (C++, OpenMP over pairs, each
pair cache-resident) and ``reference`` (the batched PyTorch loop below, written as REFERENCE.md states it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _dispatch as D
from .pack import check_cu_seqlens, unpack

__all__ = [
    "cosine_cost",
    "ipot_plan",
    "ipot_reference",
    "optimal_transport_dist",
    "optimal_transport_dist_packed",
    "optimal_transport_dist_reference",
]

# ----------------------------------------------------------------------------------------------------------
# Reference (the ground truth, and the fallback)
# ----------------------------------------------------------------------------------------------------------


def cosine_cost(txt_emb: torch.Tensor, img_emb: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """1 - cos(txt_i, img_j). txt_emb [B, N, H], img_emb [B, M, H] -> [B, N, M]."""
    x = F.normalize(txt_emb, p=2, dim=-1, eps=eps)
    y = F.normalize(img_emb, p=2, dim=-1, eps=eps)
    return 1 - x.matmul(y.transpose(1, 2))


def ipot_reference(cost: torch.Tensor, txt_pad: torch.Tensor, img_pad: torch.Tensor, beta: float = 0.5,
                   iteration: int = 50, k: int = 1) -> torch.Tensor:
    """IPOT transport plan, batched PyTorch, exactly as REFERENCE.md (UNITER pre-training, WRA) gives it.

    Args:
        cost: [B, N, M] cost, 0 at padded pairs (any float dtype; the loop runs in that dtype).
        txt_pad: [B, N] bool, True at padding.  img_pad: [B, M] bool, True at padding.
    Returns:
        plan [B, N, M] (fastvl orientation: UNITER's T transposed), 0 at padded pairs.
    """
    b, n, m = cost.shape
    x_len = (n - txt_pad.sum(1)).to(cost.dtype)  # [B] text lengths
    y_len = (m - img_pad.sum(1)).to(cost.dtype)  # [B] region counts
    joint_pad = (txt_pad.unsqueeze(-1) | img_pad.unsqueeze(-2)).transpose(1, 2)  # [B, M, N]
    sigma = (torch.ones(b, n, dtype=cost.dtype, device=cost.device) / x_len.unsqueeze(1)).masked_fill(txt_pad, 0)
    T = torch.ones(b, m, n, dtype=cost.dtype, device=cost.device).masked_fill(joint_pad, 0)  # [B, M, N]
    A = torch.exp(-cost.transpose(1, 2) / beta).masked_fill(joint_pad, 0)  # [B, M, N]
    x_mask = (txt_pad.to(cost.dtype) * 1e4).unsqueeze(1)  # [B, 1, N]
    y_mask = (img_pad.to(cost.dtype) * 1e4).unsqueeze(1)  # [B, 1, M]
    x_len3, y_len3 = x_len[:, None, None], y_len[:, None, None]
    for _ in range(iteration):
        Q = A * T  # [B, M, N]
        for _ in range(k):  # (k > 1 reshapes sigma each step; UNITER's own loop only ever ran k = 1)
            delta = 1 / (y_len3 * Q.matmul(sigma.view(b, n, 1)).view(b, 1, m) + y_mask)  # [B, 1, M]
            sigma = 1 / (x_len3 * delta.matmul(Q) + x_mask)  # [B, 1, N]
        T = delta.view(b, m, 1) * Q * sigma
    T = T.masked_fill(joint_pad, 0)
    return T.transpose(1, 2)


def optimal_transport_dist_reference(txt_emb: torch.Tensor, img_emb: torch.Tensor, txt_pad: torch.Tensor,
                                     img_pad: torch.Tensor, beta: float = 0.5, iteration: int = 50,
                                     k: int = 1) -> torch.Tensor:
    """The whole op in plain PyTorch, in the inputs' dtype: [B] distances (all-padding rows give 0)."""
    joint_pad = txt_pad.unsqueeze(-1) | img_pad.unsqueeze(-2)
    cost = cosine_cost(txt_emb, img_emb).masked_fill(joint_pad, 0)
    plan = ipot_reference(cost.detach(), txt_pad, img_pad, beta, iteration, k)
    return (cost * plan.detach()).sum(dim=(1, 2)).nan_to_num(0.0)


# ----------------------------------------------------------------------------------------------------------
# Backends of the IPOT plan
# ----------------------------------------------------------------------------------------------------------

IPOT = D.register_op("ipot", ["cuda", "triton", "cpu", "reference"], doc="IPOT transport plan (UNITER WRA)")


@IPOT.backend("reference", doc="batched PyTorch loop (any device, any float dtype)")
def _reference_supports(cost, txt_pad, img_pad, beta, iteration, k) -> D.Reasons:
    return []


@IPOT.backend("cpu", doc="C++ kernel, OpenMP over pairs, cache-resident per pair")
def _cpu_supports(cost, txt_pad, img_pad, beta, iteration, k) -> D.Reasons:
    return D.needs_device(cost, "cpu") + D.needs_dtype(cost, [torch.float32]) + D.needs_extension("ipot_plan")


@IPOT.backend("cuda", doc="CUDA kernel, one block per pair, plan in shared memory")
def _cuda_supports(cost, txt_pad, img_pad, beta, iteration, k) -> D.Reasons:
    return D.needs_dtype(cost, [torch.float32]) + D.needs_cuda_kernels("ipot_plan", cost)


@IPOT.backend("triton", doc="Triton kernel, one program per pair; plan in registers, or tiled over a workspace")
def _triton_supports(cost, txt_pad, img_pad, beta, iteration, k) -> D.Reasons:
    # Every size: pairs over the register tile (kernels/triton/ot.py REGISTER_TILE_MAX) run the tiled kernel.
    return D.triton_reasons(cost) + D.needs_dtype(cost, [torch.float32])


def _ipot_impl(backend: str, cost, txt_pad, img_pad, beta, iteration, k) -> torch.Tensor:
    if backend == "reference":
        return ipot_reference(cost, txt_pad, img_pad, beta, iteration, k).contiguous()
    if backend in ("cpu", "cuda"):
        return torch.ops.fastvl.ipot_plan(cost, txt_pad, img_pad, beta, iteration, k)
    if backend == "triton":
        from ..kernels.triton.ot import ipot_plan_triton

        return ipot_plan_triton(cost, txt_pad, img_pad, beta, iteration, k)
    raise AssertionError(f"unhandled backend {backend!r}")


@torch.library.custom_op("fastvl::ipot", mutates_args=())
def _ipot_op(cost: torch.Tensor, txt_pad: torch.Tensor, img_pad: torch.Tensor, beta: float, iteration: int, k: int,
             backend: str) -> torch.Tensor:
    return _ipot_impl(backend, cost, txt_pad, img_pad, beta, iteration, k)


@_ipot_op.register_fake
def _(cost, txt_pad, img_pad, beta, iteration, k, backend):
    return torch.empty_like(cost)


# ----------------------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------------------

_OP = "optimal_transport_dist"


def _check_pads(txt_emb, img_emb, txt_pad, img_pad, op: str = _OP) -> None:
    for name, t in (("txt_emb", txt_emb), ("img_emb", img_emb), ("txt_pad", txt_pad), ("img_pad", img_pad)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"fastvl.ops.{op}: argument '{name}' must be a tensor, got {type(t).__name__}")
    for name, t in (("txt_emb", txt_emb), ("img_emb", img_emb)):
        if t.dim() != 3:
            raise ValueError(f"fastvl.ops.{op}: argument '{name}' must be 3-d [B, L, H], got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"fastvl.ops.{op}: argument '{name}' must be a float tensor, got {t.dtype}")
    for name, t in (("txt_pad", txt_pad), ("img_pad", img_pad)):
        if t.dtype != torch.bool:
            raise TypeError(f"fastvl.ops.{op}: argument '{name}' must be a bool tensor (True = padding), got {t.dtype}")
    for name, t in (("img_emb", img_emb), ("txt_pad", txt_pad), ("img_pad", img_pad)):
        if t.device != txt_emb.device:
            raise ValueError(f"fastvl.ops.{op}: argument '{name}' is on {t.device} but 'txt_emb' is on "
                             f"{txt_emb.device}; all inputs must be on one device")
    B, N, H = txt_emb.shape
    if img_emb.shape[0] != B:
        raise ValueError(f"fastvl.ops.{op}: argument 'img_emb' has batch size {img_emb.shape[0]} but 'txt_emb' has {B}")
    if img_emb.shape[2] != H:
        raise ValueError(f"fastvl.ops.{op}: argument 'img_emb' has hidden size {img_emb.shape[2]} but 'txt_emb' "
                         f"has {H}")
    M = img_emb.shape[1]
    if tuple(txt_pad.shape) != (B, N):
        raise ValueError(f"fastvl.ops.{op}: argument 'txt_pad' must have shape [B, N] = [{B}, {N}] (from txt_emb), "
                         f"got {list(txt_pad.shape)}")
    if tuple(img_pad.shape) != (B, M):
        raise ValueError(f"fastvl.ops.{op}: argument 'img_pad' must have shape [B, M] = [{B}, {M}] (from img_emb), "
                         f"got {list(img_pad.shape)}")


def _check_scalars(beta, iteration, k, op: str = _OP) -> None:
    if not beta > 0:
        raise ValueError(f"fastvl.ops.{op}: argument 'beta' must be > 0, got {beta}")
    if int(iteration) != iteration or iteration < 0:
        raise ValueError(f"fastvl.ops.{op}: argument 'iteration' must be an int >= 0, got {iteration}")
    if int(k) != k or k < 1:
        raise ValueError(f"fastvl.ops.{op}: argument 'k' must be an int >= 1, got {k}")


def ipot_plan(cost: torch.Tensor, txt_pad: torch.Tensor, img_pad: torch.Tensor, beta: float = 0.5,
              iteration: int = 50, k: int = 1, *, backend: str | None = None) -> torch.Tensor:
    """IPOT transport plan (no gradient).

    Args:
        cost: [B, N, M] float32 cost, 0 at padded pairs.
        txt_pad: [B, N] bool (True = padding). img_pad: [B, M] bool.
        beta, iteration, k: IPOT proximal weight, outer iterations, inner Sinkhorn steps.
        backend: force a backend (``reference``, ``cpu``, ``cuda``, ``triton``); default: the fastest that fits.
    Returns:
        plan [B, N, M] float32, 0 at padded pairs; all zero for a pair whose text or image is all padding.
    """
    _check_scalars(beta, iteration, k, "ipot_plan")
    if cost.dim() != 3:
        raise ValueError(f"fastvl.ops.ipot_plan: argument 'cost' must be 3-d [B, N, M], got shape {tuple(cost.shape)}")
    name = IPOT.select(cost, txt_pad, img_pad, beta, iteration, k, backend=backend)
    return _ipot_op(cost.detach(), txt_pad, img_pad, float(beta), int(iteration), int(k), name)


def optimal_transport_dist(txt_emb: torch.Tensor, img_emb: torch.Tensor, txt_pad: torch.Tensor,
                           img_pad: torch.Tensor, beta: float = 0.5, iteration: int = 50, k: int = 1, *,
                           backend: str | None = None) -> torch.Tensor:
    """Word-region OT distance: drop-in for UNITER's function of the same name (computed in float32).

    Args:
        txt_emb: [B, N, H] word embeddings (any float dtype; cast to float32).
        img_emb: [B, M, H] region embeddings.
        txt_pad: [B, N] bool, True at padding.  img_pad: [B, M] bool, True at padding.
        beta, iteration, k: IPOT settings (UNITER: 0.5, 50, 1).
        backend: force the IPOT backend; default: the fastest that fits.
    Returns:
        [B] float32 distances trace(C @ T) with T detached; 0 for a pair with no text or no region.
    """
    _check_pads(txt_emb, img_emb, txt_pad, img_pad)
    _check_scalars(beta, iteration, k)
    joint_pad = txt_pad.unsqueeze(-1) | img_pad.unsqueeze(-2)  # [B, N, M]
    cost = cosine_cost(txt_emb.float(), img_emb.float()).masked_fill(joint_pad, 0)  # [B, N, M]
    plan = ipot_plan(cost, txt_pad, img_pad, beta, iteration, k, backend=backend)
    return (cost * plan).sum(dim=(1, 2))


def optimal_transport_dist_packed(txt_emb: torch.Tensor, img_emb: torch.Tensor, cu_seqlens_txt: torch.Tensor,
                                  cu_seqlens_img: torch.Tensor, max_txt: int, max_img: int, beta: float = 0.5,
                                  iteration: int = 50, k: int = 1, *, backend: str | None = None) -> torch.Tensor:
    """:func:`optimal_transport_dist` on packed inputs.

    Args:
        txt_emb: [T_txt, H] all examples' word embeddings concatenated.
        img_emb: [T_img, H] all examples' region embeddings concatenated.
        cu_seqlens_txt, cu_seqlens_img: [B+1] int32/int64 cumulative lengths.
        max_txt, max_img: Python ints >= every text / image length (from collate; no host sync).
    Returns:
        [B] float32 distances.
    """
    op = "optimal_transport_dist_packed"
    for name, t in (("txt_emb", txt_emb), ("img_emb", img_emb)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"fastvl.ops.{op}: argument '{name}' must be a 2-d [total, H] tensor, got {shape}")
    check_cu_seqlens(cu_seqlens_txt, txt_emb.shape[0], "cu_seqlens_txt", op)
    check_cu_seqlens(cu_seqlens_img, img_emb.shape[0], "cu_seqlens_img", op)
    if cu_seqlens_txt.shape != cu_seqlens_img.shape:
        raise ValueError(f"fastvl.ops.{op}: 'cu_seqlens_txt' has {cu_seqlens_txt.numel() - 1} sequences but "
                         f"'cu_seqlens_img' has {cu_seqlens_img.numel() - 1}")
    txt, txt_pad = unpack(txt_emb, cu_seqlens_txt, max_txt)
    img, img_pad = unpack(img_emb, cu_seqlens_img, max_img)
    return optimal_transport_dist(txt, img, txt_pad, img_pad, beta, iteration, k, backend=backend)


def _example(device: str, dtype: torch.dtype) -> tuple[tuple, dict]:
    """Representative IPOT inputs for ``python -m fastvl.info``: WRA always solves in float32."""
    cost = torch.empty(2, 40, 100, device=device, dtype=torch.float32)
    txt_pad = torch.zeros(2, 40, dtype=torch.bool, device=device)
    img_pad = torch.zeros(2, 100, dtype=torch.bool, device=device)
    return (cost, txt_pad, img_pad, 0.5, 50, 1), {}


IPOT.example = _example
