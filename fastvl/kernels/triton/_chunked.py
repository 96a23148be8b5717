"""Launch helpers shared by the Triton row kernels of the fused losses (one program per row, looping over
the row in blocks of ``BLOCK`` columns)."""

from __future__ import annotations

import torch
import triton

MAX_BLOCK = 4096


def row_block(width: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for a row of ``width`` values: a power of two in [16, MAX_BLOCK]."""
    block = min(MAX_BLOCK, max(16, triton.next_power_of_2(max(1, width))))
    return block, (8 if block >= 2048 else 4)


def scale_stride(scale: torch.Tensor, mode: int) -> int:
    """Row stride of an ELEMENT-mode ([N, V]) scale; 0 for SCALAR / ROW scales."""
    return scale.stride(0) if mode == 2 else 0


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` with unit stride along its last dim (what the kernels index), copying only if needed."""
    return t if t.dim() == 0 or t.stride(-1) == 1 else t.contiguous()
