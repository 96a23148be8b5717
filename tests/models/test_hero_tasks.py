"""HERO pre-training task forwards (MLM, MFFR, MFM-NCE, FOM) against the official formulas written out here, on
official-format collate dicts (mlm_collate / mfm_collate / fom_collate, built as the official data/*.py do): outputs
and gradients (parameters and frame features), eval mode and train mode (dropout 0), fp32 within 1e-4 relative."""

from __future__ import annotations

import pytest
import torch
from test_hero_model import MAX_FRM, VDIM, official_state_dict, official_video_collate, tiny_config
from torch.nn import functional as F
from torch.nn.utils.rnn import pad_sequence

from fastvl.models.hero import HeroForPretraining, VideoModelConfig
from fastvl.models.hero.reference import (
    cross_modal_padded_reference,
    hero_fuse_reference,
    temporal_padded_reference,
)

RTOL = 1e-4


def _feats(g: torch.Generator, n: int) -> torch.Tensor:
    return torch.randn(n, VDIM, generator=g)


def task_videos(seed: int = 1) -> list:
    """make_batch's videos plus a one-frame video and a video with only empty pseudo-subtitles (5-frame chunks)."""
    g = torch.Generator().manual_seed(seed)
    return [
        (_feats(g, 7), [([5, 9, 11], [0, 1]), ([7, 8], [2, 3, 4]), ([20, 21, 22, 23, 24], [])]),
        (_feats(g, 1), [([30, 31], [0])]),
        (_feats(g, 6), [([40, 41], [1]), ([], [2, 3]), ([42, 43, 44, 45], [5])]),
        (_feats(g, 10), [([], [0, 1, 2, 3, 4]), ([], [5, 6, 7, 8, 9])]),
    ]


def mfm_collate(videos: list, frame_masks: list[list[bool]]) -> dict:
    """Official data/mfm.py: video_collate + segment masks (index_select of the video mask, [False] for a subtitle
    without frames), masked features zeroed at both levels, feat_targets = the raw masked c_v_feats."""
    batch = official_video_collate(videos)
    seg_masks = []
    for (_, subs), fm in zip(videos, frame_masks):
        fm_t = torch.tensor(fm)
        for _, frames in subs:
            seg_masks.append(fm_t[torch.tensor(frames)] if frames else torch.zeros(1, dtype=torch.bool))
    f_masks = pad_sequence(seg_masks, batch_first=True, padding_value=0)
    c_masks = pad_sequence([torch.tensor(m) for m in frame_masks], batch_first=True, padding_value=0)
    c_feats = batch["c_v_feats"]
    batch["feat_targets"] = c_feats[c_masks].clone()
    batch["f_v_feats"] = batch["f_v_feats"].masked_fill(f_masks.unsqueeze(-1), 0)
    batch["f_v_masks"] = f_masks
    batch["c_v_feats"] = c_feats.masked_fill(c_masks.unsqueeze(-1), 0)
    batch["c_v_masks"] = c_masks
    return batch


def make_mfm_batch(seed: int = 1) -> dict:
    masks = [[False, True, False, False, True, False, True], [True], [False, False, True, False, False, False],
             [False, False, False, True, False, False, False, False, True, False]]
    return mfm_collate(task_videos(seed), masks)


def fom_collate(videos: list, shuffles: list[dict[int, int]]) -> dict:
    """Official data/fom.py: per video ``orders[pos] = new``, ``targets[new] = pos`` for the reordered positions,
    padded with arange / -1."""
    batch = official_video_collate(videos)
    n_vid, n_frm = batch["c_v_feats"].shape[:2]
    orders = torch.arange(n_frm).unsqueeze(0).repeat(n_vid, 1)
    targets = torch.full((n_vid, n_frm), -1, dtype=torch.long)
    for v, sh in enumerate(shuffles):
        for pos, new in sh.items():
            orders[v, pos] = new
            targets[v, new] = pos
    batch["shuffled_orders"] = orders
    batch["targets"] = targets
    return batch


def make_fom_batch(seed: int = 1) -> dict:
    shuffles = [{0: 4, 2: 0, 4: 2, 5: 5}, {0: 0}, {1: 3, 3: 1}, {0: 9, 9: 6, 6: 0, 2: 2}]
    return fom_collate(task_videos(seed), shuffles)


