"""optimal_transport_dist / ipot_plan: every backend runnable here against the reference, and the reference against
an independent float64 transcription of REFERENCE.md's IPOT."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastvl
from fastvl.ops import BackendUnavailableError, ot
from fastvl.ops.testing import assert_rel_close, cu_seqlens, ot_inputs, pad_mask

# Every backend runnable on this machine; each test builds its tensors on the `device` fixture (the Triton device
# for 'triton'); 'cpu' is skipped, with the reason, when fastvl._C is not built.
BACKENDS_HERE = ["reference", "triton", pytest.param("cpu", marks=pytest.mark.needs_c)]
SETTINGS = [(0.5, 50, 1), (0.2, 7, 3), (1.0, 0, 1), (0.5, 1, 2)]

LENGTH_CASES = [
    # (txt_lens, img_lens): a batch of 1, 1 token / 1 region, odd and varied lengths
    ([1], [1]),
    ([7], [13]),
    ([1, 5, 9], [3, 1, 11]),
    ([40, 17, 23, 1, 39], [100, 64, 1, 37, 99]),
]


def _dist64(txt, img, tp, ip, **kw):
    return ot.optimal_transport_dist_reference(txt.double(), img.double(), tp, ip, **kw)


def _ipot_direct(cost, txt_pad, img_pad, beta=0.5, iteration=50, k=1):
    """IPOT as REFERENCE.md states it (UNITER pre-training, WRA), written out pair by pair on the unpadded block
    in float64: sigma = 1/n, T = ones [m, n], A = exp(-C^T / beta); per iteration Q = A * T, k times
    delta = 1 / (m * Q @ sigma), sigma = 1 / (n * delta @ Q); then T = delta Q sigma. Returns the plan [B, N, M]
    (T transposed), 0 at padding and for a pair without text or regions."""
    cost = cost.detach().double().cpu()
    plan = torch.zeros(cost.shape, dtype=torch.float64)
    for b in range(cost.shape[0]):
        rows = (~txt_pad[b].cpu()).nonzero().flatten().tolist()
        cols = (~img_pad[b].cpu()).nonzero().flatten().tolist()
        n, m = len(rows), len(cols)
        if n == 0 or m == 0:
            continue
        c = cost[b][rows][:, cols]  # [n, m]
        sigma = torch.full((n,), 1.0 / n, dtype=torch.float64)
        t = torch.ones(m, n, dtype=torch.float64)
        a = torch.exp(-c.t() / beta)
        for _ in range(iteration):
            q = a * t
            for _ in range(k):
                delta = 1.0 / (m * (q @ sigma))  # [m]
                sigma = 1.0 / (n * (delta @ q))  # [n]
            t = delta[:, None] * q * sigma[None, :]
        for i, r in enumerate(rows):
            for j, col in enumerate(cols):
                plan[b, r, col] = t[j, i]
    return plan


@pytest.mark.parametrize("beta,iteration,k", SETTINGS)
@pytest.mark.parametrize("lens", LENGTH_CASES[:3] + [([0, 4, 3], [5, 0, 6])])
def test_reference_matches_direct_ipot(lens, beta, iteration, k, gen):
    """The reference (batched, padded, the ground truth of every backend) against the per-pair transcription."""
    txt, img, tp, ip = ot_inputs(len(lens[0]), 0, 0, 12, gen, dtype=torch.float64, txt_lens=lens[0],
                                 img_lens=lens[1])
    cost = ot.cosine_cost(txt, img).masked_fill(tp[:, :, None] | ip[:, None, :], 0)
    want = _ipot_direct(cost, tp, ip, beta, iteration, k)
    assert_rel_close(ot.ipot_reference(cost, tp, ip, beta, iteration, k), want, 1e-10, "reference plan")
    dist = ot.optimal_transport_dist_reference(txt, img, tp, ip, beta, iteration, k)
    assert_rel_close(dist, (cost * want).sum(dim=(1, 2)), 1e-10, "reference distance")


def test_reference_with_interior_padding_matches_direct_ipot(gen):
    """Padding anywhere (not only trailing): the reference masks by position, the transcription drops them."""
    txt, img, _, _ = ot_inputs(3, 9, 11, 8, gen, dtype=torch.float64, txt_lens=[9, 9, 9], img_lens=[11, 11, 11])
    tp = torch.rand(3, 9, generator=gen) < 0.3
    ip = torch.rand(3, 11, generator=gen) < 0.3
    tp[:, 0], ip[:, 0] = False, False
    cost = ot.cosine_cost(txt, img).masked_fill(tp[:, :, None] | ip[:, None, :], 0)
    assert_rel_close(ot.ipot_reference(cost, tp, ip), _ipot_direct(cost, tp, ip), 1e-10, "interior padding")


@pytest.mark.parametrize("backend", BACKENDS_HERE)
@pytest.mark.parametrize("lens", LENGTH_CASES)
def test_distance_matches_reference(backend, lens, gen, device):
    if backend == "triton" and max(lens[1]) > 64:
        lens = (lens[0], [min(v, 64) for v in lens[1]])  # keep the interpreter quick
    txt, img, tp, ip = ot_inputs(len(lens[0]), 0, 0, 24, gen, txt_lens=lens[0], img_lens=lens[1], device=device)
    dist = ot.optimal_transport_dist(txt, img, tp, ip, backend=backend)
    assert dist.dtype == torch.float32 and dist.shape == (len(lens[0]),)
    assert_rel_close(dist, _dist64(txt, img, tp, ip), 1e-5, f"{backend} distance")


@pytest.mark.parametrize("backend", BACKENDS_HERE)
def test_plan_matches_reference_plan(backend, gen, device):
    txt, img, tp, ip = ot_inputs(4, 9, 21, 16, gen, device=device)
    cost = ot.cosine_cost(txt, img).masked_fill(tp[:, :, None] | ip[:, None, :], 0)
    plan = ot.ipot_plan(cost, tp, ip, backend=backend)
    ref = ot.ipot_reference(cost.double(), tp, ip)
    assert_rel_close(plan, ref, 1e-5, f"{backend} plan")
    assert (plan.masked_select(tp[:, :, None] | ip[:, None, :]) == 0).all()


@pytest.mark.parametrize("backend", BACKENDS_HERE)
@pytest.mark.parametrize("beta,iteration,k", SETTINGS)
def test_settings(backend, beta, iteration, k, gen, device):
    txt, img, tp, ip = ot_inputs(3, 6, 11, 8, gen, device=device)
    dist = ot.optimal_transport_dist(txt, img, tp, ip, beta, iteration, k, backend=backend)
    assert_rel_close(dist, _dist64(txt, img, tp, ip, beta=beta, iteration=iteration, k=k), 1e-5, backend)


@pytest.mark.parametrize("backend", BACKENDS_HERE)
def test_gradients_match_reference(backend, gen, device):
    txt, img, tp, ip = ot_inputs(3, 8, 12, 16, gen, device=device)
    w = torch.randn(3, generator=gen).to(device)
    txt64, img64 = txt.double().requires_grad_(), img.double().requires_grad_()
    (_dist64(txt64, img64, tp, ip) * w.double()).sum().backward()
    txt32, img32 = txt.clone().requires_grad_(), img.clone().requires_grad_()
    (ot.optimal_transport_dist(txt32, img32, tp, ip, backend=backend) * w).sum().backward()
    assert_rel_close(txt32.grad, txt64.grad, 1e-4, f"{backend} d txt_emb")
    assert_rel_close(img32.grad, img64.grad, 1e-4, f"{backend} d img_emb")


@pytest.mark.parametrize("backend", BACKENDS_HERE)
def test_all_padding_rows_give_zero(backend, gen, device):
    txt, img, tp, ip = ot_inputs(4, 6, 9, 8, gen, device=device)
    tp[1] = True  # no text
    ip[2] = True  # no regions
    tp[3], ip[3] = True, True  # neither
    txt.requires_grad_()
    dist = ot.optimal_transport_dist(txt, img, tp, ip, backend=backend)
    assert torch.isfinite(dist).all()
    assert dist[1:].eq(0).all() and dist[0] > 0
    dist.sum().backward()
    assert torch.isfinite(txt.grad).all() and txt.grad[1].eq(0).all()


@pytest.mark.parametrize("backend", BACKENDS_HERE)
def test_outputs_are_written_everywhere(backend, gen, device, poisoned):
    """The plan is a fresh tensor the kernel must fill completely, padding included: its allocation starts as NaN
    (the `poisoned` fixture), so an unwritten entry leaks NaN into the plan and the distance."""
    txt, img, tp, ip = ot_inputs(3, 5, 7, 8, gen, txt_lens=[5, 2, 0], img_lens=[3, 7, 4], device=device)
    cost = ot.cosine_cost(txt, img).masked_fill(tp[:, :, None] | ip[:, None, :], 0)
    plan = ot.ipot_plan(cost, tp, ip, backend=backend)
    assert poisoned.covers(plan), "the plan's allocation was not poisoned: this test could not see a gap"
    assert torch.isfinite(plan).all() and plan[2].eq(0).all()
    assert plan.masked_select(tp[:, :, None] | ip[:, None, :]).eq(0).all()
    dist = ot.optimal_transport_dist(txt, img, tp, ip, backend=backend)
    assert torch.isfinite(dist).all() and dist[2] == 0


def test_bf16_inputs_computed_in_fp32(gen):
    txt, img, tp, ip = ot_inputs(3, 10, 20, 32, gen)
    dist = ot.optimal_transport_dist(txt.bfloat16(), img.bfloat16(), tp, ip)
    assert dist.dtype == torch.float32
    ref = _dist64(txt.bfloat16().double(), img.bfloat16().double(), tp, ip)
    assert_rel_close(dist, ref, 1e-5, "bf16 inputs")


def test_packed_matches_padded(gen):
    txt_lens, img_lens = [3, 1, 8], [5, 9, 1]
    txt, img, tp, ip = ot_inputs(3, 0, 0, 16, gen, txt_lens=txt_lens, img_lens=img_lens)
    packed_txt = torch.cat([txt[b, :n] for b, n in enumerate(txt_lens)])
    packed_img = torch.cat([img[b, :n] for b, n in enumerate(img_lens)])
    dist = ot.optimal_transport_dist_packed(packed_txt, packed_img, cu_seqlens(txt_lens), cu_seqlens(img_lens),
                                            max(txt_lens), max(img_lens))
    assert_rel_close(dist, ot.optimal_transport_dist(txt, img, tp, ip), 1e-6, "packed")


@settings(max_examples=15, deadline=None)
@given(b=st.integers(1, 4), n=st.integers(1, 12), m=st.integers(1, 16), seed=st.integers(0, 2**31 - 1),
       data=st.data())
def test_property_cpu_backend(b, n, m, seed, data):
    if not fastvl.HAS_C:
        pytest.skip("fastvl._C not built")
    gen = torch.Generator().manual_seed(seed)
    txt_lens = data.draw(st.lists(st.integers(0, n), min_size=b, max_size=b))
    img_lens = data.draw(st.lists(st.integers(0, m), min_size=b, max_size=b))
    txt = torch.randn(b, n, 8, generator=gen)
    img = torch.randn(b, m, 8, generator=gen)
    tp, ip = pad_mask(txt_lens, n), pad_mask(img_lens, m)
    dist = ot.optimal_transport_dist(txt, img, tp, ip, backend="cpu")
    assert torch.isfinite(dist).all()
    assert_rel_close(dist, _dist64(txt, img, tp, ip), 1e-5, "cpu")


# ---------------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------------


def _good(gen):
    return ot_inputs(2, 4, 5, 8, gen, txt_lens=[4, 2], img_lens=[5, 3])


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda a: (a[0], a[1][:1], a[2], a[3]), "'img_emb' has batch size 1 but 'txt_emb' has 2"),
        (lambda a: (a[0], a[1][..., :4], a[2], a[3]), "'img_emb' has hidden size 4"),
        (lambda a: (a[0], a[1], a[2][:, :3], a[3]), r"'txt_pad' must have shape \[B, N\] = \[2, 4\]"),
        (lambda a: (a[0], a[1], a[2], a[3][:1]), r"'img_pad' must have shape \[B, M\] = \[2, 5\]"),
        (lambda a: (a[0], a[1], a[2].float(), a[3]), "'txt_pad' must be a bool tensor"),
        (lambda a: (a[0], a[1], a[2], a[3].long()), "'img_pad' must be a bool tensor"),
        (lambda a: (a[0][0], a[1], a[2], a[3]), r"'txt_emb' must be 3-d \[B, L, H\]"),
        (lambda a: (a[0], a[1][0], a[2], a[3]), r"'img_emb' must be 3-d"),
        (lambda a: (a[0].long(), a[1], a[2], a[3]), "'txt_emb' must be a float tensor"),
        (lambda a: (a[0], a[1].to("meta"), a[2], a[3]), "'img_emb' is on meta but 'txt_emb' is on cpu"),
        (lambda a: (a[0], a[1], a[2].tolist(), a[3]), "'txt_pad' must be a tensor"),
    ],
)
def test_bad_input_names_the_argument(mutate, match, gen):
    with pytest.raises((ValueError, TypeError), match=match):
        ot.optimal_transport_dist(*mutate(_good(gen)))


@pytest.mark.parametrize("kw,match", [({"beta": 0.0}, "'beta' must be > 0"), ({"iteration": -1}, "'iteration'"),
                                      ({"k": 0}, "'k' must be an int >= 1")])
def test_bad_settings(kw, match, gen):
    with pytest.raises(ValueError, match=match):
        ot.optimal_transport_dist(*_good(gen), **kw)


@pytest.mark.skipif(not fastvl.HAS_C, reason="fastvl._C not built")
def test_cpp_kernel_checks_its_arguments(gen):
    txt, img, tp, ip = _good(gen)
    cost = ot.cosine_cost(txt, img)
    with pytest.raises(ValueError, match="'cost' must have dtype Float"):
        torch.ops.fastvl.ipot_plan(cost.double(), tp, ip, 0.5, 50, 1)
    with pytest.raises(ValueError, match="'img_pad' must have shape"):
        torch.ops.fastvl.ipot_plan(cost, tp, ip[:, :2], 0.5, 50, 1)


# ---------------------------------------------------------------------------------------------------------------
# Dispatch, registration, compile
# ---------------------------------------------------------------------------------------------------------------


def test_selection_on_cpu(gen):
    txt, img, tp, ip = _good(gen)
    cost = ot.cosine_cost(txt, img)
    args = (cost, tp, ip, 0.5, 50, 1)
    expected = "cpu" if fastvl.HAS_C else "reference"
    assert ot.IPOT.select(*args) == expected
    reasons = ot.IPOT.reasons(*args)
    assert any("cuda" in r for r in reasons["cuda"])
    assert reasons["reference"] == []


def test_forced_backend_that_cannot_serve_lists_reasons(gen, monkeypatch):
    txt, img, tp, ip = _good(gen)
    with pytest.raises(BackendUnavailableError, match="backend 'cuda' was forced .* needs cuda tensors"):
        ot.optimal_transport_dist(txt, img, tp, ip, backend="cuda")
    with pytest.raises(BackendUnavailableError, match="unknown backend 'nope'"):
        ot.optimal_transport_dist(txt, img, tp, ip, backend="nope")
    monkeypatch.setenv("FASTVL_BACKEND", "ipot=cuda")
    with pytest.raises(BackendUnavailableError, match="FASTVL_BACKEND"):
        ot.optimal_transport_dist(txt, img, tp, ip)
    for value in ("ipot=nope", "nope"):  # an unknown name in the variable raises like backend= does
        monkeypatch.setenv("FASTVL_BACKEND", value)
        with pytest.raises(BackendUnavailableError, match=r"this op has \['cpu', 'cuda', 'reference', 'triton'\]"):
            ot.optimal_transport_dist(txt, img, tp, ip)
    monkeypatch.setenv("FASTVL_BACKEND", "reference")
    cost = ot.cosine_cost(txt, img)
    assert ot.IPOT.select(cost, tp, ip, 0.5, 50, 1) == "reference"


@pytest.mark.parametrize("backend", BACKENDS_HERE)
def test_opcheck(backend, gen, device):
    txt, img, tp, ip = (t.to(device) for t in _good(gen))
    cost = ot.cosine_cost(txt, img).masked_fill(tp[:, :, None] | ip[:, None, :], 0)
    torch.library.opcheck(torch.ops.fastvl.ipot.default, (cost, tp, ip, 0.5, 5, 1, backend))


@pytest.mark.slow
def test_torch_compile_fullgraph(gen):
    txt, img, tp, ip = _good(gen)
    compiled = torch.compile(ot.optimal_transport_dist, fullgraph=True, backend="aot_eager")
    assert_rel_close(compiled(txt, img, tp, ip), ot.optimal_transport_dist(txt, img, tp, ip), 1e-6, "compiled")


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_backends(backend, dtype, gen, device):
    for b, n, m in [(1, 1, 1), (5, 7, 13), (128, 60, 100), (3, 200, 100)]:
        txt, img, tp, ip = ot_inputs(b, n, m, 64, gen, dtype=dtype, device=device)
        dist = ot.optimal_transport_dist(txt, img, tp, ip, backend=backend)
        assert_rel_close(dist.cpu(), _dist64(txt.cpu(), img.cpu(), tp.cpu(), ip.cpu()), 1e-5, f"{backend} {b}x{n}x{m}")
