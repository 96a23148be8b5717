"""adv_perturb_step / adv_perturb_step_multi / adv_perturb_init: every fast backend runnable here against the
reference (tolerance rule), and the reference against a direct per-example float64 transcription of the formulas."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastvl
from fastvl.ops import BackendUnavailableError
from fastvl.ops import adv_perturb as A
from fastvl.ops.testing import adv_inputs, adv_inputs_packed, assert_close_to_ref, assert_rel_close

HAS_CUDA = torch.cuda.is_available()
NEEDS_C = pytest.mark.needs_c  # skipped, with the reason, when fastvl._C is not built (tests/conftest.py)
# The backends compared with the reference under the tolerance rule; the reference itself is checked against
# _step_direct / _init_direct. Each test builds its tensors on the `device` fixture (the Triton device for 'triton').
FAST = ["triton", pytest.param("cpu", marks=NEEDS_C)]
BACKENDS_HERE = ["reference", *FAST]

SHAPES = [
    # (lens, L, D): an all-padding row, a single valid token, odd sizes, a batch of one, D = 1
    ([0, 1, 5, 7], 7, 13),
    ([1], 1, 1),
    ([3, 2], 3, 1),
    ([9, 4, 1, 0, 6], 9, 33),
]
# projection radii that bind for some examples and not others (and one that never binds)
MAX_NORMS = {"l2": [0.0, 0.09, 100.0], "linf": [0.0, 0.015, 100.0]}


def _step_direct(delta, grad, mask, lr, norm, max_norm):
    """The ascent step as the module docstring states it, written out example by example in float64 on the CPU:
    n = ||grad_b|| over the valid positions (l2 or max-abs), delta += lr * grad / max(n, 1e-8), then the l2 ball /
    linf box of radius max_norm (if > 0), 0 at padding."""
    delta, grad, mask = delta.detach().double().cpu(), grad.double().cpu(), mask.cpu()
    out = torch.zeros(delta.shape, dtype=torch.float64)
    for b in range(delta.shape[0]):
        d, g = delta[b][mask[b]], grad[b][mask[b]]
        if d.numel() == 0:
            continue
        n = float(g.pow(2).sum().sqrt()) if norm == "l2" else float(g.abs().max())
        d = d + lr * g / max(n, 1e-8)
        if max_norm > 0 and norm == "l2" and float(d.pow(2).sum().sqrt()) > max_norm:
            d = d * (max_norm / float(d.pow(2).sum().sqrt()))
        elif max_norm > 0 and norm == "linf":
            d = d.clamp(-max_norm, max_norm)
        out[b][mask[b]] = d
    return out


def _packed_to_padded(x, cu, width):
    lens = [int(cu[i + 1] - cu[i]) for i in range(len(cu) - 1)]
    mask = torch.arange(width)[None, :] < torch.tensor(lens)[:, None]
    padded = torch.zeros(len(lens), width, x.shape[1], dtype=x.dtype)
    padded[mask] = x.detach().cpu()
    return padded, mask


def _init_direct(noise, mask, init_mag, norm):
    """The init scaling as the module docstring states it, per example in float64: l2 x * init_mag /
    sqrt(n_valid * D), linf clamp(x * init_mag, -init_mag, init_mag), 0 at padding."""
    noise, mask = noise.double().cpu(), mask.cpu()
    out = torch.zeros(noise.shape, dtype=torch.float64)
    for b in range(noise.shape[0]):
        x = noise[b][mask[b]]
        if x.numel() == 0:
            continue
        out[b][mask[b]] = (x * init_mag / (x.numel()) ** 0.5 if norm == "l2"
                           else (x * init_mag).clamp(-init_mag, init_mag))
    return out


@pytest.mark.parametrize("norm", ["l2", "linf"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"lens{s[0]}-D{s[2]}" if isinstance(s, tuple) else None)
def test_reference_matches_direct_definition(norm, shape, gen):
    lens, L, D = shape
    delta, grad, mask = adv_inputs(lens, L, D, gen, dtype=torch.float64, poison_padding=True, delta_scale=0.3)
    for max_norm in MAX_NORMS[norm] + [0.3]:
        want = _step_direct(delta, grad, mask, 0.2, norm, max_norm)
        got = A.adv_perturb_step_reference(delta, grad, mask, 0.2, norm, max_norm)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
        zero = torch.where(mask[:, :, None], 0.0, grad)  # zero gradient: no update (the 1e-8 clamp), never NaN
        torch.testing.assert_close(A.adv_perturb_step_reference(delta, zero, mask, 0.2, norm, max_norm),
                                   _step_direct(delta, zero, mask, 0.2, norm, max_norm), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("norm", ["l2", "linf"])
@pytest.mark.parametrize("lens", [[3, 0, 1, 7, 2], [1], [5, 5]], ids=str)
def test_packed_reference_matches_direct_definition(norm, lens, gen):
    delta, grad, cu, width = adv_inputs_packed(lens, 11, gen, dtype=torch.float64, delta_scale=0.3)
    for max_norm in MAX_NORMS[norm]:
        got = A.adv_perturb_step_packed_reference(delta, grad, cu, width, 0.1, norm, max_norm)
        (pd, mask), (pg, _) = _packed_to_padded(delta, cu, width), _packed_to_padded(grad, cu, width)
        torch.testing.assert_close(got, _step_direct(pd, pg, mask, 0.1, norm, max_norm)[mask], rtol=1e-12,
                                   atol=1e-14)
    noise = torch.randn(delta.shape, generator=gen, dtype=torch.float64)
    got = A.adv_perturb_init_scale_packed_reference(noise, cu, width, 0.6, norm)
    pn, mask = _packed_to_padded(noise, cu, width)
    torch.testing.assert_close(got, _init_direct(pn, mask, 0.6, norm)[mask], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_init_reference_matches_direct_definition(norm, gen):
    mask = torch.rand(5, 7, generator=gen) < 0.6
    mask[2] = False
    noise = torch.randn(5, 7, 9, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(A.adv_perturb_init_scale_reference(noise, mask, 0.6, norm),
                               _init_direct(noise, mask, 0.6, norm), rtol=1e-12, atol=1e-14)


def _ref(delta, grad, mask, lr, norm, max_norm, dtype=None):
    """(ref64, ref_lowp) of one step."""
    ref64 = A.adv_perturb_step_reference(delta.double(), grad.double(), mask, lr, norm, max_norm)
    lowp = A.adv_perturb_step_reference(delta.to(dtype or delta.dtype), grad.to(dtype or delta.dtype), mask, lr, norm,
                                        max_norm)
    return ref64, lowp


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("norm", ["l2", "linf"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"lens{s[0]}-D{s[2]}" if isinstance(s, tuple) else None)
def test_step_matches_reference(backend, norm, shape, gen, device):
    lens, L, D = shape
    delta, grad, mask = adv_inputs(lens, L, D, gen, poison_padding=True, device=device)
    for max_norm in MAX_NORMS[norm]:
        d = delta.clone()
        out = A.adv_perturb_step(d, grad, mask, 0.05, norm, max_norm, backend=backend)
        assert out is d, "the step updates delta in place and returns it"
        ref64, lowp = _ref(delta, grad, mask, 0.05, norm, max_norm)
        assert_close_to_ref(out, ref64, lowp, f"{backend} {norm} max_norm={max_norm}")
        assert out.masked_select(~mask[:, :, None]).eq(0).all(), "padding must be exactly 0"
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("backend", BACKENDS_HERE)
def test_projection_binds_and_bounds(backend, gen, device):
    """With a small radius every example ends on the ball (l2) or inside the box (linf)."""
    delta, grad, mask = adv_inputs([6, 3, 8], 8, 11, gen, delta_scale=0.5, device=device)
    out = A.adv_perturb_step(delta.clone(), grad, mask, 1.0, "l2", 0.3, backend=backend)
    norms = out.flatten(1).norm(dim=1)
    torch.testing.assert_close(norms, torch.full_like(norms, 0.3), rtol=1e-5, atol=0)
    out = A.adv_perturb_step(delta.clone(), grad, mask, 1.0, "linf", 0.3, backend=backend)
    assert out.abs().max() <= 0.3 and (out.abs() == 0.3).any()


@pytest.mark.parametrize("backend", BACKENDS_HERE)
@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_zero_gradient_gives_no_update(backend, norm, gen, device):
    delta, grad, mask = adv_inputs([4, 0, 2], 4, 5, gen, poison_padding=True, device=device)
    grad = torch.where(mask[:, :, None], 0.0, grad)  # zero at valid positions, NaN at padding
    out = A.adv_perturb_step(delta.clone(), grad, mask, 0.1, norm, backend=backend)
    assert torch.equal(out, torch.where(mask[:, :, None], delta, 0.0))


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_ascent_trajectory_of_k_steps(backend, norm, gen, device):
    """Three VILLA steps from a zero delta, each with a fresh gradient, follow the reference trajectory."""
    lens, L, D = [5, 1, 3], 5, 9
    mask = adv_inputs(lens, L, D, gen, device=device)[2]
    delta = torch.zeros(len(lens), L, D, device=device)
    ref = delta.double()
    for _ in range(3):
        grad = torch.randn(len(lens), L, D, generator=gen).to(device)
        lowp = A.adv_perturb_step_reference(delta, grad, mask, 0.05, norm, 0.12)
        ref = A.adv_perturb_step_reference(ref, grad.double(), mask, 0.05, norm, 0.12)
        A.adv_perturb_step(delta, grad, mask, 0.05, norm, 0.12, backend=backend)
        assert_close_to_ref(delta, ref, lowp, f"{backend} trajectory")


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_multi_matches_per_modality_reference(backend, norm, gen, device):
    """Text [B, 6, 12] and image [B, 9, 20] (and a third, to cover more slots than one launch takes)."""
    shapes = [([6, 1, 0], 6, 12), ([9, 4, 2], 9, 20), ([3, 3, 1], 3, 5)]
    inputs = [adv_inputs(lens, L, D, gen, poison_padding=True, device=device) for lens, L, D in shapes]
    lrs, max_norms = [0.05, 0.2, 0.01], [MAX_NORMS[norm][1], 0.0, 100.0]
    deltas = [d.clone() for d, _, _ in inputs]
    out = A.adv_perturb_step_multi(deltas, [g for _, g, _ in inputs], [m for _, _, m in inputs], lrs, norm,
                                   max_norms, backend=backend)
    assert len(out) == 3 and all(o is d for o, d in zip(out, deltas, strict=True))
    for k, (d, g, m) in enumerate(inputs):
        ref64, lowp = _ref(d, g, m, lrs[k], norm, max_norms[k])
        assert_close_to_ref(out[k], ref64, lowp, f"{backend} slot {k}")


@pytest.mark.parametrize("backend", FAST)
def test_multi_with_empty_slots(backend, gen, device):
    d1, g1, m1 = adv_inputs([2, 3], 3, 4, gen, device=device)
    empty = [torch.empty(*shape, device=device) for shape in ((0, 5, 4), (2, 0, 4), (2, 3, 0))]
    masks = [torch.ones(*shape, dtype=torch.bool, device=device) for shape in ((0, 5), (2, 0), (2, 3))]
    deltas = [e.clone() for e in empty] + [d1.clone()]
    A.adv_perturb_step_multi(deltas, [*empty, g1], [*masks, m1], [0.1] * 4, "l2", backend=backend)
    ref64, lowp = _ref(d1, g1, m1, 0.1, "l2", 0.0)
    assert_close_to_ref(deltas[3], ref64, lowp, backend)
    assert A.adv_perturb_step_multi([], [], [], [], backend=backend) == []


@pytest.mark.parametrize("backend", BACKENDS_HERE)
def test_leaf_delta_that_requires_grad(backend, gen, device):
    """The VILLA loop's delta is a leaf with requires_grad; the step updates it in place without a graph."""
    delta, grad, mask = adv_inputs([3, 2], 3, 6, gen, device=device)
    leaf = delta.clone().requires_grad_()
    version = leaf._version
    out = A.adv_perturb_step(leaf, grad, mask, 0.1, backend=backend)
    assert out is leaf and out.requires_grad and out.grad_fn is None and leaf._version > version
    assert_rel_close(leaf.detach().cpu(), _step_direct(delta, grad, mask, 0.1, "l2", 0.0), 1e-5, backend)


