"""fastvl's public functional API: one module per op; each function takes ``backend=None`` to force one.

Every op's function is exported here (``from fastvl.ops import symmetric_kl``). A module is never named after
the function it defines (the package attribute would shadow it): ``symmetric_kl`` lives in ``fastvl.ops.sym_kl``
(its reference, ``symmetric_kl_reference``, and backend table, ``SYMMETRIC_KL``, too).

See ``python -m fastvl.info`` for which backend serves each op on this machine.
"""

from ._dispatch import OPS, BackendUnavailableError
from .adv_perturb import adv_perturb_init, adv_perturb_step, adv_perturb_step_multi, adv_perturb_step_packed
from .attention import cross_modal_attention
from .bce_soft import fused_bce_soft
from .layout_ret import LayoutMemory, layout_retrieval
from .linear_cross_entropy import fused_linear_cross_entropy
from .linear_kl import fused_linear_kl
from .masked_regression import fused_masked_regression
from .ot import ipot_plan, optimal_transport_dist, optimal_transport_dist_packed
from .pack import pack, unpack
from .spade import spade_norm
from .sym_kl import symmetric_kl

__all__ = [
    "OPS",
    "BackendUnavailableError",
    "LayoutMemory",
    "adv_perturb_init",
    "adv_perturb_step",
    "adv_perturb_step_multi",
    "adv_perturb_step_packed",
    "cross_modal_attention",
    "fused_bce_soft",
    "fused_linear_cross_entropy",
    "fused_linear_kl",
    "fused_masked_regression",
    "ipot_plan",
    "layout_retrieval",
    "optimal_transport_dist",
    "optimal_transport_dist_packed",
    "pack",
    "spade_norm",
    "symmetric_kl",
    "unpack",
]
