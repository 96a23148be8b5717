"""fused_masked_regression (UNITER MRFR 'mse', HERO MFFR 'l2'): every backend runnable here against the eager
reference, forward and the gradients of hidden / weight_t / bias, reductions, the tied transposed weight,
gathers, zero distances, errors, dispatch, opcheck."""

import pytest
import torch
import torch.nn.functional as F

from fastvl.ops import _chunked as C
from fastvl.ops import masked_regression as M
from fastvl.ops.testing import assert_close_to_ref, linear_head_inputs, value_and_grads

FUSED = ["torch_chunked", "triton"]
NAMES = ["loss", "grad hidden", "grad weight_t", "grad bias"]


def _double(t):
    return t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t


def _compare(backend, inputs, gen, reduction="mean", loss="mse", chunk_rows=3, wrt=(0, 1, 2)):
    h, wt, b, y, idx = inputs

    def fast(h, wt, b):
        return M.fused_masked_regression(h, wt, b, y, reduction, loss, indices=idx, chunk_rows=chunk_rows,
                                         backend=backend)

    def ref(h, wt, b):
        return M.masked_regression_reference(h, wt, b, y, reduction, loss, idx)

    g = (torch.rand(ref(h, wt, b).shape, generator=gen) + 0.5).to(h.device)
    got = value_and_grads(fast, [h, wt, b], g, wrt)
    r32 = value_and_grads(ref, [h, wt, b], g, wrt)
    r64 = value_and_grads(lambda h, wt, b: M.masked_regression_reference(h, wt, b, y.double(), reduction, loss, idx),
                          [_double(x) for x in (h, wt, b)], g.double(), wrt)
    for name, f, a, a64 in zip([NAMES[0]] + [NAMES[1 + i] for i in wrt], got, r32, r64):
        assert f.dtype == a.dtype, f"{backend} {name}: dtype {f.dtype} != reference {a.dtype}"
        floor = 1e-4 if name == "grad hidden" and f.dtype == torch.float32 else None  # sums D products
        assert_close_to_ref(f, a64, a, f"{backend} {name}", floor_rel=floor, dtype=h.dtype)
    return got