@pytest.mark.parametrize("backend", BACKENDS_HERE)
def test_non_contiguous_delta_updated_in_place(backend, gen, device):
    delta, grad, mask = adv_inputs([4, 2], 4, 6, gen, device=device)
    storage = delta.transpose(1, 2).contiguous()  # [B, D, L] memory; the view below is [B, L, D], non-contiguous
    view = storage.transpose(1, 2)
    out = A.adv_perturb_step(view, grad.transpose(1, 2).contiguous().transpose(1, 2), mask, 0.1, "linf", 0.02,
                             backend=backend)
    assert out is view
    assert_rel_close(storage.transpose(1, 2).cpu(), _step_direct(delta, grad, mask, 0.1, "linf", 0.02), 1e-5, backend)


@NEEDS_C
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_cpu_low_precision(dtype, norm, gen):
    delta, grad, mask = adv_inputs([7, 1, 4], 7, 40, gen, dtype=dtype)
    for max_norm in MAX_NORMS[norm]:
        out = A.adv_perturb_step(delta.clone(), grad, mask, 0.05, norm, max_norm, backend="cpu")
        assert out.dtype == dtype
        ref64, lowp = _ref(delta, grad, mask, 0.05, norm, max_norm)
        assert_close_to_ref(out, ref64, lowp, f"cpu {dtype} {norm}")


