"""symmetric_kl (VILLA): every backend runnable here against the eager reference, forward and the gradients of
both sides, every F.kl_div reduction, leading dims, one side detached, errors, dispatch, opcheck."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from fastvl.ops import _chunked as C
from fastvl.ops import sym_kl as M
from fastvl.ops.testing import assert_close_to_ref, logit_pair, value_and_grads

FUSED = ["torch_chunked", "triton"]


def _compare(backend, a, b, gen, reduction="batchmean", chunk_rows=2, wrt=(0, 1)):
    def fast(a, b):
        return M.symmetric_kl(a, b, reduction, chunk_rows=chunk_rows, backend=backend)

    def ref(a, b):
        return M.symmetric_kl_reference(a, b, reduction)

    g = (torch.rand(ref(a, b).shape, generator=gen) + 0.5).to(a.device)
    got = value_and_grads(fast, [a, b], g, wrt)
    r32 = value_and_grads(ref, [a, b], g, wrt)
    r64 = value_and_grads(ref, [a.double(), b.double()], g.double(), wrt)
    names = ["loss"] + [["grad a", "grad b"][i] for i in wrt]
    for name, f, x, x64 in zip(names, got, r32, r64):
        assert f.dtype == x.dtype and f.shape == x.shape, f"{backend} {name}: {f.dtype} {f.shape} vs {x.dtype}"
        assert_close_to_ref(f, x64, x, f"{backend} {name}", dtype=a.dtype)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("reduction", ["batchmean", "mean", "sum", "none"])
@pytest.mark.parametrize("classes", [3129, 1601, 28996, 3])
def test_matches_reference(backend, reduction, classes, gen, device):
    a, b = logit_pair((5, classes), gen, device=device)
    _compare(backend, a, b, gen, reduction)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_leading_dims_and_non_contiguous(backend, reduction, gen, device):
    a, b = logit_pair((3, 4, 97), gen, device=device)
    _compare(backend, a.transpose(0, 1), b.transpose(0, 1), gen, reduction)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("side", [0, 1])
def test_one_side_detached(backend, side, gen, device):
    a, b = logit_pair((4, 3129), gen, device=device)
    _compare(backend, a, b, gen, "batchmean", wrt=(side,))


def test_exported_from_fastvl_ops_like_every_op():
    import fastvl.ops
    from fastvl.ops import symmetric_kl

    assert symmetric_kl is M.symmetric_kl and "symmetric_kl" in fastvl.ops.__all__
    assert float(symmetric_kl(torch.zeros(2, 3), torch.zeros(2, 3))) == 0.0


def test_matches_villa_formula(gen):
    """VILLA VQA: (kl_div(adv_logprob, clean_prob) + kl_div(clean_logprob, adv_prob)).mean() * num_answers."""
    adv, clean = logit_pair((6, 3129), gen)
    villa = (F.kl_div(F.log_softmax(adv, 1), F.softmax(clean, 1), reduction="none")
             + F.kl_div(F.log_softmax(clean, 1), F.softmax(adv, 1), reduction="none")).mean() * 3129
    torch.testing.assert_close(M.symmetric_kl(adv, clean), villa)


@pytest.mark.parametrize("backend", ["reference", *FUSED])
def test_masked_classes_give_finite_gradients(backend, gen, device):
    """Classes masked with -1e4 on both sides (probability exactly 0) carry no loss and get zero gradient; the
    rest equals the loss over the valid classes alone (F.kl_div's autograd gives NaN here)."""
    a, b = logit_pair((4, 9), gen, device=device)
    valid = 6
    full = []
    for x in (a, b):
        f = x.detach().clone()
        f[:, valid:] = -1e4
        full.append(f.requires_grad_())
    loss = M.symmetric_kl(*full, backend=backend)
    loss.backward()
    va, vb = (x.detach()[:, :valid].clone().requires_grad_() for x in (a, b))
    want = M.symmetric_kl_reference(va, vb)
    want.backward()
    torch.testing.assert_close(loss, want)
    for f, v in zip(full, (va, vb)):
        assert torch.isfinite(f.grad).all()
        torch.testing.assert_close(f.grad[:, :valid], v.grad)
        assert f.grad[:, valid:].abs().max() == 0


@pytest.mark.parametrize("backend", FUSED)
def test_identical_inputs_give_zero(backend, gen, device):
    a, _ = logit_pair((3, 50), gen, device=device)
    x = a.clone().requires_grad_()
    loss = M.symmetric_kl(x, x.detach().clone(), backend=backend)
    loss.backward()
    assert float(loss.detach()) == 0.0 and x.grad.abs().max() < 1e-7


@pytest.mark.parametrize("backend", FUSED + ["reference"])
def test_empty_is_zero(backend, device):
    a = torch.zeros(0, 7, device=device, requires_grad=True)
    loss = M.symmetric_kl(a, torch.zeros(0, 7, device=device), "batchmean", backend=backend)
    loss.backward()
    assert float(loss.detach()) == 0.0 and a.grad.shape == (0, 7)


@pytest.mark.parametrize("backend", FUSED)
def test_retain_graph(backend, gen, device):
    a, b = logit_pair((4, 33), gen, device=device)
    a.requires_grad_()
    loss = M.symmetric_kl(a, b, backend=backend)
    loss.backward(retain_graph=True)
    first = a.grad.clone()
    loss.backward()
    torch.testing.assert_close(a.grad, 2 * first)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_outputs_are_written_everywhere(backend, reduction, gen, device, poisoned):
    """Every allocation starts as NaN (the `poisoned` fixture): each loss row and gradient entry must be written."""
    a, b = logit_pair((5, 513), gen, device=device)
    got = value_and_grads(lambda a, b: M.symmetric_kl(a, b, reduction, chunk_rows=2, backend=backend), [a, b])
    assert poisoned.hits > 0 and (reduction != "none" or poisoned.covers(got[0])), "the poison missed the outputs"
    for name, x in zip(["loss", "grad a", "grad b"], got):
        assert torch.isfinite(x).all(), f"{backend} {name} has unwritten entries"


@settings(max_examples=10, deadline=None)
@given(rows=st.integers(1, 6), classes=st.integers(1, 40), chunk=st.integers(1, 4), seed=st.integers(0, 2**31 - 1),
       reduction=st.sampled_from(["batchmean", "mean", "sum", "none"]))
def test_property_torch_chunked(rows, classes, chunk, seed, reduction):
    gen = torch.Generator().manual_seed(seed)
    a, b = logit_pair((rows, classes), gen, spread=4.0, noise=2.0)
    _compare("torch_chunked", a, b, gen, reduction, chunk_rows=chunk)


@pytest.mark.parametrize(
    "args,err,match",
    [
        ((torch.zeros(2, 5), torch.zeros(2, 4)), ValueError, r"'logits_b' has shape \[2, 4\] but 'logits_a' has"),
        ((torch.zeros(2, 5), torch.zeros(2, 5, dtype=torch.float64)), TypeError, "'logits_b' has dtype torch.float64"),
        ((torch.zeros(2, 5), torch.zeros(2, 5, device="meta")), ValueError, "'logits_b' is on meta"),
        ((torch.zeros(()), torch.zeros(())), ValueError, r"'logits_a' must be at least 1-d"),
        ((torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, 5)), TypeError, "'logits_a' must be a float tensor"),
        ((torch.zeros(2, 5), [0.0]), TypeError, "'logits_b' must be a tensor"),
    ],
)
def test_bad_input_names_the_argument(args, err, match):
    with pytest.raises(err, match=match):
        M.symmetric_kl(*args)


def test_bad_reduction_and_selection(gen):
    a, b = logit_pair((2, 5), gen)
    with pytest.raises(ValueError, match="'reduction' must be one of"):
        M.symmetric_kl(a, b, "elementwise_mean")
    assert C.select_backend(M.SYMMETRIC_KL, (a, b), 2, 5, None) == "reference"  # tiny: eager is faster on CPU
    big = torch.zeros(1, 1).expand(256, 3129)
    assert M.SYMMETRIC_KL.select(big, big) == "torch_chunked"


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_opcheck(backend, reduction, gen, device):
    a, b = logit_pair((3, 11), gen, device=device)
    mask = 0 if reduction == "none" else 3
    args = (a.requires_grad_(), b.requires_grad_(), None, reduction, mask, 1 / 3, 2, backend)
    torch.library.opcheck(torch.ops.fastvl.symmetric_kl.default, args)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "torch_chunked"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu(backend, dtype, gen, triton_device):
    a, b = logit_pair((512, 3129), gen, dtype=dtype, device=triton_device)
    _compare(backend, a, b, gen, "batchmean", chunk_rows=200)
    _compare(backend, a, b, gen, "none", chunk_rows=200)
