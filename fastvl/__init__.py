"""fastvl: compiled kernels and models for vision-and-language pre-training.

Importing fastvl is light: it loads the compiled extension `fastvl._C` when it was built and warns once
(falling back to the reference / Triton backends) when it was not.
"""

from __future__ import annotations

import warnings

__version__ = "0.1.0"


def _load_extension():
    import torch  # noqa: F401  (libtorch must be loaded before the extension)

    try:
        from . import _C  # noqa: F401  (registers torch.ops.fastvl.* kernels)
    except ImportError as err:  # not built (plain checkout) or built against another torch
        warnings.warn(
            f"fastvl._C is not available ({err}); the reference and Triton backends will serve every op. "
            "Build it with `pip install --no-build-isolation -e .` (see README).",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    return _C


_C = _load_extension()
HAS_C = _C is not None
