"""HERO VSM (video-subtitle matching) and the query encoder against the official formulas written out in
fastvl.models.hero.reference, on official-format ``vsm_collate`` dicts (built here as the official data/vsm.py
does): outputs and gradients (parameters and frame features) in train and eval mode, every loss option."""

from __future__ import annotations

import random

import pytest
import torch
from test_hero_model import VDIM, official_video_collate
from test_hero_tasks import _compare, _model
from torch.nn.utils.rnn import pad_sequence

from fastvl.models.hero import gather_across_ranks
from fastvl.models.hero.reference import query_encoder_reference, txt_padded_reference, vsm_reference


def vsm_collate(videos: list, query_subs: list[list[int]], per_video: int) -> dict:
    """Official data/vsm.py (sub_ctx_len 0): a query subtitle's text leaves its segment (which keeps [</s>] and its
    frames); query = [<s>] + ids; targets st = first frame, ed = min(max(st + 1, last), n - 1); the queries of a
    video are padded to ``per_video`` by repeating the last."""
    seg_videos, q_ids, targets, q_vidx = [], [], [], []
    for v, ((feats, subs), qs) in enumerate(zip(videos, query_subs)):
        seg_videos.append((feats, [([] if i in qs else ids, fr) for i, (ids, fr) in enumerate(subs)]))
        items = []
        for i, (ids, frames) in enumerate(subs):
            if i in qs:
                assert frames, "queries are drawn among subtitles with frames"
                st = frames[0]
                ed = min(max(st + 1, frames[-1]), feats.shape[0] - 1)
                items.append((torch.tensor([0] + list(ids)), torch.tensor([st, ed])))
        while len(items) < per_video:
            items.append(items[-1])
        for ids, tgt in items:
            q_ids.append(ids)
            targets.append(tgt)
            q_vidx.append(v)
    batch = official_video_collate(seg_videos)
    ids = pad_sequence(q_ids, batch_first=True, padding_value=1)
    batch.update({"query_input_ids": ids, "query_pos_ids": torch.arange(ids.shape[1]).unsqueeze(0),
                  "query_attn_masks": pad_sequence([torch.ones(len(t), dtype=torch.long) for t in q_ids],
                                                   batch_first=True),
                  "targets": pad_sequence(targets, batch_first=True, padding_value=-1),
                  "q_vidx": torch.tensor(q_vidx), "vids": [f"v{i}" for i in range(len(videos))]})
    return batch


def vsm_videos(seed: int = 1) -> list:
    """A 7-frame video (frames 5, 6 unmatched), a one-frame video, one with a subtitle without frames and an
    empty subtitle text, one with only empty pseudo-subtitles (5-frame chunks)."""
    g = torch.Generator().manual_seed(seed)

    def feats(n: int) -> torch.Tensor:
        return torch.randn(n, VDIM, generator=g)

    return [
        (feats(7), [([5, 9, 11], [0, 1]), ([7, 8], [2, 3, 4]), ([20, 21, 22, 23, 24], [])]),
        (feats(1), [([30, 31], [0])]),
        (feats(6), [([40, 41], [1]), ([], [2, 3]), ([33], []), ([42, 43, 44, 45], [5])]),
        (feats(10), [([], [0, 1, 2, 3, 4]), ([], [5, 6, 7, 8, 9])]),
    ]


def make_vsm_batch(seed: int = 1, per_video: int = 2) -> dict:
    queries = [[0, 1], [0], [1, 3], [1]] if per_video > 1 else [[1], [0], [3], [0]]
    return vsm_collate(vsm_videos(seed), queries, per_video)


def _vsm_model(train: bool, **opts) -> torch.nn.Module:
    model = _model(train)
    model.lw_neg_ctx, model.lw_neg_q = opts.pop("lw_neg_ctx", 1.0), opts.pop("lw_neg_q", 0.5)
    for k, v in opts.items():
        setattr(model, k, v)
    return model


def _outs(fn):
    """fn's outputs without the parts that did not run (None), as a tuple; the RNG reseeded so that sampled
    negatives draw the same indices in both paths."""
    def run(b):
        torch.manual_seed(11)
        random.seed(11)
        return tuple(o for o in fn(b) if o is not None)
    return run


OPTIONS = [
    pytest.param({}, id="all-neg"),
    pytest.param({"use_hard_negative": True, "hard_pool_size": 2, "hard_neg_weight": 10}, id="hard"),
    pytest.param({"ranking_loss_type": "lse", "margin": 0.3}, id="lse"),
    pytest.param({"use_all_neg": False}, id="sampled"),
    pytest.param({"use_all_neg": False, "use_hard_negative": True, "hard_pool_size": 1}, id="sampled-hard"),
]


@pytest.mark.parametrize("compute_loss", [pytest.param(True, id="loss"), pytest.param(False, id="scores")])
@pytest.mark.parametrize("train", [pytest.param(False, id="eval"), pytest.param(True, id="train")])
@pytest.mark.parametrize("opts", OPTIONS)
def test_vsm_matches_official(train, compute_loss, opts, seed):
    model = _vsm_model(train, **opts)
    batch = make_vsm_batch(seed)
    out, grads = _compare(model, batch, ("c_v_feats", "f_v_feats"), _outs(lambda b: model(b, "vsm", compute_loss)),
                          _outs(lambda b: vsm_reference(model, b, compute_loss)))
    n_q, n_v, n_frm = 8, 4, batch["c_v_feats"].shape[1]
    if compute_loss:
        st_ed, neg_ctx, neg_q = out
        assert st_ed.shape == ()
        if train:
            assert neg_ctx.shape == () and neg_q.shape == ()
        else:  # eval: per-query hinge vectors ([Nv] for the sampled per-video one)
            assert neg_ctx.shape == (n_q,) and neg_q.shape == ((n_q,) if opts.get("use_all_neg", True) else (n_v,))
        assert grads["video_st_predictor.weight"].abs().sum() > 0
        assert grads["q_feat_attn.modular_vector_mapping.weight"].abs().sum() > 0
    else:
        scores, st, ed = out
        assert scores.shape == (n_q, n_v) and st.shape == ed.shape == (n_q, n_v, n_frm)
        # -1e4 at the padded frames of every video
        pad = batch["c_attn_masks"] == 0
        assert bool((st[:, pad] == -1e4).all()) and bool((ed[:, pad] == -1e4).all())


