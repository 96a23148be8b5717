"""fused_bce_soft (VQA / SNLI-VE): every backend runnable here against the eager reference, forward and the
gradients of hidden / weight / bias, every reduction (incl. the official per-instance 'batchmean'), gathers,
score checks, dispatch, opcheck."""

import pytest
import torch
import torch.nn.functional as F

from fastvl.ops import _chunked as C
from fastvl.ops import bce_soft as M
from fastvl.ops.testing import assert_close_to_ref, linear_head_inputs, value_and_grads, vqa_soft_scores

FUSED = ["torch_chunked", "triton"]
NAMES = ["loss", "grad hidden", "grad weight", "grad bias"]


def _double(t):
    return t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t


def _compare(backend, inputs, gen, reduction="batchmean", chunk_rows=3, wrt=(0, 1, 2)):
    h, w, b, y, idx = inputs

    def fast(h, w, b):
        return M.fused_bce_soft(h, w, b, y, reduction, indices=idx, chunk_rows=chunk_rows, backend=backend)

    def ref(h, w, b):
        return M.bce_soft_reference(h, w, b, y, reduction, idx)

    g = (torch.rand(ref(h, w, b).shape, generator=gen) + 0.5).to(h.device)
    got = value_and_grads(fast, [h, w, b], g, wrt)
    r32 = value_and_grads(ref, [h, w, b], g, wrt)
    r64 = value_and_grads(lambda h, w, b: M.bce_soft_reference(h, w, b, y.double(), reduction, idx),
                          [_double(x) for x in (h, w, b)], g.double(), wrt)
    for name, f, a, a64 in zip([NAMES[0]] + [NAMES[1 + i] for i in wrt], got, r32, r64):
        assert f.dtype == a.dtype, f"{backend} {name}: dtype {f.dtype} != reference {a.dtype}"
        # grad hidden sums A products: float32 GEMM rounding alone reaches ~1e-5 relative (see the CE tests)
        floor = 1e-4 if name == "grad hidden" and f.dtype == torch.float32 else None
        assert_close_to_ref(f, a64, a, f"{backend} {name}", floor_rel=floor, dtype=h.dtype)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("reduction", ["batchmean", "mean", "sum", "none"])
@pytest.mark.parametrize("answers", [3129, 1601, 3])
def test_matches_reference(backend, reduction, answers, gen, device):
    h, w, b, _ = linear_head_inputs(7, 16, answers, gen, logit_std=4.0, device=device)
    y = vqa_soft_scores(7, answers, gen, per_row=min(3, answers), device=device)
    _compare(backend, (h, w, b, y, None), gen, reduction)


@pytest.mark.parametrize("backend", FUSED)
def test_gather_no_bias_extreme_logits(backend, gen, device):
    """Logits of +-60 (sigmoid saturates in float32) must neither overflow nor lose the gradient's sign."""
    h, w, _, idx = linear_head_inputs(6, 16, 3129, gen, n_all=9, bias=False, logit_std=30.0, device=device)
    _compare(backend, (h, w, None, vqa_soft_scores(6, 3129, gen, device=device), idx), gen, chunk_rows=4, wrt=(0, 1))


@pytest.mark.parametrize("backend", FUSED)
def test_single_chunk_defers_the_products_to_backward(backend, gen, device):
    """VQA's shape class: few rows, answers < hidden x rows: DEFER."""
    h, w, b, idx = linear_head_inputs(6, 32, 97, gen, n_all=9, device=device)
    assert C.defer_mode(7, "batchmean", 6, 97, 32, 6) == C.DEFER
    assert C.defer_mode(7, "batchmean", 256, 3129, 1536, 256) == C.DEFER
    _compare(backend, (h, w, b, vqa_soft_scores(6, 97, gen, device=device), idx), gen, "batchmean", chunk_rows=None)


def test_batchmean_is_the_official_instance_level_bce(gen):
    """Official VQA: bce_with_logits(..., reduction='none').mean() * num_answers."""
    h, w, b, _ = linear_head_inputs(9, 16, 3129, gen)
    y = vqa_soft_scores(9, 3129, gen)
    official = F.binary_cross_entropy_with_logits(F.linear(h, w, b), y, reduction="none").mean() * 3129
    torch.testing.assert_close(M.fused_bce_soft(h, w, b, y), official)
    torch.testing.assert_close(M.fused_bce_soft(h, w, b, y, "mean"), official / 3129)


