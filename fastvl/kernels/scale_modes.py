"""Scale modes of the fused-loss row steps: how the float32 gradient scale handed to a row step is laid out.

Plain ints (no Triton import) shared by :mod:`fastvl.ops._chunked` and the Triton row kernels, which see them as
``tl.constexpr`` through :mod:`fastvl.kernels.triton._chunked`.
"""

SCALE_SCALAR = 0
"""One 0-d scale for all rows (the scalar reductions: e.g. ``1/N`` of a mean)."""
SCALE_PER_ROW = 1
"""``[N]``: one scale per row (the backward of ``reduction='none'`` for per-row losses)."""
SCALE_PER_ELEMENT = 2
"""``[N, V]``: one scale per logit (the backward of ``reduction='none'`` for per-element losses)."""

SCALE_MODES = (SCALE_SCALAR, SCALE_PER_ROW, SCALE_PER_ELEMENT)
