"""The Triton IPOT backend at and beyond its register tile: every size the op accepts is served.

Pairs whose register tile (next powers of two of N and M) holds at most ``REGISTER_TILE_MAX`` elements run the
register kernel; larger ones run the tiled workspace kernel. Both sides of that limit are checked against the
float64 reference, at lengths exactly at the limit and one past it (fp32; on the ``triton_device``: the GPU, or the
CPU under Triton's interpreter).
"""

import pytest
import torch

from fastvl.kernels.triton import ot as K
from fastvl.ops import ot
from fastvl.ops.testing import assert_rel_close, ot_inputs

LIMIT = K.REGISTER_TILE_MAX
N_AT = 64  # text length at the limit; the regions fill the rest of the register tile
M_AT = LIMIT // N_AT

# (name, longest text, most regions, served by the register tile)
LIMIT_CASES = [
    ("at-limit", N_AT, M_AT, True),
    ("text-one-over", N_AT + 1, M_AT, False),
    ("regions-one-over", N_AT, M_AT + 1, False),
]


def _lens(longest: int, gen: torch.Generator, batch: int = 3) -> list[int]:
    """The longest length once (so the padded size is exactly ``longest``), shorter ones after it."""
    return [longest] + torch.randint(1, longest + 1, (batch - 1,), generator=gen).tolist()


def _cost(txt, img, tp, ip):
    return ot.cosine_cost(txt, img).masked_fill(tp[:, :, None] | ip[:, None, :], 0)


def test_limit_cases_sit_on_both_sides_of_the_register_tile():
    bn, bm = K.tile_shape(N_AT, M_AT)
    assert bn * bm == LIMIT
    for _, n, m, register in LIMIT_CASES:
        assert K.uses_register_tile(n, m) is register, (n, m)


@pytest.mark.parametrize("name,n,m,register", LIMIT_CASES, ids=[c[0] for c in LIMIT_CASES])
def test_triton_serves_both_sides_of_the_limit(name, n, m, register, gen, triton_device):
    txt, img, tp, ip = ot_inputs(3, 0, 0, 16, gen, device=triton_device, txt_lens=_lens(n, gen),
                                 img_lens=_lens(m, gen))
    assert tp.shape[1] == n and ip.shape[1] == m and K.uses_register_tile(n, m) is register
    cost = _cost(txt, img, tp, ip)
    assert ot.IPOT.reasons(cost, tp, ip, 0.5, 50, 1)["triton"] == []  # the dispatcher may pick it: no size limit
    dist = ot.optimal_transport_dist(txt, img, tp, ip, backend="triton")
    ref = ot.optimal_transport_dist_reference(txt.double().cpu(), img.double().cpu(), tp.cpu(), ip.cpu())
    assert_rel_close(dist.cpu(), ref, 1e-5, f"triton {name} {n}x{m}")


@pytest.mark.parametrize("name,n,m,register", LIMIT_CASES[1:], ids=[c[0] for c in LIMIT_CASES[1:]])
def test_tiled_plan_matches_reference_plan(name, n, m, register, gen, triton_device):
    """Over the limit: the whole plan (not only the distance), written everywhere, 0 at pads and for an
    all-padding pair."""
    txt, img, tp, ip = ot_inputs(3, 0, 0, 16, gen, device=triton_device, txt_lens=_lens(n, gen),
                                 img_lens=_lens(m, gen))
    tp[2] = True  # no text: the plan must be all zero, never NaN
    cost = _cost(txt, img, tp, ip)
    plan = ot.ipot_plan(cost, tp, ip, iteration=10, backend="triton")
    assert torch.isfinite(plan).all()
    assert_rel_close(plan.cpu(), ot.ipot_reference(cost.double().cpu(), tp.cpu(), ip.cpu(), iteration=10), 1e-5,
                     f"tiled plan {name}")
    assert (plan.masked_select(tp[:, :, None] | ip[:, None, :]) == 0).all()
    assert plan[2].eq(0).all()


@pytest.mark.parametrize("iteration,k", [(0, 1), (1, 1), (6, 3), (20, 1)])
def test_tiled_kernel_small_blocks_ragged_edges(iteration, k, gen, triton_device):
    """The workspace kernel forced at 16 x 16 tiles on a pair that is not a multiple of them (many tiles per
    pass, partial edge tiles), for every branch: no iteration, one, several inner steps."""
    txt, img, tp, ip = ot_inputs(3, 0, 0, 16, gen, device=triton_device, txt_lens=[37, 5, 20], img_lens=[11, 50, 33])
    cost = _cost(txt, img, tp, ip)
    plan = K.ipot_plan_triton(cost, tp, ip, 0.5, iteration, k, tiled=True, block=(16, 16))
    ref = ot.ipot_reference(cost.double().cpu(), tp.cpu(), ip.cpu(), 0.5, iteration, k)
    assert torch.isfinite(plan).all()
    assert_rel_close(plan.cpu(), ref, 1e-5, f"tiled 16x16 iteration={iteration} k={k}")


def test_tiled_kernel_equals_register_kernel_where_both_run(gen, triton_device):
    txt, img, tp, ip = ot_inputs(4, 30, 40, 16, gen, device=triton_device)
    cost = _cost(txt, img, tp, ip)
    reg = K.ipot_plan_triton(cost, tp, ip, 0.5, 15, 1, tiled=False)
    tiled = K.ipot_plan_triton(cost, tp, ip, 0.5, 15, 1, tiled=True, block=(16, 32))
    assert_rel_close(tiled, reg, 1e-5, "tiled vs register")


def test_the_gpu_test_shape_200x100(gen, triton_device):
    """tests/ops/test_ot.py::test_gpu_backends draws up to 200 words x 100 regions (a 256 x 128 tile)."""
    txt, img, tp, ip = ot_inputs(2, 0, 0, 16, gen, device=triton_device, txt_lens=[200, 131], img_lens=[100, 77])
    dist = ot.optimal_transport_dist(txt, img, tp, ip, iteration=5, backend="triton")
    ref = ot.optimal_transport_dist_reference(txt.double().cpu(), img.double().cpu(), tp.cpu(), ip.cpu(), iteration=5)
    assert_rel_close(dist.cpu(), ref, 1e-5, "triton 200x100")
