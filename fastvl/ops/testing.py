"""Shared by tests and benchmarks: the tolerance rule and random-input generators.

Tolerance rule (DESIGN.md, after flash-attention): a fast backend is correct when

    max|fast - ref64| <= 2 * max|ref_lowp - ref64| + floor

where ref64 is the reference computed in float64 and ref_lowp the reference computed in the fast
backend's dtype. For float32 the floor is 1e-5 relative to max|ref64|.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import random
from collections.abc import Iterator, Sequence

import torch

FLOOR_REL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 1e-2, torch.float16: 1e-3}


def max_abs_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| in float64 (NaN propagates as inf so it never passes a tolerance check)."""
    d = (a.detach().double() - b.detach().double()).abs()
    if d.numel() == 0:
        return 0.0
    d = torch.where(torch.isnan(d), torch.full_like(d, float("inf")), d)
    return float(d.max())


def tolerance(ref64: torch.Tensor, ref_lowp: torch.Tensor, dtype: torch.dtype | None = None,
              floor_rel: float | None = None) -> float:
    """The allowed max-abs error of a fast backend computing in ``dtype`` (default: ref_lowp's dtype)."""
    dtype = dtype or ref_lowp.dtype
    floor_rel = FLOOR_REL.get(dtype, 1e-5) if floor_rel is None else floor_rel
    scale = float(ref64.detach().abs().max()) if ref64.numel() else 0.0
    return 2.0 * max_abs_err(ref_lowp, ref64) + floor_rel * max(scale, 1e-30)


def assert_close_to_ref(fast: torch.Tensor, ref64: torch.Tensor, ref_lowp: torch.Tensor, name: str = "output",
                        floor_rel: float | None = None, dtype: torch.dtype | None = None) -> None:
    """Assert the tolerance rule; the message gives both errors so a failure is diagnosable."""
    assert fast.shape == ref64.shape, f"{name}: shape {tuple(fast.shape)} != reference {tuple(ref64.shape)}"
    err = max_abs_err(fast, ref64)
    tol = tolerance(ref64, ref_lowp, dtype or fast.dtype, floor_rel)
    assert err <= tol, (f"{name}: max|fast - ref64| = {err:.3e} > allowed {tol:.3e} "
                        f"(2 x lowp error {max_abs_err(ref_lowp, ref64):.3e} + floor)")


def assert_rel_close(fast: torch.Tensor, ref: torch.Tensor, rel: float, name: str = "output") -> None:
    """max|fast - ref| <= rel * max(max|ref|, tiny)."""
    err = max_abs_err(fast, ref)
    scale = float(ref.detach().abs().max()) if ref.numel() else 0.0
    assert err <= rel * max(scale, 1e-30), f"{name}: max abs error {err:.3e} > {rel:g} x {scale:.3e}"


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill with NaN (floats) or an out-of-range value (ints) so that unwritten outputs are caught."""
    if t.is_floating_point() or t.is_complex():
        return t.fill_(float("nan"))
    if t.dtype == torch.bool:
        return t.fill_(True)
    return t.fill_(-(2**30) if t.dtype in (torch.int32, torch.int64) else 1)


def poisoned_empty(*shape: int, dtype=torch.float32, device="cpu") -> torch.Tensor:
    return poison_(torch.empty(*shape, dtype=dtype, device=device))


def triton_test_device() -> torch.device:
    """Where tests run Triton kernels: the GPU when there is one, else the CPU under ``TRITON_INTERPRET=1`` (the
    dispatcher refuses CPU tensors for Triton without the interpreter). ``tests/conftest.py``'s ``triton_device``
    fixture returns this."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("no GPU: Triton tests need TRITON_INTERPRET=1 (tests/conftest.py sets it)")
    return torch.device("cpu")


# ----------------------------------------------------------------------------------------------------------
# Poisoned allocations: an output a kernel leaves unwritten reads NaN
# ----------------------------------------------------------------------------------------------------------


def _cpu_junk_flag() -> ctypes.c_bool | None:
    """c10's ``caffe2_cpu_allocator_do_junk_fill`` flag: when set, every CPU allocation, C++ ones included (the
    outputs of ``fastvl._C``), is filled with 0x7fedbeef (NaN as float32, 1.6e308 as float64). None where the
    library does not export it."""
    lib_dir = os.path.join(os.path.dirname(torch.__file__), "lib")
    for name in ("libc10.so", "libc10.dylib"):
        path = os.path.join(lib_dir, name)
        if os.path.exists(path):
            try:
                return ctypes.c_bool.in_dll(ctypes.CDLL(path), "FLAGS_caffe2_cpu_allocator_do_junk_fill")
            except (OSError, ValueError):
                return None
    return None