@pytest.mark.parametrize("backend", BACKENDS_HERE)
@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_nan_gradient_is_not_hidden(backend, norm, gen, device):
    delta, grad, mask = adv_inputs([3, 3], 3, 4, gen, device=device)
    grad[0, 1, 2] = float("nan")
    out = A.adv_perturb_step(delta.clone(), grad, mask, 0.1, norm, backend=backend)
    assert out[0].isnan().all() and torch.isfinite(out[1]).all(), f"{backend} {norm}"


@pytest.mark.parametrize("backend", BACKENDS_HERE)
def test_outputs_and_workspaces_are_written(backend, gen, device, poisoned):
    """Every allocation starts as NaN (the `poisoned` fixture): the two-phase reductions' workspaces and the init's
    output must be written before they are read; padding ends exactly 0."""
    txt = adv_inputs([5, 0, 2], 5, 7, gen, device=device)
    img = adv_inputs_packed([3, 1, 4], 6, gen, device=device)
    deltas = [txt[0].clone(), img[0].clone()]
    A.adv_perturb_step_multi(deltas, [txt[1], img[1]], [txt[2], img[2]], [0.1, 0.2], "l2", [0.05, 0.0],
                             max_seqlens=[0, img[3]], backend=backend)
    assert all(torch.isfinite(d).all() for d in deltas) and deltas[0].masked_select(~txt[2][:, :, None]).eq(0).all()
    out = A.adv_perturb_init((3, 5, 7), txt[2], 0.5, "normal", "linf", torch.Generator(device).manual_seed(1),
                             backend=backend)
    assert poisoned.covers(out) and torch.isfinite(out).all() and out.masked_select(~txt[2][:, :, None]).eq(0).all()
    assert poisoned.hits > 0 or poisoned.cpu_junk_fill, "no allocation of this call was poisoned"


