"""cross_modal_attention: the Triton kernels (interpreter on CPU, fp32; bf16/fp16 on GPU) and peers vs the reference.

Every test that runs the Triton kernels builds its tensors on the `triton_device` fixture (tests/conftest.py)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastvl.ops import BackendUnavailableError
from fastvl.ops import _attention_peers as P
from fastvl.ops import _dispatch as D
from fastvl.ops import attention as A
from fastvl.ops.testing import FLOOR_REL, assert_close_to_ref, attention_inputs, cu_seqlens, max_abs_err, tolerance

# (lens_q, lens_k or None, prefix_lens or None) per mask: odd lengths 1, 7, 97, 130; a batch of 1; an empty
# prefix, a prefix covering the whole sequence and one past it; cross rows without keys (text-only) or queries.
CASES = {
    "bidirectional": [([1], None, None), ([7, 1, 20], None, None), ([130, 97], None, None)],
    "seq2seq": [([1], None, [0]), ([7, 1, 20, 9], None, [0, 1, 20, 3]), ([130, 97], None, [0, 50]),
                ([12], None, [40])],
    "cross": [([1], [1], None), ([7, 1, 20], [13, 0, 5], None), ([130, 97], [60, 100], None), ([0, 5], [4, 3], None)],
}
FLAT_CASES = [(m, *c) for m, cases in CASES.items() for c in cases]


def _reference(args, dtype, dout, dropout_p=0.0, keep=None, scale=None):
    """out and (dq, dk, dv) of the reference in ``dtype``."""
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in args[:3])
    out = A.cross_modal_attention_reference(q, k, v, *args[3:], dropout_p, scale, dropout_keep=keep)
    out.backward(dout.to(dtype))
    return out, (q.grad, k.grad, v.grad)


def _fused(args, backend="triton", dropout_p=0.0, seed=None, scale=None, dout=None, **kw):
    q, k, v = (t.detach().clone().requires_grad_() for t in args[:3])
    out = A.cross_modal_attention(q, k, v, *args[3:], dropout_p, scale, backend=backend, dropout_seed=seed, **kw)
    if dout is not None:
        out.backward(dout)
    return out, (q.grad, k.grad, v.grad)


def _assert_poisoned_and_written(poisoned, out, grads):
    """The poison reached the fused outputs (their allocations started as NaN) and every entry was written."""
    for name, t in zip(("out", "dq", "dk", "dv"), (out, *grads)):
        if t.numel():
            assert poisoned.covers(t), f"{name}: its allocation was not poisoned, so a gap could not be seen"
        assert torch.isfinite(t).all(), f"{name} has entries the kernel did not write"


def _check_against_reference(args, gen, backend="triton", dropout_p=0.0, scale=None):
    """Forward and backward of ``backend`` vs the reference under the tolerance rule (same keep-mask)."""
    q = args[0]
    seed = A.draw_dropout_seed(q.device) if dropout_p > 0 else None
    dout = torch.randn(q.shape, generator=gen).to(q.device, q.dtype)
    out, grads = _fused(args, backend, dropout_p, seed, scale, dout)
    keep = A.dropout_keep_mask(seed, args[3], args[4], args[5], args[6], q.shape[1], dropout_p) if seed is not None \
        else None
    ref64, grads64 = _reference(args, torch.float64, dout, dropout_p, keep, scale)
    ref_lp, grads_lp = _reference(args, q.dtype, dout, dropout_p, keep, scale)
    assert_close_to_ref(out, ref64, ref_lp, f"{backend} out")
    # A gradient can be exactly 0 in float64 (dq of a row with one visible key: p = 1 so dp - delta = 0), which
    # leaves the relative floor nothing to scale with; its natural size |dout| |v| |k| scale stands in then.
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    natural = (float(dout.abs().max() * args[2].abs().max() * args[1].abs().max()) * scale
               if q.numel() and args[1].numel() else 0.0)  # no query (or no key) rows at all: nothing to scale
    for name, g, g64, glp in zip(("dq", "dk", "dv"), grads, grads64, grads_lp):
        if (float(g64.abs().max()) if g64.numel() else 0.0) >= natural:
            assert_close_to_ref(g, g64, glp, f"{backend} {name}")
        else:
            err, tol = max_abs_err(g, g64), tolerance(g64, glp) + FLOOR_REL[q.dtype] * natural
            assert err <= tol, f"{backend} {name}: max|fast - ref64| = {err:.3e} > allowed {tol:.3e}"
    return out, grads


# ---------------------------------------------------------------------------------------------------------------
# The reference against a direct per-sequence transcription of the mask rules
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mask,lens_q,lens_k,prefix", [c for c in FLAT_CASES if max(c[1]) < 50])
def test_reference_matches_direct_definition(mask, lens_q, lens_k, prefix, gen):
    args = attention_inputs(lens_q, lens_k, 3, 8, gen, torch.float64, mask=mask, prefix_lens=prefix)
    q, k, v, cq, ck = args[:5]
    out = A.cross_modal_attention_reference(*args)
    for b in range(len(lens_q)):
        qs, ks, vs = q[cq[b]:cq[b + 1]], k[ck[b]:ck[b + 1]], v[ck[b]:ck[b + 1]]
        for i in range(qs.shape[0]):
            for h in range(3):
                vis = [j for j in range(ks.shape[0]) if mask != "seq2seq" or j < prefix[b] or j <= i]
                expected = torch.zeros(8, dtype=torch.float64)
                if vis:
                    s = torch.stack([qs[i, h] @ ks[j, h] / math.sqrt(8) for j in vis])
                    expected = (torch.softmax(s, 0)[:, None] * vs[vis, h]).sum(0)
                torch.testing.assert_close(out[cq[b] + i, h], expected, rtol=1e-12, atol=1e-12)


def test_reference_return_probs(gen):
    args = attention_inputs([5, 3], [4, 0], 2, 8, gen, mask="cross")
    out, probs = A.cross_modal_attention(*args, return_probs=True)
    assert probs.shape == (2, 2, 5, 4)
    torch.testing.assert_close(probs[0].sum(-1), torch.ones(2, 5))
    assert probs[1].eq(0).all() and out[5:].eq(0).all()
    out_ref, _ = A.cross_modal_attention(*args, return_probs=True, backend="reference")
    assert torch.equal(out, out_ref)


def test_return_probs_with_a_forced_backend_that_cannot_serve_it_raises(gen, triton_device, monkeypatch):
    """Only the reference returns probabilities: forcing another backend raises with its reasons (no silent
    fallback to the reference), by argument or by FASTVL_BACKEND, and an unknown name raises as well."""
    args = attention_inputs([5, 3], None, 2, 32, gen, device=triton_device)
    with pytest.raises(BackendUnavailableError, match=r"backend 'triton' was forced \(backend=\).*return_probs needs "
                                                      r"the reference backend"):
        A.cross_modal_attention(*args, return_probs=True, backend="triton")
    with pytest.raises(BackendUnavailableError, match="unknown backend 'nope'"):
        A.cross_modal_attention(*args, return_probs=True, backend="nope")
    monkeypatch.setenv("FASTVL_BACKEND", "attention=triton")
    with pytest.raises(BackendUnavailableError, match=r"\(FASTVL_BACKEND\).*return_probs needs the reference"):
        A.cross_modal_attention(*args, return_probs=True)
    monkeypatch.setenv("FASTVL_BACKEND", "triton")
    with pytest.raises(BackendUnavailableError, match=r"\(FASTVL_BACKEND\).*return_probs"):
        A.cross_modal_attention(*args, return_probs=True)
    monkeypatch.setenv("FASTVL_BACKEND", "attention=reference")
    assert A.cross_modal_attention(*args, return_probs=True)[1].shape == (2, 2, 5, 5)


# ---------------------------------------------------------------------------------------------------------------
# Triton (interpreter on CPU in fp32)
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mask,lens_q,lens_k,prefix", FLAT_CASES)
def test_triton_matches_reference(mask, lens_q, lens_k, prefix, gen, triton_device, poisoned):
    args = attention_inputs(lens_q, lens_k, 2, 32, gen, device=triton_device, mask=mask, prefix_lens=prefix)
    out, grads = _check_against_reference(args, gen)
    _assert_poisoned_and_written(poisoned, out, grads)


@pytest.mark.parametrize("head_dim", [16, 64, 80, 96, 128])
@pytest.mark.parametrize("mask", ["bidirectional", "seq2seq"])
def test_triton_head_dims(head_dim, mask, gen, triton_device, poisoned):
    args = attention_inputs([7, 20], None, 1, head_dim, gen, device=triton_device, mask=mask,
                            prefix_lens=[3, 4] if mask == "seq2seq" else None)
    _assert_poisoned_and_written(poisoned, *_check_against_reference(args, gen))


def test_triton_softmax_scale(gen, triton_device):
    args = attention_inputs([9, 17], None, 2, 32, gen, device=triton_device, mask="seq2seq", prefix_lens=[2, 5])
    _check_against_reference(args, gen, scale=0.37)


def test_rows_without_keys_are_zero_and_finite(gen, triton_device, poisoned):
    """Cross rows whose key set is empty: output 0, gradients finite (dq 0), never NaN."""
    args = attention_inputs([3, 4, 2], [0, 5, 0], 2, 32, gen, device=triton_device, mask="cross")
    q, k, v = (t.clone().requires_grad_() for t in args[:3])
    out = A.cross_modal_attention(q, k, v, *args[3:], backend="triton")
    assert out[:3].eq(0).all() and out[7:].eq(0).all()
    out.square().sum().backward()
    assert q.grad[:3].eq(0).all() and q.grad[7:].eq(0).all()
    _assert_poisoned_and_written(poisoned, out, (q.grad, k.grad, v.grad))


def test_strided_views_of_fused_qkv(gen, triton_device):
    """q, k, v as views of one [T, 3, H, D] projection (token stride 3*H*D) give the contiguous result."""
    qkv = torch.randn(27, 3, 2, 32, generator=gen).to(triton_device)
    cu = cu_seqlens([20, 7], triton_device)
    views = [qkv[:, i] for i in range(3)]
    out = A.cross_modal_attention(*views, cu, cu, 20, 20, backend="triton")
    ref = A.cross_modal_attention(*(t.contiguous() for t in views), cu, cu, 20, 20, backend="triton")
    assert torch.equal(out, ref)


def test_backward_is_deterministic(gen, triton_device):
    args = attention_inputs([33, 18], None, 2, 32, gen, device=triton_device, mask="seq2seq", prefix_lens=[5, 0])
    dout = torch.randn(args[0].shape, generator=gen).to(triton_device)
    seed = A.draw_dropout_seed(triton_device)
    runs = [_fused(args, dropout_p=0.1, seed=seed, dout=dout) for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0])
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))


# ---------------------------------------------------------------------------------------------------------------
# Dropout
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mask,lens_q,lens_k,prefix", [("seq2seq", [7, 33], None, [3, 0]),
                                                       ("cross", [7, 20], [9, 0], None),
                                                       ("bidirectional", [1, 40], None, None)])
def test_dropout_gradients_match_reference_with_same_mask(mask, lens_q, lens_k, prefix, gen, triton_device):
    args = attention_inputs(lens_q, lens_k, 2, 32, gen, device=triton_device, mask=mask, prefix_lens=prefix)
    _check_against_reference(args, gen, dropout_p=0.3)


def test_dropout_same_seed_same_output(gen, triton_device):
    args = attention_inputs([20, 11], None, 2, 32, gen, device=triton_device)
    seed = A.draw_dropout_seed(triton_device)
    a, _ = _fused(args, dropout_p=0.2, seed=seed)
    b, _ = _fused(args, dropout_p=0.2, seed=seed.clone())
    other, _ = _fused(args, dropout_p=0.2, seed=seed + 1)
    assert torch.equal(a, b) and not torch.equal(a, other)
    torch.manual_seed(123)
    c, _ = _fused(args, dropout_p=0.2)  # seed drawn from torch's RNG
    torch.manual_seed(123)
    d, _ = _fused(args, dropout_p=0.2)
    assert torch.equal(c, d)
    no_drop, _ = _fused(args)
    assert not torch.equal(c, no_drop)


def test_dropout_keep_mask_statistics(triton_device):
    cu = cu_seqlens([64, 64], triton_device)
    seed = torch.tensor([1234], device=triton_device)
    keep = A.dropout_keep_mask(seed, cu, cu, 64, 64, 2, 0.25)
    assert keep.shape == (2, 2, 64, 64) and keep.dtype == torch.bool
    assert abs(keep.float().mean().item() - 0.75) < 0.03
    assert not torch.equal(keep[:, 0], keep[:, 1]) and not torch.equal(keep[0], keep[1])
    short = A.dropout_keep_mask(seed, cu_seqlens([64, 3], triton_device), cu_seqlens([64, 5], triton_device), 64, 64,
                                2, 0.25)
    assert torch.equal(short[0], keep[0]) and not short[1, :, 3:].any() and not short[1, :, :, 5:].any()


# ---------------------------------------------------------------------------------------------------------------
# Property test
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lens_q,lens_k", [([0, 0], [3, 5]), ([0], [0]), ([2, 1], [0, 0])])
def test_cross_without_query_or_key_rows(triton_device, lens_q, lens_k, gen):
    """A cross batch whose queries (or keys) are all empty: nothing to attend from (or to), no error."""
    args = attention_inputs(lens_q, lens_k, 1, 32, gen, device=triton_device, mask="cross")
    out, _ = _check_against_reference(args, gen)
    assert out.shape[0] == sum(lens_q)


@settings(max_examples=8, deadline=None)
@given(mask=st.sampled_from(A.MASKS), seed=st.integers(0, 2**31 - 1), data=st.data())
def test_property_triton(triton_device, mask, seed, data):
    gen = torch.Generator().manual_seed(seed)
    b = data.draw(st.integers(1, 3))
    lens_q = data.draw(st.lists(st.integers(0 if mask == "cross" else 1, 24), min_size=b, max_size=b))
    lens_k = data.draw(st.lists(st.integers(0, 24), min_size=b, max_size=b)) if mask == "cross" else None
    args = attention_inputs(lens_q, lens_k, 1, 32, gen, device=triton_device, mask=mask)
    _check_against_reference(args, gen)


# ---------------------------------------------------------------------------------------------------------------
# Peer runners: dispatch offers them on CUDA only, but their masking / packing logic runs on CPU tensors too
# ---------------------------------------------------------------------------------------------------------------


def _flex_eager(q, k, v, cq, ck, mq, mk, mask, prefix, dropout_p, scale, deterministic):
    import warnings

    from torch.nn.attention.flex_attention import flex_attention

    block_mask = P.flex_block_mask(cq, ck, q.shape[0], k.shape[0], mask, prefix, compile=False)
    t = lambda x: x.transpose(0, 1).unsqueeze(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager FlexAttention warns that it is unfused
        return flex_attention(t(q), t(k), t(v), block_mask=block_mask, scale=scale)[0].transpose(0, 1)


@pytest.mark.parametrize("runner", ["sdpa_padded", "flex"])
@pytest.mark.parametrize("mask,lens_q,lens_k,prefix", [("bidirectional", [7, 1, 20], None, None),
                                                       ("seq2seq", [7, 1, 20], None, [0, 1, 5]),
                                                       ("cross", [3, 4, 2, 0], [0, 5, 9, 3], None)])
def test_peer_runner_logic_on_cpu(runner, mask, lens_q, lens_k, prefix, gen, monkeypatch):
    args = attention_inputs(lens_q, lens_k, 2, 16, gen, mask=mask, prefix_lens=prefix)
    fn = P.RUNNERS["sdpa_padded"] if runner == "sdpa_padded" else _flex_eager
    monkeypatch.setitem(P.RUNNERS, "peer_under_test", fn)
    backend = D.Backend("peer_under_test", "peer", lambda *a, **kw: [])  # no device check: runs on CPU tensors
    monkeypatch.setitem(A.ATTENTION.backends, "peer_under_test", backend)
    if runner == "sdpa_padded":
        _check_against_reference(args, gen, backend="peer_under_test")
    else:  # FlexAttention has no CPU backward
        out = A.cross_modal_attention(*args, backend="peer_under_test")
        ref64 = A.cross_modal_attention_reference(*(t.double() for t in args[:3]), *args[3:])
        assert_close_to_ref(out, ref64, A.cross_modal_attention_reference(*args), "flex out")


# ---------------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------------


def _good(gen, mask="seq2seq"):
    return list(attention_inputs([5, 3], None, 2, 32, gen, mask=mask, prefix_lens=[1, 2]))


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda a: a.__setitem__(3, torch.tensor([0, 5, 9], dtype=torch.int32)), "'cu_seqlens_q' ends at 9 but 'q' "
                                                                                    "has 8 rows"),
        (lambda a: a.__setitem__(4, torch.tensor([0, 5, 7], dtype=torch.int32)), "'cu_seqlens_k' ends at 7"),
        (lambda a: a.__setitem__(3, torch.tensor([0, 6, 5, 8], dtype=torch.int32)), "'cu_seqlens_q' has 3 sequences"),
        (lambda a: a.__setitem__(3, torch.tensor([0, 9, 8], dtype=torch.int32)),
         r"'cu_seqlens_q' must be non-decreasing, but cu_seqlens_q\[1\] = 9"),
        (lambda a: a.__setitem__(3, torch.tensor([1, 5, 8], dtype=torch.int32)), "'cu_seqlens_q' must start at 0"),
        (lambda a: a.__setitem__(3, torch.tensor([0.0, 5, 8])), "'cu_seqlens_q' must be int32 or int64"),
        (lambda a: a.__setitem__(5, 4), "'max_seqlen_q' = 4 is smaller than sequence 0's length 5"),
        (lambda a: a.__setitem__(6, 2), "'max_seqlen_k' = 2 is smaller"),
        (lambda a: a.__setitem__(6, 5.0), "'max_seqlen_k' must be a Python int"),
        (lambda a: a.__setitem__(1, a[1].double()), "'k' has dtype torch.float64 but 'q' has torch.float32"),
        (lambda a: a.__setitem__(2, a[2].to("meta")), "'v' is on meta but 'q' is on cpu"),
        (lambda a: a.__setitem__(2, a[2][:, :, :16]), r"'v' has \[heads, head_dim\] = \[2, 16\]"),
        (lambda a: a.__setitem__(2, a[2][:4]), "'v' has 4 rows but 'k' has 8"),
        (lambda a: a.__setitem__(0, a[0][0]), r"'q' must be 3-d \[total, heads, head_dim\]"),
        (lambda a: a.__setitem__(7, "causal"), "'mask' must be one of"),
        (lambda a: a.__setitem__(8, None), "needs argument 'prefix_lens'"),
        (lambda a: a.__setitem__(8, torch.tensor([1], dtype=torch.int32)), r"'prefix_lens' must have shape \[B\]"),
        (lambda a: a.__setitem__(8, torch.tensor([1, -1], dtype=torch.int32)), "'prefix_lens' must be >= 0"),
        (lambda a: a.__setitem__(8, torch.tensor([1.0, 2.0])), "'prefix_lens' must be int32 or int64"),
    ],
)
def test_bad_input_names_the_argument(mutate, match, gen):
    args = _good(gen)
    mutate(args)
    with pytest.raises((ValueError, TypeError), match=match):
        A.cross_modal_attention(*args)


def test_bad_dropout_p(gen):
    with pytest.raises(ValueError, match="'dropout_p' must be in"):
        A.cross_modal_attention(*_good(gen), dropout_p=1.0)


@pytest.mark.parametrize("head_dim", [48, 8, 256])
def test_unsupported_head_dim_names_q(head_dim, gen, triton_device):
    args = attention_inputs([5, 3], None, 2, head_dim, gen, device=triton_device)
    with pytest.raises(BackendUnavailableError, match=f"argument 'q' has head_dim {head_dim}; supported: 16, 32"):
        A.cross_modal_attention(*args, backend="triton")
    A.cross_modal_attention(*args)  # automatic selection serves it (on the CPU: the reference, any head_dim)


# ---------------------------------------------------------------------------------------------------------------
# Dispatch, registration, compile
# ---------------------------------------------------------------------------------------------------------------


def test_selection_on_cpu_and_peer_reasons(gen):
    args = _good(gen, "bidirectional")
    sel_args = (*args, 0.0, None, False)
    assert A.ATTENTION.select(*sel_args) == "reference"
    reasons = A.ATTENTION.reasons(*sel_args)
    assert A.ATTENTION.priority[0] == "triton" and A.ATTENTION.priority[-1] == "reference"
    for peer in ("flash_attn", "sdpa_varlen", "xformers", "flex", "sdpa_padded"):
        assert A.ATTENTION.backends[peer].kind == "peer"
        assert any("needs cuda" in r for r in reasons[peer]), (peer, reasons[peer])


def test_selection_on_cuda_prefers_triton():
    """On (fake) CUDA bf16 tensors the Triton kernels come first; unsupported inputs fall to a peer or reference."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        q = torch.empty(300, 12, 64, dtype=torch.bfloat16, device="cuda")
        cu = torch.empty(3, dtype=torch.int32, device="cuda")
        base = (q, q, q, cu, cu, 200, 200, "bidirectional", None, 0.0, None, False)
        assert A.ATTENTION.select(*base) == "triton"
        assert A.ATTENTION.select(*base, deterministic=True) == "triton"
        q48 = torch.empty(300, 12, 48, dtype=torch.bfloat16, device="cuda")
        assert A.ATTENTION.select(q48, q48, q48, *base[3:]) != "triton"
        reasons = A.ATTENTION.reasons(*base[:7], "seq2seq", cu[:2], 0.1, None, False)
        assert any("mask 'seq2seq'" in r for r in reasons["sdpa_varlen"])
        assert reasons["sdpa_padded"] == []


