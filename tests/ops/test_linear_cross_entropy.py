"""fused_linear_cross_entropy: every backend runnable here against the eager reference (forward, grad of
hidden / weight / bias), ignore_index rows, all-ignored batches, gathers, errors, dispatch, opcheck."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from fastvl.ops import BackendUnavailableError
from fastvl.ops import _chunked as C
from fastvl.ops import linear_cross_entropy as M
from fastvl.ops.testing import assert_close_to_ref, class_targets, linear_head_inputs, value_and_grads

FUSED = ["torch_chunked", "triton"]
NAMES = ["loss", "grad hidden", "grad weight", "grad bias"]


def _double(t):
    return t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t


def _compare(backend, inputs, gen, ignore_index=-1, reduction="mean", chunk_rows=3, wrt=(0, 1, 2)):
    """Fast backend vs reference: loss and the gradients of the inputs at ``wrt`` under a random grad_output."""
    h, w, b, t, idx = inputs

    def fast(h, w, b):
        return M.fused_linear_cross_entropy(h, w, b, t, ignore_index, reduction, indices=idx, chunk_rows=chunk_rows,
                                            backend=backend)

    def ref(h, w, b):
        return M.linear_cross_entropy_reference(h, w, b, t, ignore_index, reduction, idx)

    shape = ref(h, w, b).shape
    g = (torch.rand(shape, generator=gen) + 0.5).to(h.device)
    got = value_and_grads(fast, [h, w, b], g, wrt)
    r32 = value_and_grads(ref, [h, w, b], g, wrt)
    r64 = value_and_grads(ref, [_double(x) for x in (h, w, b)], g.double(), wrt)
    names = [NAMES[0]] + [NAMES[1 + i] for i in wrt]
    for name, f, a, b64 in zip(names, got, r32, r64):
        assert f.dtype == a.dtype, f"{backend} {name}: dtype {f.dtype} != reference {a.dtype}"
        # grad hidden sums V (up to 28996) products: float32 GEMM rounding alone reaches ~1e-5 relative and
        # differs between BLAS kernels (chunk vs whole batch), so its floor is 1e-4 instead of 1e-5
        floor = 1e-4 if name == "grad hidden" and f.dtype == torch.float32 else None
        assert_close_to_ref(f, b64, a, f"{backend} {name}", floor_rel=floor, dtype=h.dtype)
    return got


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("vocab", [28996, 1601, 3129, 2])
def test_matches_reference(backend, reduction, vocab, gen, device):
    h, w, b, _ = linear_head_inputs(7, 16, vocab, gen, device=device)
    t = class_targets(7, vocab, gen, ignore_frac=0.3, device=device)
    _compare(backend, (h, w, b, t, None), gen, reduction=reduction)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gather_by_indices_with_duplicates(backend, reduction, gen, device):
    h, w, b, idx = linear_head_inputs(9, 24, 1601, gen, n_all=13, device=device)
    idx[1] = idx[4]  # a duplicate row: its gradient must be added twice
    t = class_targets(9, 1601, gen, ignore_frac=0.2, device=device)
    got = _compare(backend, (h, w, b, t, idx), gen, reduction=reduction, chunk_rows=4)
    unused = torch.ones(13, dtype=torch.bool)
    unused[idx] = False
    assert (got[1][unused] == 0).all(), "rows of hidden that no index selects must get zero gradient"


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_single_chunk_defers_the_products_to_backward(backend, reduction, gen, device):
    """All rows in one chunk and dlogits smaller than the gradients: the DEFER scheme (as ITM, VQA use)."""
    h, w, b, idx = linear_head_inputs(6, 32, 97, gen, n_all=9, device=device)
    assert C.defer_mode(7, reduction, 6, 97, 32, 6) == C.DEFER
    t = class_targets(6, 97, gen, ignore_frac=0.3, device=device)
    _compare(backend, (h, w, b, t, idx), gen, reduction=reduction, chunk_rows=None)
    t = class_targets(6, 97, gen, device=device)
    _compare(backend, (h, w, b, t, idx), gen, reduction=reduction, chunk_rows=None, wrt=(1,))


@pytest.mark.parametrize("backend", FUSED)
def test_mrc_ignore_index_zero_no_bias(backend, gen, device):
    """MRC: ignore_index 0 (background), and a bias-free variant."""
    h, w, _, _ = linear_head_inputs(6, 16, 1601, gen, bias=False, device=device)
    t = class_targets(6, 1601, gen, ignore_frac=0.3, ignore_index=0, device=device)
    _compare(backend, (h, w, None, t, None), gen, ignore_index=0, wrt=(0, 1))


@pytest.mark.parametrize("backend", FUSED + ["reference"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_gives_zero_not_nan(backend, reduction, gen, device):
    h, w, b, _ = linear_head_inputs(5, 16, 3129, gen, device=device)
    t = torch.full((5,), -1, dtype=torch.long, device=device)
    loss, gh, gw, gb = value_and_grads(
        lambda h, w, b: M.fused_linear_cross_entropy(h, w, b, t, reduction=reduction, chunk_rows=2, backend=backend),
        [h, w, b])
    assert torch.isfinite(loss).all() and (loss == 0).all()
    for g in (gh, gw, gb):
        assert torch.isfinite(g).all() and (g == 0).all()


@pytest.mark.parametrize("backend", FUSED + ["reference"])
def test_empty_batch(backend, gen, device):
    h, w, b, _ = linear_head_inputs(0, 16, 37, gen, device=device)
    t = torch.zeros(0, dtype=torch.long, device=device)
    loss, gh, gw, gb = value_and_grads(lambda h, w, b: M.fused_linear_cross_entropy(h, w, b, t, backend=backend),
                                       [h, w, b])
    assert loss.shape == () and float(loss) == 0.0
    assert gh.shape == (0, 16) and (gw == 0).all() and (gb == 0).all()


def test_reference_is_f_cross_entropy(gen):
    h, w, b, _ = linear_head_inputs(11, 32, 97, gen)
    t = class_targets(11, 97, gen, ignore_frac=0.3)
    for red in ("mean", "sum", "none"):
        expected = F.cross_entropy(F.linear(h, w, b), t, ignore_index=-1, reduction=red)
        torch.testing.assert_close(M.linear_cross_entropy_reference(h, w, b, t, -1, red), expected)


@pytest.mark.parametrize("backend", FUSED)
def test_retain_graph_second_backward_is_identical(backend, gen, device):
    """VILLA calls backward(retain_graph=True) on losses that share a graph: precomputed gradients must survive."""
    h, w, b, _ = linear_head_inputs(6, 16, 257, gen, device=device)
    t = class_targets(6, 257, gen, device=device)
    w.requires_grad_()
    loss = M.fused_linear_cross_entropy(h, w, b, t, chunk_rows=4, backend=backend)
    (2 * loss).backward(retain_graph=True)
    first = w.grad.clone()
    w.grad = None
    (2 * loss).backward()
    torch.testing.assert_close(w.grad, first, rtol=0, atol=0)


@pytest.mark.parametrize("backend", FUSED)
def test_no_grad_and_partial_requires_grad(backend, gen, device):
    h, w, b, _ = linear_head_inputs(6, 16, 300, gen, device=device)
    t = class_targets(6, 300, gen, device=device)
    ref = M.linear_cross_entropy_reference(h, w, b, t)
    with torch.no_grad():
        out = M.fused_linear_cross_entropy(h, w.requires_grad_(), b, t, chunk_rows=4, backend=backend)
    assert not out.requires_grad
    torch.testing.assert_close(out, ref)
    w.requires_grad_(False)
    h.requires_grad_()  # only hidden needs a gradient
    M.fused_linear_cross_entropy(h, w, b, t, chunk_rows=4, backend=backend).backward()
    hr = h.detach().clone().requires_grad_()
    M.linear_cross_entropy_reference(hr, w, b, t).backward()
    torch.testing.assert_close(h.grad, hr.grad)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_outputs_are_written_everywhere(backend, reduction, gen, device, poisoned):
    """Every allocation starts as NaN (the `poisoned` fixture): each loss row and gradient entry must be written."""
    h, w, b, idx = linear_head_inputs(9, 16, 513, gen, n_all=11, device=device)
    t = class_targets(9, 513, gen, ignore_frac=0.3, device=device)
    got = value_and_grads(lambda h, w, b: M.fused_linear_cross_entropy(h, w, b, t, reduction=reduction, indices=idx,
                                                                       chunk_rows=4, backend=backend), [h, w, b])
    assert poisoned.hits > 0 and (reduction != "none" or poisoned.covers(got[0])), "the poison missed the outputs"
    for name, x in zip(NAMES, got):
        assert torch.isfinite(x).all(), f"{backend} {name} has unwritten entries"


@pytest.mark.parametrize("chunk_rows", [16, None])
def test_bf16_torch_chunked_on_cpu(chunk_rows, gen):
    """bfloat16 through the PyTorch backend (the softmax and gradient in float32, the products in bfloat16)."""
    h, w, b, idx = linear_head_inputs(40, 32, 3129, gen, n_all=50, dtype=torch.bfloat16)
    _compare("torch_chunked", (h, w, b, class_targets(40, 3129, gen, ignore_frac=0.2), idx), gen,
             chunk_rows=chunk_rows)


@pytest.mark.parametrize("backend", [None, *FUSED])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_autocast_bf16(backend, reduction, gen, device):
    """Under autocast the logits are bfloat16 (F.linear's autocast rule) and the loss float32. The tolerance rule
    against the low-precision computation: ref64 is the loss of those bfloat16 logits in float64 (the reference on
    identity weights), ref_lowp the reference run under autocast, the floor float32's. An op that ignored
    autocast (float32 logits) misses by ~1e-3 x the loss, 100 x the allowance."""
    if backend == "triton" and device.type == "cpu":
        pytest.skip("the Triton interpreter runs float32 only")
    h, w, b, _ = linear_head_inputs(8, 32, 1601, gen, device=device)
    t = class_targets(8, 1601, gen, device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        # chunks of 3 rows on the CPU (bitwise the same bfloat16 products); on a GPU one chunk, the reference's GEMM
        out = M.fused_linear_cross_entropy(h, w, b, t, reduction=reduction, chunk_rows=3 if device.type == "cpu"
                                           else None, backend=backend)
        ref_lowp = M.linear_cross_entropy_reference(h, w, b, t, reduction=reduction)
    assert out.dtype == ref_lowp.dtype == torch.float32
    logits = F.linear(h.bfloat16(), w.bfloat16(), b.bfloat16()).double()  # what autocast computes
    eye = torch.eye(logits.shape[1], dtype=torch.float64, device=device)
    ref64 = M.linear_cross_entropy_reference(logits, eye, None, t, reduction=reduction)
    assert_close_to_ref(out, ref64, ref_lowp, f"autocast {backend}", dtype=torch.float32)


@settings(max_examples=10, deadline=None)
@given(n=st.integers(0, 12), vocab=st.integers(1, 70), hidden=st.integers(1, 9), chunk=st.integers(1, 8),
       seed=st.integers(0, 2**31 - 1), reduction=st.sampled_from(["mean", "sum", "none"]))
def test_property_torch_chunked(n, vocab, hidden, chunk, seed, reduction):
    gen = torch.Generator().manual_seed(seed)
    h, w, b, _ = linear_head_inputs(n, hidden, vocab, gen)
    t = class_targets(n, vocab, gen, ignore_frac=0.3 if n else 0.0)
    _compare("torch_chunked", (h, w, b, t, None), gen, reduction=reduction, chunk_rows=chunk)


# ---------------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------------


def _good(gen):
    h, w, b, idx = linear_head_inputs(4, 8, 11, gen, n_all=6)
    return h, w, b, class_targets(4, 11, gen), idx


@pytest.mark.parametrize(
    "mutate,err,match",
    [
        (lambda a: (a[0], a[1], a[2], a[3].clone().fill_(11), a[4]), ValueError,
         r"'targets' must hold class ids in \[0, 11\) or ignore_index=-1, got 11"),
        (lambda a: (a[0], a[1], a[2], a[3].clone().fill_(-5), a[4]), ValueError, "got -5"),
        (lambda a: (a[0], a[1][:, :5], a[2], a[3], a[4]), ValueError, "'weight' has 5 columns but 'hidden' has hidden"),
        (lambda a: (a[0], a[1], a[2][:7], a[3], a[4]), ValueError, r"'bias' must have shape \[11\]"),
        (lambda a: (a[0], a[1], a[2], a[3][:3], a[4]), ValueError, "'targets' has 3 rows but there are 4 rows"),
        (lambda a: (a[0], a[1], a[2], a[3].float(), a[4]), TypeError, "'targets' must be an int64 or int32"),
        (lambda a: (a[0], a[1].double(), a[2], a[3], a[4]), TypeError, "'weight' has dtype torch.float64"),
        (lambda a: (a[0][0], a[1], a[2], a[3], a[4]), ValueError, r"'hidden' must be 2-d \[N, H\]"),
        (lambda a: (a[0], a[1], a[2], a[3], a[4].clone().fill_(6)), ValueError, r"'indices' must lie in \[0, 6\)"),
        (lambda a: (a[0], a[1].to("meta"), a[2], a[3], a[4]), ValueError, "'weight' is on meta but 'hidden' is on cpu"),
        (lambda a: (a[0], a[1], a[2], a[3].tolist(), a[4]), TypeError, "'targets' must be a tensor"),
    ],
)
def test_bad_input_names_the_argument(mutate, err, match, gen):
    h, w, b, t, idx = mutate(_good(gen))
    with pytest.raises(err, match=match):
        M.fused_linear_cross_entropy(h, w, b, t, indices=idx)


def test_bad_settings(gen):
    h, w, b, t, idx = _good(gen)
    with pytest.raises(ValueError, match="'reduction' must be one of"):
        M.fused_linear_cross_entropy(h, w, b, t, reduction="batchmean", indices=idx)
    with pytest.raises(ValueError, match="'chunk_rows' must be an int >= 1"):
        M.fused_linear_cross_entropy(h, w, b, t, indices=idx, chunk_rows=0)


# ---------------------------------------------------------------------------------------------------------------
# Dispatch, registration, compile
# ---------------------------------------------------------------------------------------------------------------


def test_selection_on_cpu(gen):
    h, w, b, t, idx = _good(gen)
    assert C.select_backend(M.LINEAR_CE, (h, w, b, t, idx), 4, 11, None) == "reference"  # tiny: eager is faster
    assert C.select_backend(M.LINEAR_CE, (h, w, b, t, idx), 4, 11, "torch_chunked") == "torch_chunked"
    big = torch.zeros(1, 1).expand(1536, 768), torch.zeros(1, 1).expand(1601, 768), torch.zeros(1).expand(1601)
    args = (*big, torch.zeros(1, dtype=torch.long).expand(1536), None)
    assert M.LINEAR_CE.select(*args) == "torch_chunked"
    assert C.select_backend(M.LINEAR_CE, args, 1536, 1601, None) == "torch_chunked"
    reasons = M.LINEAR_CE.reasons(h.double(), w.double(), b.double(), t, None)
    assert any("float64" in r for r in reasons["triton"])
    with pytest.raises(BackendUnavailableError, match="backend 'triton' was forced"):
        M.fused_linear_cross_entropy(h.double(), w.double(), b.double(), t, indices=idx, backend="triton")


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("reduction,mask", [("mean", 7), ("mean", 7 | C.DEFER), ("none", 0)])
def test_opcheck(backend, reduction, mask, gen, device):
    h, w, b, t, idx = (x.to(device) for x in _good(gen))
    t[0] = -1
    args = (h.requires_grad_(), w.requires_grad_(), b.requires_grad_(), t, idx, None, reduction, mask, 3, backend, -1)
    torch.library.opcheck(torch.ops.fastvl.linear_cross_entropy.default, args)


@pytest.mark.slow
def test_torch_compile_fullgraph(gen):
    h, w, b, t, idx = _good(gen)
    fn = torch.compile(lambda h: M.fused_linear_cross_entropy(h, w, b, t, indices=idx, backend="torch_chunked"),
                       fullgraph=True, backend="aot_eager")
    got = value_and_grads(fn, [h])
    ref = value_and_grads(lambda h: M.linear_cross_entropy_reference(h, w, b, t, indices=idx), [h])
    for a, r in zip(got, ref):
        torch.testing.assert_close(a, r)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "torch_chunked"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab,hidden,n", [(28996, 768, 1536), (1601, 768, 333), (2, 768, 64)])
def test_gpu(backend, dtype, vocab, hidden, n, gen, triton_device):
    h, w, b, idx = linear_head_inputs(n, hidden, vocab, gen, n_all=n * 6, dtype=dtype, device=triton_device)
    t = class_targets(n, vocab, gen, ignore_frac=0.1, device=triton_device)
    _compare(backend, (h, w, b, t, idx), gen, reduction="mean", chunk_rows=None)
    _compare(backend, (h, w, b, t, idx), gen, reduction="none", chunk_rows=257)