def test_vsm_eval_sums_start_end_and_weights(seed):
    model = _vsm_model(False, lw_st_ed=0.5)
    batch = make_vsm_batch(seed)
    with torch.no_grad():
        st_ed, neg_ctx, neg_q = model(batch, "vsm")
        _, st, ed = model(batch, "vsm", compute_loss=False)
    rows = torch.arange(8)
    st, ed = st[rows, batch["q_vidx"]], ed[rows, batch["q_vidx"]]
    per_query = (torch.nn.functional.cross_entropy(st, batch["targets"][:, 0], reduction="none")
                 + torch.nn.functional.cross_entropy(ed, batch["targets"][:, 1], reduction="none"))
    torch.testing.assert_close(st_ed, 0.5 * per_query.sum(), rtol=1e-5, atol=1e-6)
    model.train()
    model.lw_st_ed = 0.5
    for m in model.modules():  # no dropout in _model(False)'s config: switch it off for this check
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    with torch.no_grad():
        st_ed_train, _, _ = model(batch, "vsm")
    torch.testing.assert_close(st_ed_train, 0.5 * per_query.mean(), rtol=1e-5, atol=1e-6)


def test_vsm_drop_svmr_and_zero_weights():
    model = _vsm_model(True, drop_svmr_prob=1.0)
    batch = make_vsm_batch()
    st_ed, neg_ctx, neg_q = model(batch, "vsm")
    assert st_ed.shape == (1,) and float(st_ed) == 0.0 and neg_ctx > 0
    scores, st, ed = model(batch, "vsm", compute_loss=False)
    assert st is None and ed is None and scores.shape == (8, 4)
    model.eval()  # eval always runs the span heads
    assert model(batch, "vsm", compute_loss=False)[1] is not None
    model.lw_neg_ctx = model.lw_neg_q = 0
    scores, _, _ = model(batch, "vsm", compute_loss=False)
    assert scores is None


def test_vsm_one_video_has_no_negatives():
    model = _vsm_model(False)
    batch = vsm_collate(vsm_videos()[:1], [[0, 1]], 2)
    with torch.no_grad():
        st_ed, neg_ctx, neg_q = model(batch, "vsm")
        ref = vsm_reference(model, batch)
    assert float(neg_ctx) == 0 and float(neg_q) == 0
    torch.testing.assert_close(st_ed, ref[0], rtol=1e-4, atol=1e-6)


def test_vsm_same_query_and_video_count_is_not_cross():
    """One query per video: the official non-cross path ([N, L] logits, no q_vidx needed)."""
    model = _vsm_model(False)
    batch = make_vsm_batch(per_video=1)
    batch["q_vidx"] = torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        out = model(batch, "vsm", compute_loss=False)
        ref = vsm_reference(model, batch, compute_loss=False)
        loss = model({k: v for k, v in batch.items() if k != "q_vidx"}, "vsm")
        ref_loss = vsm_reference(model, batch)
    assert out[1].shape == (4, batch["c_v_feats"].shape[1])
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for a, b in zip(loss, ref_loss):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_query_encoder_official_signature(seed):
    model = _vsm_model(False)
    batch = make_vsm_batch(seed)
    with torch.no_grad():
        f_enc = model.v_encoder.f_encoder
        tok, _ = f_enc({"input_ids": batch["query_input_ids"], "pos_ids": batch["query_pos_ids"],
                        "attn_masks": batch["query_attn_masks"]}, "txt")
        ref_tok = txt_padded_reference(f_enc, batch["query_input_ids"], batch["query_pos_ids"],
                                       batch["query_attn_masks"])
        torch.testing.assert_close(tok, ref_tok, rtol=1e-4, atol=1e-5)  # padded rows included
        pooled = model.q_feat_attn(tok, batch["query_attn_masks"])
        ref = query_encoder_reference(model.q_feat_attn, ref_tok, batch["query_attn_masks"])
    torch.testing.assert_close(pooled, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bad", ["past_end", "below"])
def test_vsm_moment_outside_video_names_targets(bad):
    model = _vsm_model(False)
    batch = make_vsm_batch()
    batch["targets"] = batch["targets"].clone()
    batch["targets"][2] = torch.tensor([0, 1]) if bad == "past_end" else torch.tensor([-3, 0])  # video 1: 1 frame
    with pytest.raises(ValueError, match="targets"):
        model(batch, "vsm")


def test_vsm_wrong_feature_dim_and_missing_keys():
    model = _vsm_model(False)
    batch = make_vsm_batch()
    batch["c_v_feats"] = torch.zeros(*batch["c_v_feats"].shape[:2], VDIM + 3)
    with pytest.raises(ValueError, match="c_v_feats"):
        model(batch, "vsm")
    for key in ("query_input_ids", "targets", "q_vidx"):
        batch = make_vsm_batch()
        del batch[key]
        with pytest.raises(KeyError, match=key):
            model(batch, "vsm")


def test_gather_across_ranks_is_identity_without_distributed():
    x = torch.randn(3, 4, requires_grad=True)
    assert gather_across_ranks(x) is x