def test_forced_backend_by_environment(gen, monkeypatch, triton_device):
    args = [t.to(triton_device) if isinstance(t, torch.Tensor) else t for t in _good(gen, "bidirectional")]
    monkeypatch.setenv("FASTVL_BACKEND", "attention=no_such_backend")
    with pytest.raises(BackendUnavailableError, match=r"unknown backend 'no_such_backend'.*this op has \[.*'triton'"):
        A.cross_modal_attention(*args)
    monkeypatch.setenv("FASTVL_BACKEND", "no_such_backend")
    with pytest.raises(BackendUnavailableError, match=r"names no backend of any op; this op has \[.*'reference'"):
        A.cross_modal_attention(*args)
    monkeypatch.setenv("FASTVL_BACKEND", "attention=triton")
    out = A.cross_modal_attention(*args)
    torch.testing.assert_close(out, A.cross_modal_attention_reference(*args), rtol=1e-5, atol=1e-5)
    monkeypatch.setenv("FASTVL_BACKEND", "attention=flex")
    if A.ATTENTION.backends["flex"].supports(*args, 0.0, None, False):  # it cannot serve them: the error says why
        with pytest.raises(BackendUnavailableError, match="FASTVL_BACKEND"):
            A.cross_modal_attention(*args)


@pytest.mark.parametrize("mask,dropout_p", [("bidirectional", 0.0), ("seq2seq", 0.2), ("cross", 0.0)])
def test_opcheck(mask, dropout_p, gen, triton_device):
    q, k, v, cq, ck, mq, mk, mask, prefix = attention_inputs([6, 3], [4, 5] if mask == "cross" else None, 2, 32, gen,
                                                             device=triton_device, mask=mask)
    seed = A.draw_dropout_seed(triton_device) if dropout_p else None
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    torch.library.opcheck(torch.ops.fastvl.attention_fwd.default,
                          (q, k, v, cq, ck, mq, mk, mask, prefix, dropout_p, 0.2, seed, "triton"))