class PoisonedAllocations:
    """What :func:`poisoned_allocations` poisoned: ``hits`` (allocations through ``torch.empty`` / ``empty_like``
    / ``empty_strided`` / ``Tensor.new_empty``, on any device), their storages, and whether every CPU allocation
    is junk-filled (``cpu_junk_fill``)."""

    def __init__(self) -> None:
        self.hits = 0
        self.cpu_junk_fill = False
        self._storages: list[torch.Tensor] = []

    def record(self, t: torch.Tensor) -> torch.Tensor:
        if isinstance(t, torch.Tensor) and t.numel():
            self.hits += 1
            self._storages.append(t)
            poison_(t)
        return t

    def covers(self, t: torch.Tensor) -> bool:
        """Whether the allocation that holds ``t`` was poisoned: it came from a patched allocator call (the same
        storage), or it is a CPU tensor while every CPU allocation is junk-filled."""
        if t.device.type == "cpu" and self.cpu_junk_fill:
            return True
        ptr = t.untyped_storage().data_ptr()
        return any(s.untyped_storage().data_ptr() == ptr for s in self._storages)


@contextlib.contextmanager
def poisoned_allocations() -> Iterator[PoisonedAllocations]:
    """Within the block every float tensor that ``torch.empty``, ``torch.empty_like``, ``torch.empty_strided`` or
    ``Tensor.new_empty`` returns is NaN (ints -2**30, bools True), and, where c10 exports its junk-fill flag, every
    CPU allocation (C++ ones too) starts as 0x7fedbeef. A kernel that leaves part of an output (or of a workspace
    it reads) unwritten then produces NaN. Tests assert ``state.covers(output)`` to show that the poison reached
    the output's allocation."""
    state = PoisonedAllocations()
    originals = {"empty": torch.empty, "empty_like": torch.empty_like, "empty_strided": torch.empty_strided}
    new_empty = torch.Tensor.new_empty
    flag = _cpu_junk_flag()
    old_flag = bool(flag.value) if flag is not None else False
    try:
        for name, fn in originals.items():
            setattr(torch, name, lambda *a, _fn=fn, **kw: state.record(_fn(*a, **kw)))
        torch.Tensor.new_empty = lambda self, *a, **kw: state.record(new_empty(self, *a, **kw))
        if flag is not None:
            flag.value = True
            probe = torch.ops.aten.empty.memory_format([64], dtype=torch.float32)  # not through the patches above
            state.cpu_junk_fill = bool(torch.isnan(probe).all())
        yield state
    finally:
        for name, fn in originals.items():
            setattr(torch, name, fn)
        torch.Tensor.new_empty = new_empty
        if flag is not None:
            flag.value = old_flag


def fresh_seed() -> int:
    """A new seed per call unless FASTVL_TEST_SEED pins it (printed by tests on failure)."""
    pinned = os.environ.get("FASTVL_TEST_SEED")
    return int(pinned) if pinned else random.SystemRandom().randrange(2**31)


def random_lengths(batch: int, low: int, high: int, gen: torch.Generator, must_include: Sequence[int] = ()
                   ) -> list[int]:
    """``batch`` lengths in [low, high] (Python ints), the first ones forced to ``must_include``."""
    lens = torch.randint(low, high + 1, (batch,), generator=gen).tolist()
    for i, v in enumerate(list(must_include)[:batch]):
        lens[i] = v
    return lens


def pad_mask(lens: Sequence[int], width: int | None = None, device="cpu") -> torch.Tensor:
    """[B, width] bool, True at padding (positions >= length)."""
    width = max(lens, default=0) if width is None else width
    pos = torch.arange(width, device=device)
    return pos[None, :] >= torch.tensor(list(lens), device=device)[:, None]


def cu_seqlens(lens: Sequence[int], device="cpu") -> torch.Tensor:
    """[B+1] int32 cumulative lengths."""
    out = torch.zeros(len(lens) + 1, dtype=torch.int32, device=device)
    out[1:] = torch.tensor(list(lens), dtype=torch.int32, device=device).cumsum(0)
    return out


