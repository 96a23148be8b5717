"""Shared by UNITER tests and benchmarks: random batches in both layouts (PackedVLBatch and the official padded
dict), paired fast / reference models, and output / gradient comparison.

:func:`random_pretrain_batch` draws a packed batch for a pre-training task with lengths varying within the
batch; :func:`to_official_batch` builds the dict the official collates would give for the same examples (text
and regions padded separately, ``attn_masks``, ``gather_index``, ``img_mask_tgt``, ``ot_inputs``), written
plainly from REFERENCE.md so that it is an independent statement of that layout.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ...batch import PackedVLBatch
from ...ops.testing import assert_rel_close, max_abs_err, random_lengths
from .config import UniterConfig
from .model import UniterModel
from .pretrain import UniterForPretraining
from .reference import UniterReferenceForPretraining, UniterReferenceModel

__all__ = ["assert_autocast_rule", "assert_nested_close", "assert_same_grads", "grads", "model_pair",
           "random_pretrain_batch", "tiny_config", "to_official_batch", "weighted_sum"]

MASK_ID = 3


def tiny_config(**overrides) -> UniterConfig:
    """A very small UNITER config for tests (dropout off, so runs are deterministic)."""
    base = dict(vocab_size=61, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                img_dim=24, img_label_dim=13)
    return UniterConfig(**{**base, **overrides})


def _mask(n: int, p: float, gen: torch.Generator, at_least_one: bool = True) -> torch.Tensor:
    m = torch.rand(n, generator=gen) < p
    if at_least_one and n and not bool(m.any()):
        m[int(torch.randint(n, (1,), generator=gen))] = True
    return m


def random_pretrain_batch(task: str, gen: torch.Generator, config: UniterConfig, batch: int = 5,
                          txt_range: tuple[int, int] = (1, 12), img_range: tuple[int, int] = (1, 10),
                          txt_lens: Sequence[int] | None = None, img_lens: Sequence[int] | None = None,
                          mask_prob: float = 0.15, dtype=torch.float32, device="cpu") -> PackedVLBatch:
    """A random packed batch for ``task`` (mlm, mrfr, mrc, mrc-kl, itm, or 'none' for model inputs only).

    Unless lengths are given, example 0 has a 1-token text and example 1 a 1-region image; the rest vary in the
    ranges. MLM masks tokens with ``mask_prob`` (at least one per example, id replaced by [MASK]); MRM masks
    regions likewise (raw features are left unzeroed: the packed model zeroes them itself).
    """
    if txt_lens is None:
        txt_lens = random_lengths(batch, *txt_range, gen, must_include=[1])
    if img_lens is None:
        img_lens = random_lengths(batch, *img_range, gen)
        if batch > 1:
            img_lens[1] = 1
    txt_lens, img_lens = list(txt_lens), list(img_lens)
    n_txt, n_img = sum(txt_lens), sum(img_lens)
    ids = torch.randint(4, config.vocab_size, (n_txt,), generator=gen)
    feat = torch.randn(n_img, config.img_dim, generator=gen).abs()
    pos = torch.rand(n_img, 7, generator=gen)
    kw = {}
    if task == "mlm":
        masks = [_mask(t, mask_prob, gen) for t in txt_lens]
        sel = torch.cat(masks) if masks else torch.zeros(0, dtype=torch.bool)
        labels = torch.full((n_txt,), -1, dtype=torch.long)
        labels[sel] = ids[sel]
        ids = ids.masked_fill(sel, MASK_ID)
        kw.update(txt_labels=labels, n_txt_masked=int(sel.sum()))
    elif task in ("mrfr", "mrc", "mrc-kl"):
        masks = [_mask(n, mask_prob, gen) for n in img_lens]
        sel = torch.cat(masks) if masks else torch.zeros(0, dtype=torch.bool)
        soft = torch.softmax(torch.randn(int(sel.sum()), config.img_label_dim, generator=gen) * 2, dim=-1)
        kw.update(img_masks=sel, feat_targets=feat[sel].clone(), soft_labels=soft)
    elif task == "itm":
        kw.update(itm_targets=torch.randint(0, 2, (len(txt_lens),), generator=gen))
    elif task != "none":
        raise ValueError(f"random_pretrain_batch: unknown task {task!r}")
    b = PackedVLBatch(input_ids=ids, txt_lens=txt_lens, img_feat=feat.to(dtype), img_pos=pos.to(dtype),
                      img_lens=img_lens, **kw)
    return b.to(device)


def to_official_batch(b: PackedVLBatch, task: str, with_ot: bool = True) -> dict:
    """The official padded batch dict of the same examples (see module doc)."""
    bs, tl, nbb = b.batch_size, b.txt_lens, b.img_lens
    max_tl, max_nbb = max(tl), max(nbb)
    out_size = max(t + n for t, n in zip(tl, nbb))
    dev = b.input_ids.device
    ct = [0] + torch.tensor(tl).cumsum(0).tolist()
    ci = [0] + torch.tensor(nbb).cumsum(0).tolist()
    d_img = b.img_feat.shape[1]
    input_ids = torch.zeros(bs, max_tl, dtype=torch.long, device=dev)
    img_feat = torch.zeros(bs, max_nbb, d_img, dtype=b.img_feat.dtype, device=dev)
    img_pos = torch.zeros(bs, max_nbb, 7, dtype=b.img_pos.dtype, device=dev)
    attn = torch.zeros(bs, out_size, dtype=torch.long, device=dev)
    gather = torch.arange(out_size, device=dev).repeat(bs, 1)
    for i in range(bs):
        input_ids[i, :tl[i]] = b.input_ids[ct[i]:ct[i + 1]]
        img_feat[i, :nbb[i]] = b.img_feat[ci[i]:ci[i + 1]]
        img_pos[i, :nbb[i]] = b.img_pos[ci[i]:ci[i + 1]]
        attn[i, :tl[i] + nbb[i]] = 1
        gather[i, tl[i]:tl[i] + nbb[i]] = torch.arange(max_tl, max_tl + nbb[i], device=dev)
    out = dict(input_ids=input_ids, position_ids=torch.arange(max_tl, device=dev).unsqueeze(0), img_feat=img_feat,
               img_pos_feat=img_pos, attn_masks=attn, gather_index=gather)
    if task == "mlm":
        labels = torch.full((bs, max_tl), -1, dtype=torch.long, device=dev)
        for i in range(bs):
            labels[i, :tl[i]] = b.txt_labels[ct[i]:ct[i + 1]]
        out["txt_labels"] = labels
    elif task in ("mrfr", "mrc", "mrc-kl"):
        img_masks = torch.zeros(bs, max_nbb, dtype=torch.bool, device=dev)
        tgt = torch.zeros(bs, out_size, dtype=torch.bool, device=dev)
        for i in range(bs):
            m = b.img_masks[ci[i]:ci[i + 1]]
            img_masks[i, :nbb[i]] = m
            tgt[i, tl[i]:tl[i] + nbb[i]] = m
        out.update(img_feat=img_feat.masked_fill(img_masks.unsqueeze(-1), 0.0), img_masks=img_masks,
                   img_mask_tgt=tgt, feat_targets=b.feat_targets, label_targets=b.soft_labels)
    elif task == "itm":
        out["targets"] = b.itm_targets
        if with_ot:
            scatter = torch.arange(out_size, device=dev).repeat(bs, 1)
            for i in range(bs):
                scatter[i, tl[i]:] = torch.arange(max_tl, max_tl + out_size - tl[i], device=dev)
            pad = lambda lens, width: (torch.arange(width, device=dev)[None] >=
                                       torch.tensor(lens, device=dev)[:, None]).to(torch.uint8)
            out["ot_inputs"] = dict(ot_scatter=scatter, scatter_max=int(scatter.max()), txt_pad=pad(tl, max_tl),
                                    img_pad=pad(nbb, max_nbb))
    return out


# ----------------------------------------------------------------------------------------------------------
# Paired models and comparisons
# ----------------------------------------------------------------------------------------------------------

REL = 1e-4
# Large init so that every output depends strongly on its inputs (at 0.02 the heads see near-constant states).
INIT = 0.3


def model_pair(pretrain: bool = True, seed: int = 0, **overrides):
    """(fast, reference) with identical weights, tiny config, dropout off."""
    cfg = tiny_config(initializer_range=INIT, **overrides)
    torch.manual_seed(seed)
    if pretrain:
        fast = UniterForPretraining(cfg, cfg.img_dim, cfg.img_label_dim)
        ref = UniterReferenceForPretraining(cfg, cfg.img_dim, cfg.img_label_dim)
    else:
        fast = UniterModel(cfg, cfg.img_dim)
        ref = UniterReferenceModel(cfg, cfg.img_dim)
    with torch.no_grad():  # mask row 0 is never used; give every other parameter a non-trivial value
        for p in fast.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    ref.load_state_dict(fast.state_dict(), strict=True)
    return cfg, fast, ref


def weighted_sum(outputs, gen: torch.Generator) -> torch.Tensor:
    """A scalar that depends on every element of (nested) outputs through fixed random weights."""
    if isinstance(outputs, torch.Tensor):
        w = torch.randn(outputs.shape, generator=gen, dtype=outputs.dtype)
        return (outputs * w).sum()
    return sum(weighted_sum(o, gen) for o in outputs if o is not None)


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}


def assert_same_grads(fast: torch.nn.Module, ref: torch.nn.Module, rel: float = REL) -> None:
    """Every parameter's gradient within ``rel`` of the reference's, relative to that gradient's max-abs, floored
    at 1% of the model's largest gradient: some gradients are mathematically zero (the attention key bias, as
    softmax ignores a per-query shift) and then hold only rounding noise of the surrounding magnitudes."""
    gf, gr = grads(fast), grads(ref)
    assert gf.keys() == gr.keys()
    top = max((float(g.abs().max()) for g in gr.values() if g.numel()), default=0.0)
    assert top > 0, "no parameter received a gradient"
    for name in gr:
        err = max_abs_err(gf[name], gr[name])
        scale = max(float(gr[name].abs().max()) if gr[name].numel() else 0.0, 1e-2 * top)
        assert err <= rel * scale, f"grad {name}: max abs error {err:.3e} > {rel:g} x {scale:.3e}"


def assert_nested_close(fast, ref, rel: float = REL, name: str = "output") -> None:
    if isinstance(ref, torch.Tensor):
        assert isinstance(fast, torch.Tensor), f"{name}: expected a tensor, got {type(fast).__name__}"
        assert fast.shape == ref.shape, f"{name}: shape {tuple(fast.shape)} != reference {tuple(ref.shape)}"
        assert fast.dtype == ref.dtype, f"{name}: dtype {fast.dtype} != reference {ref.dtype}"
        assert_rel_close(fast, ref, rel, name)
        return
    if ref is None:
        assert fast is None, f"{name}: expected None"
        return
    assert len(fast) == len(ref), f"{name}: {len(fast)} parts != reference {len(ref)}"
    for i, (f, r) in enumerate(zip(fast, ref)):
        assert_nested_close(f, r, rel, f"{name}[{i}]")


def _flat(outputs) -> torch.Tensor:
    """Every floating element of (nested) outputs as one float64 vector."""
    if isinstance(outputs, torch.Tensor):
        return outputs.detach().double().reshape(-1) if outputs.is_floating_point() else outputs.new_zeros(0).double()
    parts = [_flat(o) for o in outputs if o is not None]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)


def _cast_floats(batch, dtype: torch.dtype):
    if isinstance(batch, torch.Tensor):
        return batch.to(dtype) if batch.is_floating_point() else batch
    if isinstance(batch, dict):
        return {k: _cast_floats(v, dtype) for k, v in batch.items()}
    return batch


def assert_autocast_rule(fast: torch.nn.Module, ref: torch.nn.Module, batch: dict, task: str, device: str,
                         dtype: torch.dtype = torch.bfloat16, factor: float = 3.0, floor: float = 1e-5
                         ) -> dict[str, float]:
    """The tolerance rule for a whole model under autocast, on the official batch ``batch`` (predictions, no loss):

    - ``rms(fast_lowp - ref64) <= factor * rms(ref_lowp - ref64) + floor * max|ref64|``, where ref64 is the reference
      model in float64 and ref_lowp / fast_lowp the reference / fastvl under ``torch.autocast(device, dtype)``. For
      one op the rule compares maxima with factor 2; a whole model compounds rounding through every layer in another
      order than the reference, so its maximum error ratio is a tail statistic (up to 2.3 over 40 seeds of the tiny
      model) while the RMS ratio is stable (at most 1.8 over the same seeds): RMS with factor 3;
    - autocast is honoured: ``max|fast_lowp - fast_fp32| >= 0.1 * max|ref_lowp - ref64|`` (a model that ignored
      autocast would give its fp32 outputs, passing the first check trivially).

    Returns the errors (``fast``, ``lowp``: RMS; ``moved``: max) for messages. ``fast`` and ``ref`` share weights.
    """
    import copy

    ref64 = copy.deepcopy(ref).double()
    want = _flat(ref64(_cast_floats(batch, torch.float64), task, compute_loss=False))
    with torch.autocast(device, dtype=dtype):
        lowp = _flat(ref(batch, task, compute_loss=False))
        got = _flat(fast(batch, task, compute_loss=False))
    fp32 = _flat(fast(batch, task, compute_loss=False))
    rms = lambda d: float(d.pow(2).mean().sqrt())  # noqa: E731
    err_fast, err_lowp = rms(got - want), rms(lowp - want)
    moved, lowp_max = float((got - fp32).abs().max()), float((lowp - want).abs().max())
    allowed = factor * err_lowp + floor * float(want.abs().max())
    assert err_fast <= allowed, (f"{task}: autocast RMS error {err_fast:.3e} > allowed {allowed:.3e} (reference "
                                 f"{err_lowp:.3e})")
    assert moved >= 0.1 * lowp_max, (f"{task}: autocast ignored: fastvl under autocast moved {moved:.3e} from its "
                                     f"fp32 outputs, the reference moved {lowp_max:.3e}")
    return {"fast": err_fast, "lowp": err_lowp, "moved": moved}