def test_torch_compile_fullgraph(gen, triton_device):
    args = attention_inputs([9, 4], None, 2, 32, gen, device=triton_device, mask="seq2seq", prefix_lens=[2, 0])

    def step(q, k, v):
        out = A.cross_modal_attention(q, k, v, *args[3:], backend="triton")
        return out.square().sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    leaves = [t.clone().requires_grad_() for t in args[:3]]
    compiled(*leaves).backward()
    eager = [t.clone().requires_grad_() for t in args[:3]]
    step(*eager).backward()
    for a, b in zip(leaves, eager):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)


def test_torch_compile_fullgraph_default_cpu_path(gen):
    """The CPU default (reference, values validated only in eager) traces in one graph."""
    args = attention_inputs([9, 4], None, 2, 16, gen)
    compiled = torch.compile(A.cross_modal_attention, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(*args), A.cross_modal_attention(*args))


# Compiled for real GPUs without one: Triton's bundled ptxas builds the kernels for sm_90 and sm_80 ahead of time,
# so a kernel that only works in the interpreter (or needs too much shared memory) fails here. A subprocess, since
# this process runs Triton in interpreter mode.
AOT_SCRIPT = r"""
import sys, torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fastvl.kernels.triton import attention as K
PTR = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32"}
SMEM = {90: 227 * 1024, 80: 163 * 1024}
for arch in (90, 80):
    for dt, hd, seq, mask, drop in [(torch.bfloat16, 64, 160, 1, True), (torch.float16, 80, 1024, 0, False),
                                    (torch.float32, 64, 160, 1, False)]:
        d_pad = max(16, triton.next_power_of_2(hd))
        base = dict(HEAD_DIM=hd, D_PAD=d_pad, MASK=mask, DROPOUT=drop, PRECISION="ieee" if dt == torch.float32
                    else "tf32")
        for fn, cfg in ((K._attn_fwd, K.fwd_config(d_pad, dt, seq, drop)), (K._attn_bwd, K.bwd_config(d_pad, dt, seq,
                                                                                                       drop))):
            const = {**base, **{k: v for k, v in cfg.items() if k.startswith("BLOCK")}}
            def ty(n):
                if n in const: return "constexpr"
                if n in ("LSE", "DELTA"): return "*fp32"
                if n in ("CU_Q", "CU_K", "PREFIX"): return "*i32"
                if n == "SEED": return "*i64"
                if n in ("qk_scale", "sm_scale", "dropout_p"): return "fp32"
                return PTR[dt] if n.isupper() else "i32"
            sig = {n: ty(n) for n in fn.arg_names}
            src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(k),): v for k, v in const.items()})
            kern = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                  options=dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]))
            assert kern.asm.get("cubin"), "no cubin"
            assert kern.metadata.shared <= SMEM[arch], (fn.__name__, arch, kern.metadata.shared)
            print("ok", arch, fn.__name__, dt, hd, seq, kern.metadata.shared)
"""