def mlm_collate(examples: list) -> dict:
    """Official data/mlm.py: each example (frames [nf, D] or None, masked ids, labels (-1 = not masked)) becomes
    ``[<s>] + ids`` after its frames (one zero frame with attention 0 when it has none)."""
    ids_l, feats_l, attn_l, tgt_l, lab_l, txt_lens, n_fs = [], [], [], [], [], [], []
    for frames, ids, labels in examples:
        ids_t = torch.tensor([0] + list(ids))
        lab = torch.tensor([-1] + list(labels))
        if frames is not None:
            fv, attn, nf = frames, torch.ones(len(ids_t) + frames.shape[0], dtype=torch.long), frames.shape[0]
        else:
            fv, attn, nf = torch.zeros(1, VDIM), torch.ones(len(ids_t) + 1, dtype=torch.long), 1
            attn[0] = 0
        ids_l.append(ids_t)
        feats_l.append(fv)
        attn_l.append(attn)
        tgt_l.append(torch.cat([torch.zeros(nf, dtype=torch.bool), lab != -1]))
        lab_l.append(lab)
        txt_lens.append(len(ids_t))
        n_fs.append(nf)
    input_ids = pad_sequence(ids_l, batch_first=True, padding_value=1)
    labels = pad_sequence(lab_l, batch_first=True, padding_value=-1)
    v_feat = pad_sequence(feats_l, batch_first=True)
    attn = pad_sequence(attn_l, batch_first=True, padding_value=0)
    bs, max_vl = v_feat.shape[:2]
    gather = torch.arange(attn.shape[1]).unsqueeze(0).repeat(bs, 1)
    for i, (tl, nv) in enumerate(zip(txt_lens, n_fs)):
        gather[i, nv:nv + tl] = torch.arange(max_vl, max_vl + tl)
    return {"input_ids": input_ids, "position_ids": torch.arange(input_ids.shape[1]).unsqueeze(0), "v_feat": v_feat,
            "attn_masks": attn, "gather_index": gather,
            "txt_mask_tgt": pad_sequence(tgt_l, batch_first=True, padding_value=0), "txt_labels": labels[labels != -1]}