def test_auto_selection_on_cpu():
    delta, grad, mask = torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), torch.ones(2, 3, dtype=torch.bool)
    chosen = A.STEP.select(delta, [delta], [grad], [mask], "l2")
    assert chosen == ("cpu" if fastvl.HAS_C else "reference")
    with pytest.raises(BackendUnavailableError, match="cuda"):
        A.adv_perturb_step(delta, grad, mask, 0.1, backend="cuda") if not HAS_CUDA else pytest.skip("has a GPU")
    if not HAS_CUDA:
        with pytest.raises(BackendUnavailableError, match="float32 only"):
            A.adv_perturb_step(delta.double(), grad.double(), mask, 0.1, backend="triton")
    assert A.adv_perturb_step(delta.double(), grad.double(), mask, 0.1).dtype == torch.float64  # reference serves


# ----------------------------------------------------------------------------------------------------------
# Bad inputs
# ----------------------------------------------------------------------------------------------------------


def _good():
    return torch.zeros(2, 3, 4), torch.ones(2, 3, 4), torch.ones(2, 3, dtype=torch.bool)


@pytest.mark.parametrize("case,exc,pattern", [
    ("grad_shape", ValueError, r"'grad' must have the shape of 'delta' \[2, 3, 4\], got \[2, 3, 5\]"),
    ("mask_shape", ValueError, r"'mask' must have shape \[B, L\] = \[2, 3\] \(from 'delta'\), got \[2, 4\]"),
    ("mask_dtype", TypeError, r"'mask' must be a bool tensor \(True = valid position\), got torch.uint8"),
    ("negative_lr", ValueError, r"'lr' must be a number >= 0, got -0.1"),
    ("nan_lr", ValueError, r"'lr' must be a number >= 0, got nan"),
    ("tensor_lr", TypeError, r"'lr' must be a number >= 0, got Tensor"),
    ("negative_max_norm", ValueError, r"'max_norm' must be a number >= 0 \(0 = no projection\), got -1.0"),
    ("unknown_norm", ValueError, r"'norm' must be one of \('l2', 'linf'\), got 'l1'"),
    ("grad_dtype", TypeError, r"'grad' must have the dtype of 'delta' \(torch.float32\), got torch.float64"),
    ("grad_device", ValueError, r"'grad' is on meta but 'delta' is on cpu"),
    ("mask_device", ValueError, r"'mask' is on meta but 'delta' is on cpu"),
    ("delta_2d", ValueError, r"'delta' must be 3-d \[B, L, D\], got shape \[3, 4\]"),
    ("delta_int", TypeError, r"'delta' must be a float tensor, got torch.int64"),
])
def test_bad_inputs_name_the_argument(case, exc, pattern):
    d, g, m = _good()
    args = dict(delta=d, grad=g, mask=m, lr=0.1, norm="l2", max_norm=0.0)
    change = {
        "grad_shape": dict(grad=torch.ones(2, 3, 5)), "mask_shape": dict(mask=torch.ones(2, 4, dtype=torch.bool)),
        "mask_dtype": dict(mask=m.to(torch.uint8)), "negative_lr": dict(lr=-0.1), "nan_lr": dict(lr=float("nan")),
        "tensor_lr": dict(lr=torch.tensor(0.1)), "negative_max_norm": dict(max_norm=-1.0),
        "unknown_norm": dict(norm="l1"), "grad_dtype": dict(grad=g.double()), "grad_device": dict(grad=g.to("meta")),
        "mask_device": dict(mask=m.to("meta")), "delta_2d": dict(delta=d[0], grad=g[0]),
        "delta_int": dict(delta=d.long(), grad=g.long()),
    }[case]
    args.update(change)
    with pytest.raises(exc, match="fastvl.ops.adv_perturb_step: argument " + pattern):
        A.adv_perturb_step(**args)


def test_multi_bad_inputs():
    d, g, m = _good()
    with pytest.raises(ValueError, match=r"argument 'lrs' must have one entry per delta \(2\), got 1"):
        A.adv_perturb_step_multi([d, d.clone()], [g, g], [m, m], [0.1])
    with pytest.raises(ValueError, match=r"argument 'masks\[1\]' must have shape \[B, L\] = \[2, 3\]"):
        A.adv_perturb_step_multi([d, d.clone()], [g, g], [m, m[:, :2]], [0.1, 0.1])
    with pytest.raises(ValueError, match=r"argument 'max_norms\[0\]' must be a number >= 0"):
        A.adv_perturb_step_multi([d], [g], [m], [0.1], "l2", [-2.0])