def _inputs(n, hidden, feat, gen, **kw):
    h, wt, b, idx = linear_head_inputs(n, hidden, feat, gen, transposed=True, logit_std=1.0, **kw)
    y = torch.randn(n, feat, generator=gen).relu()  # region features are post-ReLU
    return h, wt, b, y.to(h.device, h.dtype), idx


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("loss", ["mse", "l2"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("feat", [2048, 4352, 1601])
def test_matches_reference(backend, loss, reduction, feat, gen, device):
    _compare(backend, _inputs(7, 16, feat, gen, device=device), gen, reduction, loss)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("loss", ["mse", "l2"])
def test_gather_no_bias(backend, loss, gen, device):
    h, wt, _, y, idx = _inputs(6, 24, 2048, gen, n_all=10, bias=False, device=device)
    _compare(backend, (h, wt, None, y, idx), gen, "mean", loss, chunk_rows=4, wrt=(0, 1))


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("loss", ["mse", "l2"])
def test_single_chunk_defers_the_products_to_backward(backend, loss, gen, device):
    h, wt, b, y, idx = _inputs(6, 32, 97, gen, n_all=9, device=device)
    assert C.defer_mode(7, "mean", 6, 97, 32, 6) == C.DEFER
    _compare(backend, (h, wt, b, y, idx), gen, "mean", loss, chunk_rows=None)


def test_official_mrfr_and_mffr_formulas(gen):
    """UNITER: F.linear(h, img_linear.weight.t(), bias) then mse(reduction='none').mean();
    HERO: sqrt(mse(reduction='none').sum(1)).mean()."""
    img_linear = torch.nn.Linear(2048, 32)  # weight [32, 2048], as UNITER's img_embeddings.img_linear (H=32)
    h = torch.randn(5, 32, generator=gen)
    bias = torch.randn(2048, generator=gen)
    y = torch.randn(5, 2048, generator=gen)
    with torch.no_grad():
        pred = F.linear(h, img_linear.weight.t(), bias)
        torch.testing.assert_close(M.fused_masked_regression(h, img_linear.weight, bias, y),
                                   F.mse_loss(pred, y, reduction="none").mean())
        torch.testing.assert_close(M.fused_masked_regression(h, img_linear.weight, bias, y, loss="l2"),
                                   torch.sqrt(F.mse_loss(pred, y, reduction="none").sum(1)).mean())


@pytest.mark.parametrize("backend", FUSED)
def test_tied_weight_gets_the_gradient_in_its_own_layout(backend, gen, device):
    img_linear = torch.nn.Linear(300, 16).to(device)
    h = torch.randn(4, 16, generator=gen).to(device)
    y = torch.randn(4, 300, generator=gen).to(device)
    M.fused_masked_regression(h, img_linear.weight, None, y, backend=backend).backward()
    assert img_linear.weight.grad.shape == (16, 300) and img_linear.weight.grad.is_contiguous()
    w = img_linear.weight.detach().clone().requires_grad_()
    M.masked_regression_reference(h, w, None, y).backward()
    torch.testing.assert_close(img_linear.weight.grad, w.grad)


@pytest.mark.parametrize("backend", FUSED)
def test_l2_zero_distance_has_zero_gradient(backend, gen, device):
    h, wt, b, _, _ = _inputs(3, 8, 64, gen, device=device)
    h[0], h[2] = 0.0, 0.0  # rows 0 and 2 predict exactly the bias ...
    y = b.repeat(3, 1)  # ... which is their target: distance exactly 0
    y[1] = h[1] @ wt + b + 1.0  # row 1 has distance 8
    h.requires_grad_()
    loss = M.fused_masked_regression(h, wt, b, y, "sum", "l2", backend=backend)
    loss.backward()
    torch.testing.assert_close(loss, torch.tensor(8.0, device=device), rtol=1e-5, atol=1e-4)
    assert torch.isfinite(h.grad).all() and (h.grad[0] == 0).all() and (h.grad[2] == 0).all()


@pytest.mark.parametrize("backend", FUSED + ["reference"])
@pytest.mark.parametrize("loss", ["mse", "l2"])
def test_empty_batch_is_zero(backend, loss, gen, device):
    h, wt, b, y, _ = _inputs(0, 8, 13, gen, device=device)
    out, gh, gw, gb = value_and_grads(
        lambda h, wt, b: M.fused_masked_regression(h, wt, b, y, loss=loss, backend=backend), [h, wt, b])
    assert float(out) == 0.0 and (gw == 0).all() and (gb == 0).all()


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_outputs_are_written_everywhere(backend, reduction, gen, device, poisoned):
    """Every allocation starts as NaN (the `poisoned` fixture): each loss row and gradient entry must be written."""
    h, w, b, y, idx = _inputs(9, 16, 513, gen, n_all=11, device=device)
    got = value_and_grads(lambda h, w, b: M.fused_masked_regression(h, w, b, y, reduction, indices=idx, chunk_rows=4,
                                                                         backend=backend), [h, w, b])
    assert poisoned.hits > 0 and (reduction != "none" or poisoned.covers(got[0])), "the poison missed the outputs"
    for name, x in zip(NAMES, got):
        assert torch.isfinite(x).all(), f"{backend} {name} has unwritten entries"


def _good(gen):
    return _inputs(4, 8, 20, gen, n_all=6)


@pytest.mark.parametrize(
    "mutate,err,match",
    [
        (lambda a: (a[0], a[1].t(), a[2], a[3], a[4]), ValueError, "'weight_t' has 20 rows but 'hidden' has hidden"),
        (lambda a: (a[0], a[1], a[2][:5], a[3], a[4]), ValueError, r"'bias' must have shape \[20\]"),
        (lambda a: (a[0], a[1], a[2], a[3][:, :7], a[4]), ValueError, "'targets' has 7 features but"),
        (lambda a: (a[0], a[1], a[2], a[3][:1], a[4]), ValueError, "'targets' has 1 rows but there are 4"),
        (lambda a: (a[0], a[1], a[2], a[3].int(), a[4]), TypeError, "'targets' must be a float tensor"),
        (lambda a: (a[0], a[1], a[2], a[3], a[4].clone().fill_(-1)), ValueError, r"'indices' must lie in \[0, 6\)"),
    ],
)
def test_bad_input_names_the_argument(mutate, err, match, gen):
    h, wt, b, y, idx = mutate(_good(gen))
    with pytest.raises(err, match=match):
        M.fused_masked_regression(h, wt, b, y, indices=idx)


def test_bad_settings_and_selection(gen):
    h, wt, b, y, idx = _good(gen)
    with pytest.raises(ValueError, match="'loss' must be one of"):
        M.fused_masked_regression(h, wt, b, y, loss="l1", indices=idx)
    with pytest.raises(ValueError, match="'reduction' must be one of"):
        M.fused_masked_regression(h, wt, b, y, "batchmean", indices=idx)
    assert C.select_backend(M.MASKED_REGRESSION, (h, wt, b, y, idx), 4, 20, None) == "reference"  # tiny problem
    big = torch.zeros(1, 1).expand(1536, 768), torch.zeros(1, 1).expand(768, 2048), torch.zeros(1).expand(2048)
    assert M.MASKED_REGRESSION.select(*big, torch.zeros(1, 1).expand(1536, 2048), None) == "torch_chunked"


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("reduction,loss,mask", [("mean", "mse", 7), ("sum", "l2", 7 | C.DEFER), ("none", "mse", 0),
                                               ("none", "l2", 0)])
def test_opcheck(backend, reduction, loss, mask, gen, device):
    h, wt, b, y, idx = (x.to(device) for x in _good(gen))
    args = (h.requires_grad_(), wt.requires_grad_(), b.requires_grad_(), y, idx, None, reduction, mask, 3, backend,
            loss)
    torch.library.opcheck(torch.ops.fastvl.masked_regression.default, args)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "torch_chunked"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("loss", ["mse", "l2"])
def test_gpu(backend, dtype, loss, gen, triton_device):
    h, wt, b, y, idx = _inputs(1536, 768, 2048, gen, n_all=10240, dtype=dtype, device=triton_device)
    _compare(backend, (h, wt, b, y, idx), gen, "mean", loss, chunk_rows=None)
    _compare(backend, (h, wt, b, y, idx), gen, "none", loss, chunk_rows=500)