@pytest.mark.parametrize("backend", FUSED + ["reference"])
def test_empty_batch_is_zero(backend, gen, device):
    h, w, b, _ = linear_head_inputs(0, 8, 13, gen, device=device)
    y = torch.zeros(0, 13, device=device)
    loss, gh, gw, gb = value_and_grads(lambda h, w, b: M.fused_bce_soft(h, w, b, y, backend=backend), [h, w, b])
    assert float(loss) == 0.0 and (gw == 0).all() and (gb == 0).all()


@pytest.mark.parametrize("bad,match", [(1.5, r"must lie in \[0, 1\]"), (-0.2, r"must lie in \[0, 1\]"),
                                       (float("nan"), "non-finite")])
def test_invalid_scores_raise(bad, match, gen):
    h, w, b, _ = linear_head_inputs(3, 8, 13, gen)
    y = vqa_soft_scores(3, 13, gen)
    y[2, 5] = bad
    with pytest.raises(ValueError, match=f"'soft_scores' .*{match}"):
        M.fused_bce_soft(h, w, b, y)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_outputs_are_written_everywhere(backend, reduction, gen, device, poisoned):
    """Every allocation starts as NaN (the `poisoned` fixture): each loss row and gradient entry must be written."""
    h, w, b, idx = linear_head_inputs(9, 16, 513, gen, n_all=11, device=device)
    y = vqa_soft_scores(9, 513, gen, device=device)
    got = value_and_grads(lambda h, w, b: M.fused_bce_soft(h, w, b, y, reduction, indices=idx, chunk_rows=4,
                                                                backend=backend), [h, w, b])
    assert poisoned.hits > 0 and (reduction != "none" or poisoned.covers(got[0])), "the poison missed the outputs"
    for name, x in zip(NAMES, got):
        assert torch.isfinite(x).all(), f"{backend} {name} has unwritten entries"


def _good(gen):
    h, w, b, idx = linear_head_inputs(4, 8, 11, gen, n_all=6)
    return h, w, b, vqa_soft_scores(4, 11, gen), idx


@pytest.mark.parametrize(
    "mutate,err,match",
    [
        (lambda a: (a[0], a[1], a[2], a[3][:, :10], a[4]), ValueError, "'soft_scores' has 10 answers but"),
        (lambda a: (a[0], a[1], a[2], a[3][:2], a[4]), ValueError, "'soft_scores' has 2 rows but there are 4"),
        (lambda a: (a[0], a[1], a[2].half(), a[3], a[4]), TypeError, "'bias' has dtype torch.float16"),
        (lambda a: (a[0], a[1].t(), a[2], a[3], a[4]), ValueError, "'weight' has 11 columns"),
    ],
)
def test_bad_input_names_the_argument(mutate, err, match, gen):
    h, w, b, y, idx = mutate(_good(gen))
    with pytest.raises(err, match=match):
        M.fused_bce_soft(h, w, b, y, indices=idx)


def test_selection_and_bad_reduction(gen):
    h, w, b, y, idx = _good(gen)
    assert C.select_backend(M.BCE_SOFT, (h, w, b, y, idx), 4, 11, None) == "reference"  # tiny: eager is faster
    big = torch.zeros(1, 1).expand(256, 1536), torch.zeros(1, 1).expand(3129, 1536), torch.zeros(1).expand(3129)
    assert M.BCE_SOFT.select(*big, torch.zeros(1, 1).expand(256, 3129), None) == "torch_chunked"
    with pytest.raises(ValueError, match="'reduction' must be one of"):
        M.fused_bce_soft(h, w, b, y, "elementwise_mean", indices=idx)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("reduction,mask", [("batchmean", 7), ("batchmean", 7 | C.DEFER), ("none", 0)])
def test_opcheck(backend, reduction, mask, gen, device):
    h, w, b, y, idx = (x.to(device) for x in _good(gen))
    args = (h.requires_grad_(), w.requires_grad_(), b.requires_grad_(), y, idx, None, reduction, mask, 3, backend)
    torch.library.opcheck(torch.ops.fastvl.bce_soft.default, args)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "torch_chunked"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu(backend, dtype, gen, triton_device):
    h, w, b, _ = linear_head_inputs(256, 1536, 3129, gen, dtype=dtype, device=triton_device)
    y = vqa_soft_scores(256, 3129, gen, device=triton_device)
    _compare(backend, (h, w, b, y, None), gen, "batchmean", chunk_rows=None)
    _compare(backend, (h, w, b, y, None), gen, "none", chunk_rows=100)