@NEEDS_C
def test_kernel_checks_its_arguments():
    """The C++ entry point validates too (it is reachable through torch.ops.fastvl directly)."""
    d, g, m = _good()
    kernel = torch.ops.fastvl.adv_perturb_step_kernel
    with pytest.raises(ValueError, match=r"adv_perturb_step: argument 'lrs' must be >= 0"):
        kernel([d], [g], [m], [-1.0], "l2", [0.0], [0])
    with pytest.raises(ValueError, match=r"argument 'norm' must be 'l2' or 'linf', got 'l3'"):
        kernel([d], [g], [m], [1.0], "l3", [0.0], [0])
    with pytest.raises(ValueError, match=r"argument 'masks\[0\]' must be a bool tensor"):
        kernel([d], [g], [m.float()], [1.0], "l2", [0.0], [0])
    with pytest.raises(ValueError, match=r"argument 'grads\[0\]' must have the shape of deltas\[0\]"):
        kernel([d], [g[:, :2]], [m], [1.0], "l2", [0.0], [0])
    with pytest.raises(ValueError, match=r"argument 'max_seqlens' must have one value per delta \(1\), got 0"):
        kernel([d], [g], [m], [1.0], "l2", [0.0], [])
    with pytest.raises(ValueError, match=r"argument 'noise' must be contiguous"):
        torch.ops.fastvl.adv_perturb_init_kernel(d.transpose(0, 1), m.t(), 1.0, "l2", 0)
    # packed: cu_seqlens must be int32 and, on the CPU, must stay inside the tensor
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"argument 'masks\[0\]' must be cu_seqlens, an int32 \[B\+1\] tensor"):
        kernel([g[0]], [g[0]], [cu.long()], [1.0], "l2", [0.0], [3])
    with pytest.raises(ValueError, match=r"argument 'masks\[0\]' must run from 0 to the packed row count 3"):
        kernel([g[0]], [g[0]], [cu], [1.0], "l2", [0.0], [3])
    with pytest.raises(ValueError, match=r"argument 'max_seqlens\[0\]' must be >= 0"):
        kernel([g[0]], [g[0]], [cu], [1.0], "l2", [0.0], [-1])


# ----------------------------------------------------------------------------------------------------------
# Packed layout (fastvl's native batch: [T, D] + cu_seqlens)
# ----------------------------------------------------------------------------------------------------------

PACKED_LENS = [[3, 0, 1, 7, 2], [1], [5, 5]]


def _packed_ref(delta, grad, cu, max_seqlen, lr, norm, max_norm):
    ref64 = A.adv_perturb_step_packed_reference(delta.double(), grad.double(), cu, max_seqlen, lr, norm, max_norm)
    return ref64, A.adv_perturb_step_packed_reference(delta, grad, cu, max_seqlen, lr, norm, max_norm)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("norm", ["l2", "linf"])
@pytest.mark.parametrize("lens", PACKED_LENS, ids=str)
def test_packed_matches_padded(backend, norm, lens, gen, device):
    """The packed step equals the padded reference on the valid rows (same examples, same numbers)."""
    delta, grad, cu, width = adv_inputs_packed(lens, 11, gen, device=device)
    mask = (torch.arange(width)[None, :] < torch.tensor(lens)[:, None]).to(device)
    for max_norm in MAX_NORMS[norm]:
        d = delta.clone()
        out = A.adv_perturb_step_packed(d, grad, cu, width, 0.05, norm, max_norm, backend=backend)
        assert out is d
        ref64, lowp = _packed_ref(delta, grad, cu, width, 0.05, norm, max_norm)
        assert_close_to_ref(out, ref64, lowp, f"{backend} packed {norm} {max_norm}")
        padded_delta = torch.zeros(len(lens), width, 11, dtype=torch.float64, device=device)
        padded_grad = torch.zeros_like(padded_delta)
        padded_delta[mask], padded_grad[mask] = delta.double(), grad.double()
        via_padded = A.adv_perturb_step_reference(padded_delta, padded_grad, mask, 0.05, norm, max_norm)[mask]
        torch.testing.assert_close(ref64, via_padded, rtol=0, atol=1e-15)


@pytest.mark.parametrize("backend", FAST)
def test_packed_int64_cu_seqlens_and_larger_max_seqlen(backend, gen, device):
    """int64 offsets are accepted, and a max_seqlen larger than every length changes nothing."""
    delta, grad, cu, width = adv_inputs_packed([4, 2, 6], 9, gen, device=device)
    out = A.adv_perturb_step_packed(delta.clone(), grad, cu.long(), width + 5, 0.1, "l2", 0.05, backend=backend)
    ref64, lowp = _packed_ref(delta, grad, cu, width, 0.1, "l2", 0.05)
    assert_close_to_ref(out, ref64, lowp, backend)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_multi_mixed_layouts(backend, norm, gen, device):
    """Packed text and padded image in one call (and a second packed slot)."""
    txt = adv_inputs_packed([5, 1, 0, 3], 12, gen, device=device)
    img = adv_inputs([7, 2, 0, 4], 7, 20, gen, poison_padding=True, device=device)
    txt2 = adv_inputs_packed([2, 2], 3, gen, device=device)
    deltas = [txt[0].clone(), img[0].clone(), txt2[0].clone()]
    lrs, max_norms = [0.05, 0.1, 0.2], [MAX_NORMS[norm][1], 0.0, MAX_NORMS[norm][1]]
    A.adv_perturb_step_multi(deltas, [txt[1], img[1], txt2[1]], [txt[2], img[2], txt2[2]], lrs, norm, max_norms,
                             max_seqlens=[txt[3], 0, txt2[3]], backend=backend)
    ref64, lowp = _packed_ref(txt[0], txt[1], txt[2], txt[3], lrs[0], norm, max_norms[0])
    assert_close_to_ref(deltas[0], ref64, lowp, f"{backend} packed text")
    ref64, lowp = _ref(img[0], img[1], img[2], lrs[1], norm, max_norms[1])
    assert_close_to_ref(deltas[1], ref64, lowp, f"{backend} padded image")
    ref64, lowp = _packed_ref(txt2[0], txt2[1], txt2[2], txt2[3], lrs[2], norm, max_norms[2])
    assert_close_to_ref(deltas[2], ref64, lowp, f"{backend} packed slot 2")


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_packed_init(backend, norm, seed, device):
    lens = [4, 0, 1, 6]
    cu = torch.tensor([0, 4, 4, 5, 11], dtype=torch.int32, device=device)
    out = A.adv_perturb_init((11, 9), cu, 0.6, "normal", norm, torch.Generator(device).manual_seed(seed), max_seqlen=6,
                             backend=backend)
    noise = A.adv_perturb_noise((11, 9), "normal", torch.Generator(device).manual_seed(seed), device=device)
    ref64 = A.adv_perturb_init_scale_packed_reference(noise.double(), cu, 6, 0.6, norm)
    assert_close_to_ref(out, ref64, A.adv_perturb_init_scale_packed_reference(noise, cu, 6, 0.6, norm), backend)
    if norm == "l2":  # each example scaled by its own length
        rows = torch.repeat_interleave(torch.tensor(lens), torch.tensor(lens)).to(device)
        torch.testing.assert_close(out, noise * 0.6 / (rows.double() * 9).sqrt()[:, None].float())