def make_mlm_batch(seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return mlm_collate([
        (_feats(g, 2), [5, 3, 11], [-1, 9, -1]),  # token 3 is the [MASK]ed 9
        (_feats(g, 3), [3, 8], [7, 8]),
        (None, [20, 3, 22, 23, 3], [-1, 21, -1, -1, 24]),  # a subtitle without frames
        (_feats(g, 1), [3], [30]),  # one frame
        (_feats(g, MAX_FRM), [40, 41, 3], [-1, -1, 42]),  # max_vl frames: gather_index is the identity
    ])


def _model(train: bool) -> HeroForPretraining:
    raw = tiny_config()
    if train:  # dropout 0 so the train-mode forward is deterministic
        for block in raw.values():
            block["hidden_dropout_prob"] = block["attention_probs_dropout_prob"] = 0.0
    model = HeroForPretraining(VideoModelConfig(raw), VDIM, MAX_FRM)
    model.load_state_dict(official_state_dict(seed=5))
    return model.train(train)


def _leaf(batch: dict, keys: tuple[str, ...]) -> dict:
    out = dict(batch)
    for k in keys:
        out[k] = batch[k].clone().requires_grad_(True)
    return out


def _grads(model: torch.nn.Module, batch: dict, keys: tuple[str, ...], fn, weight_seed: int = 7):
    """Output of fn(batch) and the gradients of a random weighting of it w.r.t. parameters and batch[keys]."""
    model.zero_grad(set_to_none=True)
    b = _leaf(batch, keys)
    out = fn(b)
    outs = out if isinstance(out, tuple) else (out,)
    g = torch.Generator().manual_seed(weight_seed)
    total = sum((o * torch.randn(o.shape, generator=g)).sum() for o in outs)
    total.backward()
    # a tensor the path does not read has grad None, i.e. zero (the padded path skips the subtitle encoder
    # when no subtitle has frames; the packed one runs it and must then get zero gradients there)
    grads = {n: torch.zeros_like(p) if p.grad is None else p.grad.clone()
             for n, p in list(model.named_parameters()) + [(k, b[k]) for k in keys]}
    return tuple(o.detach() for o in outs), grads


def _close(a: torch.Tensor, b: torch.Tensor, msg: str = "", scale: float | None = None) -> None:
    """Within RTOL relative; the absolute floor is RTOL times ``scale`` (default: b's largest magnitude)."""
    if scale is None:
        scale = float(b.abs().max()) if b.numel() else 0.0
    torch.testing.assert_close(a, b, rtol=RTOL, atol=RTOL * max(scale, 1e-3), msg=msg)


def _compare(model, batch, keys, fast, ref) -> tuple:
    out, g_fast = _grads(model, batch, keys, fast)
    ref_out, g_ref = _grads(model, batch, keys, ref)
    assert len(out) == len(ref_out)
    for a, b in zip(out, ref_out):
        assert a.shape == b.shape and a.dtype == b.dtype
        _close(a, b)
    assert set(g_fast) == set(g_ref)
    # gradients that are zero in exact arithmetic (e.g. attention key biases) are float noise: one scale for all
    scale = max(float(g.abs().max()) for g in g_ref.values() if g.numel())
    for name in g_ref:
        _close(g_fast[name], g_ref[name], msg=name, scale=scale)
    return out, g_fast


# ------------------------------------------------------------------------------------------------------------
# the official formulas
# ------------------------------------------------------------------------------------------------------------


def ref_mlm(model: HeroForPretraining, batch: dict, compute_loss: bool) -> torch.Tensor:
    fe = model.v_encoder.f_encoder
    x = cross_modal_padded_reference(fe, batch["input_ids"], batch["position_ids"], batch["v_feat"], None, None,
                                     batch["gather_index"], batch["attn_masks"])
    h = x[batch["txt_mask_tgt"].unsqueeze(-1).expand_as(x)].view(-1, x.shape[-1])
    head = fe.lm_head
    h = F.layer_norm(F.gelu(F.linear(h, head.dense.weight, head.dense.bias)), (h.shape[-1],),
                     head.LayerNorm.weight, head.LayerNorm.bias, 1e-5)
    scores = F.linear(h, fe.embeddings.word_embeddings.weight) + head.bias
    return F.cross_entropy(scores, batch["txt_labels"], reduction="none") if compute_loss else scores


def _ref_regress(v_encoder, x: torch.Tensor) -> torch.Tensor:
    net = v_encoder.feat_regress.net
    h = F.gelu(F.linear(x, net[0].weight, net[0].bias))
    h = F.layer_norm(h, (h.shape[-1],), net[2].weight, net[2].bias, 1e-5)
    return F.linear(h, net[3].weight, net[3].bias)


def ref_mfm(model: HeroForPretraining, batch: dict, compute_loss: bool, loss: str):
    ve = model.v_encoder
    mask = batch["c_v_masks"]
    c = batch["c_v_feats"].masked_fill(mask.unsqueeze(-1), 0) + ve.mask_embedding(mask.long())
    b = dict(batch, c_v_feats=c)
    clip = temporal_padded_reference(ve.c_encoder, hero_fuse_reference(ve, b), b["c_attn_masks"])
    pred = _ref_regress(ve, clip[mask])
    if loss == "regression":
        return F.mse_loss(pred, batch["feat_targets"], reduction="none") if compute_loss else pred
    neg = _ref_regress(ve, clip[~mask])  # EVERY unmasked slot of the padded grid, padding included
    if not compute_loss:
        return pred, neg
    logits = torch.cat([pred @ batch["feat_targets"].t(), pred @ neg.t()], dim=1)
    return F.cross_entropy(logits / ve.nce_temp, torch.arange(pred.shape[0]), reduction="none")


def ref_fom(model: HeroForPretraining, batch: dict, compute_loss: bool) -> torch.Tensor:
    ve = model.v_encoder
    fused = hero_fuse_reference(ve, batch)
    idx = batch["shuffled_orders"].unsqueeze(-1).expand_as(fused)
    shuffled = torch.zeros_like(fused).scatter(1, idx, fused)
    enc = temporal_padded_reference(ve.c_encoder, shuffled, batch["c_attn_masks"])
    enc = enc.reshape(-1, enc.shape[-1])
    fo = ve.fom_output
    h = F.layer_norm(F.gelu(F.linear(enc, fo.linear_1.weight, fo.linear_1.bias)), (enc.shape[-1] * 2,),
                     fo.LayerNorm.weight, fo.LayerNorm.bias, 1e-5)
    logits = F.linear(h, fo.linear_2.weight, fo.linear_2.bias)
    if not compute_loss:
        return logits
    return F.cross_entropy(logits, batch["targets"].view(-1), ignore_index=-1, reduction="mean")


# ------------------------------------------------------------------------------------------------------------
# tests
# ------------------------------------------------------------------------------------------------------------

MODES = [pytest.param(False, id="eval"), pytest.param(True, id="train")]
LOSS = [pytest.param(True, id="loss"), pytest.param(False, id="scores")]


@pytest.mark.parametrize("compute_loss", LOSS)
@pytest.mark.parametrize("train", MODES)
def test_mlm_matches_official(train, compute_loss):
    model = _model(train)
    batch = make_mlm_batch()
    out, grads = _compare(model, batch, ("v_feat",), lambda b: model(b, "mlm", compute_loss),
                          lambda b: ref_mlm(model, b, compute_loss))
    n_masked = int(batch["txt_mask_tgt"].sum())
    assert out[0].shape == ((n_masked,) if compute_loss else (n_masked, 56))
    assert grads["v_feat"][2].abs().sum() == 0  # the zero frame of the subtitle without frames is not attended
    assert grads["v_feat"][4].abs().sum() > 0
    assert grads["v_encoder.f_encoder.embeddings.word_embeddings.weight"].abs().sum() > 0


@pytest.mark.parametrize("compute_loss", LOSS)
@pytest.mark.parametrize("train", MODES)
def test_mffr_matches_official(train, compute_loss):
    model = _model(train)
    batch = make_mfm_batch()
    out, grads = _compare(model, batch, ("c_v_feats", "f_v_feats"), lambda b: model(b, "mffr", compute_loss),
                          lambda b: ref_mfm(model, b, compute_loss, "regression"))
    n = int(batch["c_v_masks"].sum())
    assert out[0].shape == (n, VDIM)
    assert grads["v_encoder.mask_embedding.weight"].abs().sum() > 0
    if compute_loss:  # the official training loss: the mean L2 distance
        l2 = out[0].sum(1).sqrt().mean()
        assert torch.isfinite(l2) and l2 > 0


@pytest.mark.parametrize("compute_loss", LOSS)
@pytest.mark.parametrize("train", MODES)
def test_mfm_nce_matches_official(train, compute_loss):
    model = _model(train)
    batch = make_mfm_batch()
    out, _ = _compare(model, batch, ("c_v_feats", "f_v_feats"), lambda b: model(b, "mfm-nce", compute_loss),
                      lambda b: ref_mfm(model, b, compute_loss, "nce"))
    n_masked = int(batch["c_v_masks"].sum())
    n_slots = batch["c_v_masks"].numel()
    if compute_loss:
        assert out[0].shape == (n_masked,)
    else:
        assert out[0].shape == (n_masked, VDIM) and out[1].shape == (n_slots - n_masked, VDIM)


def test_mfm_nce_negatives_include_padding_slots():
    """The test can tell: an NCE over the REAL unmasked frames only gives another loss."""
    model = _model(False)
    batch = make_mfm_batch()
    with torch.no_grad():
        loss = model(batch, "mfm-nce")
        pred, neg = model(batch, "mfm-nce", compute_loss=False)
        real = (batch["c_attn_masks"].bool() & ~batch["c_v_masks"])[~batch["c_v_masks"]]
        logits = torch.cat([pred @ batch["feat_targets"].t(), pred @ neg[real].t()], dim=1)
        real_only = F.cross_entropy(logits, torch.arange(pred.shape[0]), reduction="none")
    assert neg.shape[0] > int(real.sum())
    assert (loss - real_only).abs().max() > 1e-4


@pytest.mark.parametrize("compute_loss", LOSS)
@pytest.mark.parametrize("train", MODES)
def test_fom_matches_official(train, compute_loss):
    model = _model(train)
    batch = make_fom_batch()
    out, grads = _compare(model, batch, ("c_v_feats", "f_v_feats"), lambda b: model(b, "fom", compute_loss),
                          lambda b: ref_fom(model, b, compute_loss))
    n_vid, n_frm = batch["c_v_feats"].shape[:2]
    assert out[0].shape == (() if compute_loss else (n_vid * n_frm, 100))
    assert grads["v_encoder.fom_output.linear_2.weight"].abs().sum() > 0


def test_fom_shuffle_matters():
    model = _model(False)
    batch = make_fom_batch()
    plain = dict(batch, shuffled_orders=torch.arange(batch["c_v_feats"].shape[1]).repeat(4, 1))
    with torch.no_grad():
        a = model(batch, "fom", compute_loss=False)
        b = model(plain, "fom", compute_loss=False)
    assert (a - b).abs().max() > 1e-3
    # video 1 (one frame, identity order) is unchanged in its real slot
    torch.testing.assert_close(a.view(4, -1, 100)[1, 0], b.view(4, -1, 100)[1, 0], rtol=1e-5, atol=1e-6)


def test_extra_keys_ignored_and_mlm_prefix():
    model = _model(False)
    batch = dict(make_mlm_batch(), unrelated=object(), vids=["a"])
    with torch.no_grad():
        torch.testing.assert_close(model(batch, "mlm-tv"), model(batch, "mlm"))


@pytest.mark.parametrize("task,builder,key", [
    ("mlm", make_mlm_batch, "txt_labels"), ("mlm", make_mlm_batch, "gather_index"),
    ("mffr", make_mfm_batch, "c_v_masks"), ("mffr", make_mfm_batch, "feat_targets"),
    ("mfm-nce", make_mfm_batch, "feat_targets"), ("fom", make_fom_batch, "shuffled_orders"),
    ("fom", make_fom_batch, "targets"),
])
def test_missing_key_names_it(task, builder, key):
    model = _model(False)
    batch = builder()
    del batch[key]
    with pytest.raises(KeyError, match=key):
        model(batch, task)


@pytest.mark.parametrize("task", ["mfm", "itm", "repr2", "tvr"])
def test_unknown_task_raises(task):
    model = _model(False)
    with pytest.raises(ValueError, match="task"):
        model(make_fom_batch(), task)
