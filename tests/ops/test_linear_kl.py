"""fused_linear_kl (MRC-kl): every backend runnable here against the eager reference, forward and the gradients
of hidden / weight / bias, every reduction, gathers, soft-target checks (warn vs error), dispatch, opcheck."""

import warnings

import pytest
import torch
import torch.nn.functional as F

from fastvl.ops import _chunked as C
from fastvl.ops import linear_kl as M
from fastvl.ops.testing import assert_close_to_ref, linear_head_inputs, soft_label_targets, value_and_grads

FUSED = ["torch_chunked", "triton"]
NAMES = ["loss", "grad hidden", "grad weight", "grad bias"]


def _double(t):
    return t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t


def _compare(backend, inputs, gen, reduction="elementwise_mean", chunk_rows=3, wrt=(0, 1, 2)):
    h, w, b, p, idx = inputs

    def fast(h, w, b):
        return M.fused_linear_kl(h, w, b, p, reduction, indices=idx, chunk_rows=chunk_rows, backend=backend)

    def ref(h, w, b):
        return M.linear_kl_reference(h, w, b, p, reduction, idx)

    g = (torch.rand(ref(h, w, b).shape, generator=gen) + 0.5).to(h.device)
    got = value_and_grads(fast, [h, w, b], g, wrt)
    r32 = value_and_grads(ref, [h, w, b], g, wrt)
    r64 = value_and_grads(lambda h, w, b: M.linear_kl_reference(h, w, b, p.double(), reduction, idx),
                          [_double(x) for x in (h, w, b)], g.double(), wrt)
    for name, f, a, a64 in zip([NAMES[0]] + [NAMES[1 + i] for i in wrt], got, r32, r64):
        assert f.dtype == a.dtype, f"{backend} {name}: dtype {f.dtype} != reference {a.dtype}"
        # grad hidden sums V products: float32 GEMM rounding alone reaches ~1e-5 relative (see the CE tests)
        floor = 1e-4 if name == "grad hidden" and f.dtype == torch.float32 else None
        assert_close_to_ref(f, a64, a, f"{backend} {name}", floor_rel=floor, dtype=h.dtype)
    return got


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("reduction", ["elementwise_mean", "batchmean", "sum", "none"])
@pytest.mark.parametrize("vocab", [1601, 3129, 28996])
def test_matches_reference(backend, reduction, vocab, gen, device):
    h, w, b, _ = linear_head_inputs(7, 16, vocab, gen, device=device)
    _compare(backend, (h, w, b, soft_label_targets(7, vocab, gen, device=device), None), gen, reduction)