def test_packed_bad_inputs():
    delta, grad = torch.zeros(5, 4), torch.zeros(5, 4)
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    with pytest.raises(TypeError, match=r"adv_perturb_step_packed: argument 'cu_seqlens' must be int32 or int64"):
        A.adv_perturb_step_packed(delta, grad, cu.float(), 3, 0.1)
    with pytest.raises(TypeError, match=r"argument 'cu_seqlens' must be cu_seqlens .* got a bool tensor"):
        A.adv_perturb_step_packed(delta, grad, cu.bool(), 3, 0.1)
    with pytest.raises(ValueError, match=r"argument 'max_seqlen' must be a Python int >= every length"):
        A.adv_perturb_step_packed(delta, grad, cu, None, 0.1)
    with pytest.raises(ValueError, match=r"adv_perturb_step_packed: argument 'delta' must be 2-d \[T, D\]"):
        A.adv_perturb_step_packed(delta[None], grad[None], cu, 3, 0.1)
    with pytest.raises(ValueError, match=r"adv_perturb_step: argument 'delta' must be 3-d \[B, L, D\]"):
        A.adv_perturb_step(delta, grad, cu, 0.1)
    with pytest.raises(ValueError, match=r"argument 'max_seqlens\[0\]' must be a Python int"):
        A.adv_perturb_step_multi([delta], [grad], [cu], [0.1])
    with pytest.raises(ValueError, match=r"adv_perturb_init: argument 'max_seqlen' must be a Python int"):
        A.adv_perturb_init((5, 4), cu, 1.0)


# ----------------------------------------------------------------------------------------------------------
# Random init
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("norm", ["l2", "linf"])
@pytest.mark.parametrize("dist", ["uniform", "normal"])
def test_init_matches_reference(backend, norm, dist, seed, device):
    mask = ~torch.tensor([[False] * 7, [False] + [True] * 6, [True] * 7, [False] * 3 + [True] * 4])  # 7, 1, 0, 3 valid
    mask = mask.to(device)
    out = A.adv_perturb_init((4, 7, 9), mask, 0.6, dist, norm, torch.Generator(device).manual_seed(seed),
                             backend=backend)
    noise = A.adv_perturb_noise((4, 7, 9), dist, torch.Generator(device).manual_seed(seed), device=device)
    ref64 = A.adv_perturb_init_scale_reference(noise.double(), mask, 0.6, norm)
    lowp = A.adv_perturb_init_scale_reference(noise, mask, 0.6, norm)
    assert_close_to_ref(out, ref64, lowp, f"{backend} init")
    assert out.masked_select(~mask[:, :, None]).eq(0).all() and out[2].eq(0).all()
    if norm == "linf":
        assert out.abs().max() <= 0.6
    elif dist == "uniform":  # |x| <= 1 bounds the l2 norm by init_mag
        assert (out.flatten(1).norm(dim=1) <= 0.6 * (1 + 1e-6)).all()


def test_init_formula_matches_freelb(seed):
    """l2: U(-1, 1) * init_mag / sqrt(n_valid * D); linf: U(-init_mag, init_mag); both masked."""
    mask = torch.tensor([[True, True, False], [True, False, False]])
    out = A.adv_perturb_init((2, 3, 5), mask, 0.5, "uniform", "l2", torch.Generator().manual_seed(seed))
    noise = torch.empty(2, 3, 5).uniform_(-1, 1, generator=torch.Generator().manual_seed(seed))
    want = noise * mask[:, :, None] * (0.5 / torch.tensor([10.0, 5.0]).sqrt())[:, None, None]
    torch.testing.assert_close(out, want)
    out = A.adv_perturb_init((2, 3, 5), mask, 0.5, "uniform", "linf", torch.Generator().manual_seed(seed))
    torch.testing.assert_close(out, noise * 0.5 * mask[:, :, None])


def test_init_zero_mag_is_zero_without_a_draw():
    g = torch.Generator().manual_seed(3)
    state = g.get_state()
    like = torch.empty(2, 4, 3, dtype=torch.float64)
    out = A.adv_perturb_init(like, torch.ones(2, 4, dtype=torch.bool), 0.0, generator=g)
    assert out.dtype == torch.float64 and out.shape == like.shape and out.eq(0).all()
    assert torch.equal(g.get_state(), state)


