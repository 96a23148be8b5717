"""Launch helpers and the shared scale prologue of the Triton row kernels of the fused losses (one program per row,
looping over the row in blocks of ``BLOCK`` columns)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import scale_modes as M

MAX_BLOCK = 4096

# the scale modes of :mod:`fastvl.kernels.scale_modes`, as constexpr globals that @triton.jit code may read
SCALE_SCALAR = tl.constexpr(M.SCALE_SCALAR)
SCALE_PER_ROW = tl.constexpr(M.SCALE_PER_ROW)
SCALE_PER_ELEMENT = tl.constexpr(M.SCALE_PER_ELEMENT)


def row_block(width: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for a row of ``width`` values: a power of two in [16, MAX_BLOCK]."""
    block = min(MAX_BLOCK, max(16, triton.next_power_of_2(max(1, width))))
    return block, (8 if block >= 2048 else 4)


def scale_stride(scale: torch.Tensor, mode: int) -> int:
    """Row stride of a SCALE_PER_ELEMENT ([N, V]) scale; 0 for SCALE_SCALAR / SCALE_PER_ROW scales."""
    return scale.stride(0) if mode == M.SCALE_PER_ELEMENT else 0


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` with unit stride along its last dim (what the kernels index), copying only if needed."""
    return t if t.dim() == 0 or t.stride(-1) == 1 else t.contiguous()


@triton.jit
def row_scale(scale_ptr, row, SCALE_MODE: tl.constexpr):
    """The scale of a whole row: the one scalar (SCALE_SCALAR), the row's entry (SCALE_PER_ROW), or 1 under
    SCALE_PER_ELEMENT, whose scales :func:`element_scale` loads per element."""
    if SCALE_MODE == SCALE_SCALAR:
        s = tl.load(scale_ptr)
    elif SCALE_MODE == SCALE_PER_ROW:
        s = tl.load(scale_ptr + row)
    else:
        s = 1.0
    return s


@triton.jit
def element_scale(scale_ptr, row, stride, c, inside, s, SCALE_MODE: tl.constexpr):
    """Scales of the row's columns ``c``: loaded (row stride ``stride``) under SCALE_PER_ELEMENT, else the row
    scale ``s`` from :func:`row_scale`."""
    if SCALE_MODE == SCALE_PER_ELEMENT:
        g = tl.load(scale_ptr + row * stride + c, mask=inside, other=0.0)
    else:
        g = s
    return g