@pytest.mark.parametrize("backend", FUSED)
def test_gather_by_indices_fp16_targets_no_bias(backend, gen, device):
    """UNITER's soft labels are stored in float16; masked regions are gathered by index."""
    h, w, _, idx = linear_head_inputs(6, 24, 1601, gen, n_all=11, bias=False, device=device)
    p = soft_label_targets(6, 1601, gen, dtype=torch.float16, device=device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # float16 rows may sum to 1 only within ~1e-3
        _compare(backend, (h, w, None, p, idx), gen, "elementwise_mean", chunk_rows=4, wrt=(0, 1))


@pytest.mark.parametrize("backend", FUSED)
def test_single_chunk_defers_the_products_to_backward(backend, gen, device):
    h, w, b, idx = linear_head_inputs(6, 32, 97, gen, n_all=9, device=device)
    assert C.defer_mode(7, "batchmean", 6, 97, 32, 6) == C.DEFER
    _compare(backend, (h, w, b, soft_label_targets(6, 97, gen, device=device), idx), gen, "batchmean", chunk_rows=None)


def test_mean_is_the_official_element_mean(gen):
    """Official MRC-kl: kl_div(log_softmax(pred), soft, reduction='none').mean(); 'mean' is the same."""
    h, w, b, _ = linear_head_inputs(5, 16, 101, gen)
    p = soft_label_targets(5, 101, gen)
    official = F.kl_div(F.log_softmax(F.linear(h, w, b), dim=-1), p, reduction="none").mean()
    for red in ("elementwise_mean", "mean"):
        torch.testing.assert_close(M.fused_linear_kl(h, w, b, p, red), official)
    torch.testing.assert_close(M.fused_linear_kl(h, w, b, p, "batchmean"), official * 101)


@pytest.mark.parametrize("backend", FUSED)
def test_unnormalised_targets_warn_and_match_f_kl_div(backend, gen, device):
    h, w, b, _ = linear_head_inputs(5, 16, 257, gen, device=device)
    p = soft_label_targets(5, 257, gen, device=device)
    p[1] *= 0.5
    p[3] = 0.0  # an all-zero row contributes 0
    with pytest.warns(UserWarning, match="rows of 'soft_targets' should sum to 1; 2 row"):
        M.fused_linear_kl(h, w, b, p, backend=backend)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        _compare(backend, (h, w, b, p, None), gen, "sum")


@pytest.mark.parametrize("bad,match", [(-0.1, "must be non-negative"), (float("nan"), "non-finite"),
                                       (float("inf"), "non-finite")])
def test_invalid_soft_targets_raise(bad, match, gen):
    h, w, b, _ = linear_head_inputs(3, 8, 13, gen)
    p = soft_label_targets(3, 13, gen)
    p[1, 4] = bad
    with pytest.raises(ValueError, match=match):
        M.fused_linear_kl(h, w, b, p)
    M.fused_linear_kl(h, w, b, p, validate=False)  # the check is skippable (as on GPU by default)


@pytest.mark.parametrize("backend", FUSED + ["reference"])
@pytest.mark.parametrize("reduction", ["elementwise_mean", "batchmean", "sum"])
def test_empty_batch_is_zero(backend, reduction, gen, device):
    h, w, b, _ = linear_head_inputs(0, 8, 13, gen, device=device)
    p = torch.zeros(0, 13, device=device)
    loss, gh, gw, gb = value_and_grads(lambda h, w, b: M.fused_linear_kl(h, w, b, p, reduction, backend=backend),
                                       [h, w, b])
    assert float(loss) == 0.0 and (gw == 0).all() and (gb == 0).all()


@pytest.mark.parametrize("backend", FUSED)
def test_retain_graph(backend, gen, device):
    h, w, b, _ = linear_head_inputs(4, 8, 29, gen, device=device)
    p = soft_label_targets(4, 29, gen, device=device)
    h.requires_grad_()
    loss = M.fused_linear_kl(h, w, b, p, backend=backend)
    loss.backward(retain_graph=True)
    first = h.grad.clone()
    loss.backward()
    torch.testing.assert_close(h.grad, 2 * first)


# ---------------------------------------------------------------------------------------------------------------
# Errors, dispatch, registration
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_outputs_are_written_everywhere(backend, reduction, gen, device, poisoned):
    """Every allocation starts as NaN (the `poisoned` fixture): each loss row and gradient entry must be written."""
    h, w, b, idx = linear_head_inputs(9, 16, 513, gen, n_all=11, device=device)
    p = soft_label_targets(9, 513, gen, device=device)
    got = value_and_grads(lambda h, w, b: M.fused_linear_kl(h, w, b, p, reduction, indices=idx, chunk_rows=4,
                                                                 backend=backend), [h, w, b])
    assert poisoned.hits > 0 and (reduction != "none" or poisoned.covers(got[0])), "the poison missed the outputs"
    for name, x in zip(NAMES, got):
        assert torch.isfinite(x).all(), f"{backend} {name} has unwritten entries"


def _good(gen):
    h, w, b, idx = linear_head_inputs(4, 8, 11, gen, n_all=6)
    return h, w, b, soft_label_targets(4, 11, gen), idx


@pytest.mark.parametrize(
    "mutate,err,match",
    [
        (lambda a: (a[0], a[1], a[2], a[3][:, :10], a[4]), ValueError, "'soft_targets' has 10 classes but"),
        (lambda a: (a[0], a[1], a[2], a[3][:3], a[4]), ValueError, "'soft_targets' has 3 rows but there are 4"),
        (lambda a: (a[0], a[1], a[2], a[3][0], a[4]), ValueError, r"'soft_targets' must be 2-d \[N, 11\]"),
        (lambda a: (a[0], a[1], a[2], a[3].long(), a[4]), TypeError, "'soft_targets' must be a float tensor"),
        (lambda a: (a[0], a[1][:, :3], a[2], a[3], a[4]), ValueError, "'weight' has 3 columns"),
        (lambda a: (a[0], a[1], a[2], a[3], a[4].float()), TypeError, "'indices' must be an int64 or int32"),
    ],
)
def test_bad_input_names_the_argument(mutate, err, match, gen):
    h, w, b, p, idx = mutate(_good(gen))
    with pytest.raises(err, match=match):
        M.fused_linear_kl(h, w, b, p, indices=idx)


def test_bad_reduction(gen):
    h, w, b, p, idx = _good(gen)
    with pytest.raises(ValueError, match="'reduction' must be one of"):
        M.fused_linear_kl(h, w, b, p, "avg", indices=idx)


def test_selection_on_cpu(gen):
    h, w, b, p, idx = _good(gen)
    assert C.select_backend(M.LINEAR_KL, (h, w, b, p, idx), 4, 11, None) == "reference"  # tiny: eager is faster
    big = torch.zeros(1, 1).expand(1536, 768), torch.zeros(1, 1).expand(1601, 768), torch.zeros(1).expand(1601)
    assert M.LINEAR_KL.select(*big, torch.zeros(1, 1).expand(1536, 1601), None) == "torch_chunked"


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("reduction,mask", [("elementwise_mean", 7), ("sum", 7 | C.DEFER), ("none", 0)])
def test_opcheck(backend, reduction, mask, gen, device):
    h, w, b, p, idx = (x.to(device) for x in _good(gen))
    args = (h.requires_grad_(), w.requires_grad_(), b.requires_grad_(), p, idx, None, reduction, mask, 3, backend)
    torch.library.opcheck(torch.ops.fastvl.linear_kl.default, args)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "torch_chunked"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu(backend, dtype, gen, triton_device):
    h, w, b, idx = linear_head_inputs(1536, 768, 1601, gen, n_all=10240, dtype=dtype, device=triton_device)
    p = soft_label_targets(1536, 1601, gen, device=triton_device)
    _compare(backend, (h, w, b, p, idx), gen, "elementwise_mean", chunk_rows=None)
    _compare(backend, (h, w, b, p, idx), gen, "none", chunk_rows=500)