@NEEDS_C
def test_init_bf16_and_like_tensor(seed):
    like = torch.empty(3, 5, 8, dtype=torch.bfloat16)
    mask = torch.rand(3, 5, generator=torch.Generator().manual_seed(seed)) > 0.4
    out = A.adv_perturb_init(like, mask, 1.0, "normal", "linf", torch.Generator().manual_seed(seed), backend="cpu")
    noise = A.adv_perturb_noise(like.shape, "normal", torch.Generator().manual_seed(seed), torch.bfloat16)
    assert out.dtype == torch.bfloat16
    assert_close_to_ref(out, A.adv_perturb_init_scale_reference(noise.double(), mask, 1.0, "linf"),
                        A.adv_perturb_init_scale_reference(noise, mask, 1.0, "linf"), "cpu bf16 init")


def test_init_bad_inputs():
    m = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"adv_perturb_init: argument 'dist' must be one of"):
        A.adv_perturb_init((2, 3, 4), m, 1.0, dist="laplace")
    with pytest.raises(ValueError, match=r"argument 'mask' must have shape \[B, L\] = \[2, 5\] \(from 'like'\)"):
        A.adv_perturb_init((2, 5, 4), m, 1.0)
    with pytest.raises(ValueError, match=r"argument 'init_mag' must be a number >= 0, got -1"):
        A.adv_perturb_init((2, 3, 4), m, -1)
    with pytest.raises(ValueError, match=r"argument 'like' must describe a padded \[B, L, D\] or packed \[T, D\] "
                                         r"shape, got \[2\]"):
        A.adv_perturb_init((2,), m, 1.0)
    with pytest.raises(TypeError, match=r"argument 'mask' must be cu_seqlens \(int32/int64 \[B\+1\]\) for the "
                                        r"packed 2-d 'like', got a bool tensor"):
        A.adv_perturb_init((2, 3), m, 1.0, max_seqlen=3)
    with pytest.raises(ValueError, match=r"argument 'norm' must be one of"):
        A.adv_perturb_init((2, 3, 4), m, 1.0, norm="L2")


# ----------------------------------------------------------------------------------------------------------
# torch.library registration
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS_HERE)
def test_opcheck(backend, gen, device):
    d1, g1, m1 = adv_inputs([3, 1], 3, 5, gen, device=device)
    d2, g2, m2 = adv_inputs([2, 4], 4, 7, gen, device=device)
    torch.library.opcheck(A._step_op, ([d1, d2], [g1, g2], [m1, m2], [0.1, 0.2], "l2", [0.05, 0.0], [3, 4], backend))
    torch.library.opcheck(A._step_op, ([d1], [g1], [m1], [0.1], "linf", [0.02], [3], backend))
    pd, pg, cu, width = adv_inputs_packed([2, 0, 3], 5, gen, device=device)
    torch.library.opcheck(A._step_op, ([pd, d2], [pg, g2], [cu, m2], [0.1, 0.2], "l2", [0.05, 0.0], [width, 4],
                                       backend))
    noise = torch.randn(2, 3, 5, generator=gen).to(device)
    torch.library.opcheck(A._init_op, (noise, m1, 0.5, "l2", 3, backend))
    torch.library.opcheck(A._init_op, (pd.clone(), cu, 0.5, "linf", width, backend))


@settings(max_examples=20, deadline=None)
@given(b=st.integers(1, 4), L=st.integers(1, 9), D=st.integers(1, 40), seed=st.integers(0, 2**31 - 1),
       norm=st.sampled_from(["l2", "linf"]), max_norm=st.sampled_from([0.0, 0.01, 0.1, 5.0]),
       lr=st.sampled_from([0.0, 1e-3, 0.1]), data=st.data())
def test_property_cpu_backend(b, L, D, seed, norm, max_norm, lr, data):
    if not fastvl.HAS_C:
        pytest.skip("fastvl._C not built")
    gen = torch.Generator().manual_seed(seed)
    lens = data.draw(st.lists(st.integers(0, L), min_size=b, max_size=b))
    delta, grad, mask = adv_inputs(lens, L, D, gen, poison_padding=True)
    out = A.adv_perturb_step(delta.clone(), grad, mask, lr, norm, max_norm, backend="cpu")
    ref64, lowp = _ref(delta, grad, mask, lr, norm, max_norm)
    assert_close_to_ref(out, ref64, lowp, "cpu property")


# ----------------------------------------------------------------------------------------------------------
# GPU (benchmarks/gpu_check.sh)
# ----------------------------------------------------------------------------------------------------------

GPU_BACKENDS = ["cuda", "triton"]


@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_gpu_multi_villa_sizes(backend, dtype, norm, gen, device):
    """Text [32, 60, 768] + image [32, 100, 2048] (with one text example all padding) in one call."""
    txt = adv_inputs([0, *torch.randint(1, 61, (31,), generator=gen).tolist()], 60, 768, gen, dtype, device,
                     poison_padding=dtype == torch.float32)
    img = adv_inputs(torch.randint(1, 101, (32,), generator=gen).tolist(), 100, 2048, gen, dtype, device)
    lrs, max_norms = [1e-3, 1e-2], [MAX_NORMS[norm][1], 0.0]
    deltas = [txt[0].clone(), img[0].clone()]
    A.adv_perturb_step_multi(deltas, [txt[1], img[1]], [txt[2], img[2]], lrs, norm, max_norms, backend=backend)
    for k, (d, g, m) in enumerate([txt, img]):
        ref64, lowp = _ref(d, g, m, lrs[k], norm, max_norms[k])
        assert_close_to_ref(deltas[k], ref64, lowp, f"{backend} {dtype} slot {k}")
        assert deltas[k].masked_select(~m[:, :, None]).eq(0).all()