@pytest.mark.slow
def test_kernels_compile_for_sm90_and_sm80(tmp_path):
    import os
    import subprocess
    import sys

    import triton

    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")):
        pytest.skip("this triton has no bundled ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    res = subprocess.run([sys.executable, "-c", AOT_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("ok ") == 12


# ---------------------------------------------------------------------------------------------------------------
# GPU (bf16 / fp16 / fp32; run by benchmarks/gpu_check.sh on a lent GPU)
# ---------------------------------------------------------------------------------------------------------------

GPU_CASES = {
    "bidirectional": ([1, 7, 97, 130, 20, 160, 45], None, None),
    "seq2seq": ([1, 7, 97, 130, 20, 160, 45], None, [0, 3, 97, 36, 0, 100, 50]),
    "cross": ([1, 7, 60, 33, 0, 12], [100, 0, 1, 64, 5, 97], None),
}


# Each (dtype, head_dim, mask, dropout, length class) compiles the kernels once: the matrix is kept to what covers
# the code paths (power-of-two and padded head dims, every mask, each dtype) so the GPU run stays short.
GPU_MATRIX = [(torch.bfloat16, d, "bidirectional", True) for d in (64, 80, 128)] + \
    [(torch.bfloat16, d, "bidirectional", False) for d in (32, 96)] + \
    [(torch.bfloat16, 64, m, True) for m in ("seq2seq", "cross")] + \
    [(torch.float16, 64, "seq2seq", True), (torch.float32, 64, "cross", True)]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype,head_dim,mask,backward", GPU_MATRIX)
def test_gpu_triton_matches_reference(dtype, head_dim, mask, backward, gen, triton_device):
    lens_q, lens_k, prefix = GPU_CASES[mask]
    args = attention_inputs(lens_q, lens_k, 4, head_dim, gen, dtype, triton_device, mask, prefix)
    if backward:
        _check_against_reference(args, gen)
    else:
        out = A.cross_modal_attention(*args, backend="triton")
        ref64 = A.cross_modal_attention_reference(args[0].double(), args[1].double(), args[2].double(), *args[3:])
        assert_close_to_ref(out, ref64, A.cross_modal_attention_reference(*args), "triton out")


@pytest.mark.cuda
@pytest.mark.parametrize("mask", ["seq2seq", "cross"])
def test_gpu_triton_dropout(mask, gen, triton_device):
    lens_q, lens_k, prefix = GPU_CASES[mask]
    args = attention_inputs(lens_q, lens_k, 4, 64, gen, torch.bfloat16, triton_device, mask, prefix)
    _check_against_reference(args, gen, dropout_p=0.1)


@pytest.mark.cuda
def test_gpu_triton_long_sequences(gen, triton_device):
    args = attention_inputs([1024, 999, 513], None, 12, 64, gen, torch.bfloat16, triton_device, "seq2seq",
                            [300, 0, 513])
    _check_against_reference(args, gen)


@pytest.mark.cuda
def test_gpu_triton_backward_deterministic(gen, triton_device):
    args = attention_inputs([160] * 64, None, 12, 64, gen, torch.bfloat16, triton_device)
    dout = torch.randn(args[0].shape, generator=gen).to(triton_device, torch.bfloat16)
    runs = [_fused(args, dout=dout)[1] for _ in range(3)]
    assert all(torch.equal(a, b) for r in runs[1:] for a, b in zip(runs[0], r))


@pytest.mark.cuda
@pytest.mark.parametrize("peer,mask", [(p, m) for p in ("flash_attn", "sdpa_varlen", "xformers", "sdpa_padded")
                                       for m in A.MASKS])  # FlexAttention compiles for ~30 s: the benchmark runs it
def test_gpu_peers_match_reference(peer, mask, gen):
    lens_q, lens_k, prefix = GPU_CASES[mask]
    args = attention_inputs(lens_q, lens_k, 4, 64, gen, torch.bfloat16, "cuda", mask, prefix)
    why = A.ATTENTION.backends[peer].supports(*args, 0.0, None, False)
    if why:
        pytest.skip(f"{peer}: {'; '.join(why)}")
    _check_against_reference(args, gen, backend=peer)


@pytest.mark.cuda
def test_gpu_selection_and_compile(gen, triton_device):
    args = attention_inputs([20, 160, 97], None, 12, 64, gen, torch.bfloat16, triton_device, "seq2seq")
    assert A.ATTENTION.select(*args, 0.1, None, False) == "triton"

    def step(q, k, v):
        return A.cross_modal_attention(q, k, v, *args[3:]).float().square().sum()

    leaves = [t.clone().requires_grad_() for t in args[:3]]
    torch.compile(step, fullgraph=True, backend="aot_eager")(*leaves).backward()
    eager = [t.clone().requires_grad_() for t in args[:3]]
    step(*eager).backward()
    for a, b in zip(leaves, eager):
        torch.testing.assert_close(a.grad, b.grad)