def ot_inputs(batch: int, max_txt: int, max_img: int, hidden: int, gen: torch.Generator, dtype=torch.float32,
              device="cpu", txt_lens: Sequence[int] | None = None, img_lens: Sequence[int] | None = None):
    """Random WRA inputs: txt_emb [B, N, H], img_emb [B, M, H], txt_pad [B, N], img_pad [B, M].

    Lengths vary within the batch (uniform in [1, max]) unless given; embeddings are correlated between
    text and image so that costs spread over [0, 2] as real encoder outputs do.
    """
    txt_lens = list(txt_lens) if txt_lens is not None else random_lengths(batch, 1, max_txt, gen)
    img_lens = list(img_lens) if img_lens is not None else random_lengths(batch, 1, max_img, gen)
    n, m = max(txt_lens, default=0), max(img_lens, default=0)
    n, m = max(n, 1) if txt_lens else 0, max(m, 1) if img_lens else 0
    shared = torch.randn(batch, 1, hidden, generator=gen)
    txt = (torch.randn(batch, n, hidden, generator=gen) + shared).to(device=device, dtype=dtype)
    img = (torch.randn(batch, m, hidden, generator=gen) + shared).to(device=device, dtype=dtype)
    return txt, img, pad_mask(txt_lens, n, device), pad_mask(img_lens, m, device)


def adv_inputs(lens: Sequence[int], width: int, dim: int, gen: torch.Generator, dtype=torch.float32, device="cpu",
               delta_scale: float = 0.01, poison_padding: bool = False):
    """Random VILLA step inputs: delta [B, L, D] (small, like a perturbation after a few steps), grad [B, L, D]
    and mask [B, L] (True at valid positions, ``lens[b]`` valid per example). With ``poison_padding`` the padding
    entries of delta and grad are NaN, which a correct step never reads."""
    mask = ~pad_mask(lens, width)
    b = len(lens)
    delta = torch.randn(b, width, dim, generator=gen) * delta_scale
    grad = torch.randn(b, width, dim, generator=gen) * torch.rand(b, 1, 1, generator=gen).add(0.1)
    if poison_padding:
        pad = ~mask[:, :, None].expand_as(delta)
        delta = delta.masked_fill(pad, float("nan"))
        grad = grad.masked_fill(pad, float("nan"))
    return delta.to(device=device, dtype=dtype), grad.to(device=device, dtype=dtype), mask.to(device)


def attention_inputs(lens_q: Sequence[int], lens_k: Sequence[int] | None = None, heads: int = 2, head_dim: int = 32,
                     gen: torch.Generator | None = None, dtype=torch.float32, device="cpu", mask: str = "bidirectional",
                     prefix_lens: Sequence[int] | None = None) -> tuple:
    """Random packed inputs of ``fastvl.ops.cross_modal_attention`` in its positional order: (q [Tq, H, D],
    k [Tk, H, D], v [Tk, H, D], cu_seqlens_q [B+1], cu_seqlens_k [B+1], max_seqlen_q, max_seqlen_k, mask,
    prefix_lens [B] int32 or None).

    ``lens_k`` defaults to ``lens_q`` (bidirectional / seq2seq); for seq2seq ``prefix_lens`` defaults to random
    values in [0, length]. Values are drawn in float32 on the CPU (from ``gen``) and then cast and moved.
    """
    lens_q = list(lens_q)
    lens_k = list(lens_q if lens_k is None else lens_k)
    gen = gen if gen is not None else torch.Generator().manual_seed(0)

    def rand(n):
        return torch.randn(n, heads, head_dim, generator=gen).to(device=device, dtype=dtype)

    q, k, v = rand(sum(lens_q)), rand(sum(lens_k)), rand(sum(lens_k))
    prefix = None
    if mask == "seq2seq":
        if prefix_lens is None:
            prefix_lens = [int(torch.randint(0, n + 1, (1,), generator=gen)) for n in lens_q]
        prefix = torch.tensor(list(prefix_lens), dtype=torch.int32, device=device)
    return (q, k, v, cu_seqlens(lens_q, device), cu_seqlens(lens_k, device), max(lens_q, default=0),
            max(lens_k, default=0), mask, prefix)


# ----------------------------------------------------------------------------------------------------------
# Fused losses (linear_cross_entropy, linear_kl, masked_regression, bce_soft, symmetric_kl)
# ----------------------------------------------------------------------------------------------------------


def linear_head_inputs(n: int, hidden: int, out: int, gen: torch.Generator, *, n_all: int | None = None,
                       bias: bool = True, transposed: bool = False, logit_std: float = 2.0, dtype=torch.float32,
                       device="cpu") -> tuple:
    """(hidden [n_all or n, H], weight [out, H] (or [H, out] when ``transposed``), bias [out] or None, indices).

    ``indices`` is None unless ``n_all`` is given; then it is [n] int64 rows drawn with replacement from
    [0, n_all) (so duplicates occur). The weight is scaled so that the outputs have std ~``logit_std``.
    """
    rows = n if n_all is None else n_all
    h = torch.randn(rows, hidden, generator=gen)
    w = torch.randn(out, hidden, generator=gen) * (logit_std / max(hidden, 1) ** 0.5)
    b = torch.randn(out, generator=gen) * 0.5 if bias else None
    idx = None if n_all is None else torch.randint(0, max(n_all, 1), (n,), generator=gen).to(device)
    w = w.t().contiguous() if transposed else w
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    return cast(h), cast(w), cast(b), idx