@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"lens{s[0]}-D{s[2]}" if isinstance(s, tuple) else None)
def test_gpu_small_and_odd(backend, shape, gen, device):
    lens, L, D = shape
    delta, grad, mask = adv_inputs(lens, L, D, gen, device=device, poison_padding=True)
    for norm in ("l2", "linf"):
        for max_norm in MAX_NORMS[norm]:
            out = A.adv_perturb_step(delta.clone(), grad, mask, 0.05, norm, max_norm, backend=backend)
            ref64, lowp = _ref(delta, grad, mask, 0.05, norm, max_norm)
            assert_close_to_ref(out, ref64, lowp, f"{backend} {norm} {max_norm}")


@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_deterministic(backend, gen, device):
    delta, grad, mask = adv_inputs(torch.randint(1, 61, (64,), generator=gen).tolist(), 60, 768, gen, device=device)
    a = A.adv_perturb_step(delta.clone(), grad, mask, 1e-3, "l2", 0.05, backend=backend)
    b = A.adv_perturb_step(delta.clone(), grad, mask, 1e-3, "l2", 0.05, backend=backend)
    assert torch.equal(a, b)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_gpu_init(backend, dtype, norm, seed, device):
    mask = torch.rand(16, 100, generator=torch.Generator().manual_seed(seed)).to(device) > 0.3
    mask[3] = False
    gen = torch.Generator(device).manual_seed(seed)
    out = A.adv_perturb_init((16, 100, 2048), mask, 0.5, "normal", norm, gen, dtype=dtype, backend=backend)
    noise = A.adv_perturb_noise((16, 100, 2048), "normal", torch.Generator(device).manual_seed(seed), dtype, device)
    assert_close_to_ref(out, A.adv_perturb_init_scale_reference(noise.double(), mask, 0.5, norm),
                        A.adv_perturb_init_scale_reference(noise, mask, 0.5, norm), f"{backend} init")


@pytest.mark.cuda
def test_gpu_opcheck(gen, triton_device):
    d1, g1, m1 = adv_inputs([3, 1], 3, 8, gen, device=triton_device)
    for backend in GPU_BACKENDS:
        torch.library.opcheck(A._step_op, ([d1], [g1], [m1], [0.1], "l2", [0.05], [3], backend))
        torch.library.opcheck(A._init_op, (g1.clone(), m1, 0.5, "linf", 3, backend))


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=NEEDS_C)])
def test_traced_by_torch_compile(backend, gen):
    """fullgraph: backend selection reads metadata only and the in-place custom op is functionalised."""
    delta, grad, mask = adv_inputs([3, 1], 3, 5, gen)

    def step(d, g, m):
        return A.adv_perturb_step(d, g * 2, m, 0.1, "l2", 0.05, backend=backend) + 1

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    d1, d2 = delta.clone(), delta.clone()
    torch.testing.assert_close(compiled(d1, grad, mask), step(d2, grad, mask), rtol=0, atol=0)
    torch.testing.assert_close(d1, d2, rtol=0, atol=0)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_gpu_packed_villa_sizes(backend, dtype, norm, gen, device):
    """Packed text (B = 32, lengths <= 60, one empty) + packed image (<= 100 regions) in one call, and packed init."""
    txt_lens = [0, *torch.randint(1, 61, (31,), generator=gen).tolist()]
    img_lens = torch.randint(10, 101, (32,), generator=gen).tolist()
    txt = adv_inputs_packed(txt_lens, 768, gen, dtype, device)
    img = adv_inputs_packed(img_lens, 2048, gen, dtype, device)
    lrs, max_norms = [1e-3, 1e-2], [MAX_NORMS[norm][1], 0.0]
    deltas = [txt[0].clone(), img[0].clone()]
    A.adv_perturb_step_multi(deltas, [txt[1], img[1]], [txt[2], img[2]], lrs, norm, max_norms,
                             max_seqlens=[txt[3], img[3]], backend=backend)
    for k, (d, g, cu, width) in enumerate([txt, img]):
        ref64, lowp = _packed_ref(d, g, cu, width, lrs[k], norm, max_norms[k])
        assert_close_to_ref(deltas[k], ref64, lowp, f"{backend} {dtype} packed slot {k}")
    noise = A.adv_perturb_noise(img[0].shape, "uniform", torch.Generator(device).manual_seed(1), dtype, device)
    out = A.adv_perturb_init(img[0], img[2], 0.5, "uniform", norm, torch.Generator(device).manual_seed(1),
                             max_seqlen=img[3], backend=backend)
    assert_close_to_ref(out, A.adv_perturb_init_scale_packed_reference(noise.double(), img[2], img[3], 0.5, norm),
                        A.adv_perturb_init_scale_packed_reference(noise, img[2], img[3], 0.5, norm), "packed init")