def class_targets(n: int, classes: int, gen: torch.Generator, *, ignore_frac: float = 0.0, ignore_index: int = -1,
                  device="cpu") -> torch.Tensor:
    """[n] int64 class ids in [0, classes); a fraction of rows (at least one if ignore_frac > 0) set to
    ``ignore_index``."""
    t = torch.randint(0, classes, (n,), generator=gen)
    if ignore_frac > 0 and n:
        drop = torch.rand(n, generator=gen) < ignore_frac
        drop[int(torch.randint(0, n, (1,), generator=gen))] = True
        t[drop] = ignore_index
    return t.to(device)


def soft_label_targets(n: int, classes: int, gen: torch.Generator, *, sharpness: float = 3.0, dtype=torch.float32,
                       device="cpu") -> torch.Tensor:
    """[n, classes] rows summing to 1 (a softmax of random scores: peaked, like detector soft labels)."""
    return torch.softmax(torch.randn(n, classes, generator=gen) * sharpness, dim=-1).to(device=device, dtype=dtype)


def vqa_soft_scores(n: int, answers: int, gen: torch.Generator, *, per_row: int = 3, dtype=torch.float32,
                    device="cpu") -> torch.Tensor:
    """[n, answers] VQA-style soft scores: ``per_row`` answers per row get a score in {0.3, 0.6, 0.9, 1.0}."""
    scores = torch.zeros(n, answers)
    levels = torch.tensor([0.3, 0.6, 0.9, 1.0])
    for i in range(n):
        cols = torch.randperm(answers, generator=gen)[:per_row]
        scores[i, cols] = levels[torch.randint(0, 4, (len(cols),), generator=gen)]
    return scores.to(device=device, dtype=dtype)


def masked_positions(n_all: int, frac: float, gen: torch.Generator, device="cpu") -> torch.Tensor:
    """Sorted int64 positions in [0, n_all), each kept with probability ``frac`` (at least one if n_all > 0):
    the masked tokens / regions of a batch."""
    keep = torch.rand(n_all, generator=gen) < frac
    if n_all:
        keep[int(torch.randint(0, n_all, (1,), generator=gen))] = True
    return keep.nonzero().squeeze(1).to(device)


def logit_pair(shape: Sequence[int], gen: torch.Generator, *, spread: float = 2.0, noise: float = 0.5,
               dtype=torch.float32, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Two correlated logit tensors (clean and perturbed, as VILLA's symmetric KL sees them)."""
    a = torch.randn(*shape, generator=gen) * spread
    b = a + torch.randn(*shape, generator=gen) * noise
    return a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype)


def value_and_grads(fn, inputs: Sequence[torch.Tensor | None], out_weight: torch.Tensor | None = None,
                    wrt: Sequence[int] | None = None) -> list[torch.Tensor | None]:
    """[fn(*inputs) detached, then the gradient w.r.t. each input in ``wrt`` (positions; default: every float
    tensor)] of ``(out * out_weight).sum()`` (``out.sum()`` without a weight). The differentiated inputs are
    cloned into fresh leaves; an input the output does not depend on gets a zero gradient."""
    wrt = [i for i, t in enumerate(inputs) if isinstance(t, torch.Tensor) and t.is_floating_point()] \
        if wrt is None else list(wrt)
    leaves = list(inputs)
    for i in wrt:
        leaves[i] = inputs[i].detach().clone().requires_grad_()
    out = fn(*leaves)
    total = (out * out_weight.to(out.dtype)).sum() if out_weight is not None else out.sum()
    grads = torch.autograd.grad(total, [leaves[i] for i in wrt], allow_unused=True)
    return [out.detach(), *[torch.zeros_like(leaves[i]) if g is None else g for i, g in zip(wrt, grads)]]


def adv_inputs_packed(lens: Sequence[int], dim: int, gen: torch.Generator, dtype=torch.float32, device="cpu",
                      delta_scale: float = 0.01):
    """The packed form of :func:`adv_inputs`: delta [T, D], grad [T, D], cu_seqlens [B+1] int32, max_seqlen."""
    width = max(max(lens, default=0), 1)
    delta, grad, mask = adv_inputs(lens, width, dim, gen, delta_scale=delta_scale)
    return (delta[mask].to(device=device, dtype=dtype), grad[mask].to(device=device, dtype=dtype),
            cu_seqlens(lens, device), width)
