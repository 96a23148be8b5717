"""HERO fine-tuning tasks (tvr, videoqa, violin) against hand-written losses on official-format batches, the corpus
moment-retrieval evaluation on designed scores, the moment metrics against brute force, and the VIOLIN baseline
task's paired loss."""

import itertools

import pytest
import torch
from test_hero_batches import MAX_FRM, VDIM, qa_batch, tiny_config, vcmr_batch, violin_batch

from fastvl.models.hero import HeroForVcmr, HeroForVideoQA, HeroForViolin
from fastvl.models.violin import TextEncoderConfig, ViolinBaseline, ViolinConfig
from fastvl.tasks.hero_finetune import HeroVcmrTask, HeroVideoQATask, HeroViolinTask, evaluate_vcmr, vcmr_chance
from fastvl.tasks.video_metrics import moment_candidates, recall_at_k, temporal_iou, temporal_nms, video_recall_at_k
from fastvl.tasks.violin import ViolinBaselineTask


def _double(batch: dict) -> dict:
    return {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in batch.items()}


def _ce(scores, labels):
    logp = scores - scores.exp().sum(1, keepdim=True).log()
    return -torch.stack([logp[i, labels[i]] for i in range(len(labels))]).mean()


@pytest.mark.parametrize("rep", range(2))
def test_videoqa_loss(seed, rep):
    g = torch.Generator().manual_seed(seed + rep)
    model = HeroForVideoQA(tiny_config(), VDIM, MAX_FRM).double().eval()
    batch = _double(qa_batch(g))
    task = HeroVideoQATask(model)
    out = task(batch)
    logits = model(batch, "tvqa", compute_loss=False)
    assert logits.shape == (2, 5)
    qa = _ce(logits, batch["targets"].reshape(-1))
    torch.testing.assert_close(out["logs"]["videoqa_qa_loss"], qa.detach(), rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(out["loss"], qa + 0.4 * out["logs"]["videoqa_span_loss"], rtol=1e-6, atol=1e-8)
    assert out["count"] == 2
    acc = task.evaluate(batch)["accuracy"]
    assert acc.tolist() == (logits.argmax(1) == batch["targets"].reshape(-1)).double().tolist()


@pytest.mark.parametrize("rep", range(2))
def test_violin_loss(seed, rep):
    g = torch.Generator().manual_seed(seed + rep)
    model = HeroForViolin(tiny_config(), VDIM, MAX_FRM).double().eval()
    batch = _double(violin_batch(g))
    out = HeroViolinTask(model)(batch)
    z = model(batch, "violin", compute_loss=False).reshape(-1)
    y = batch["targets"].reshape(-1).double()
    p = 1 / (1 + torch.exp(-z))
    want = -(y * torch.log(p) + (1 - y) * torch.log(1 - p)).mean()
    torch.testing.assert_close(out["loss"], want, rtol=1e-6, atol=1e-8)
    assert out["count"] == 6
    assert HeroViolinTask(model).evaluate(batch)["accuracy"].tolist() == ((p >= 0.5).double() == y).double().tolist()


def test_tvr_loss_is_sum_of_parts(seed):
    g = torch.Generator().manual_seed(seed)
    model = HeroForVcmr(tiny_config(), VDIM, MAX_FRM, lw_st_ed=1.0, lw_neg_ctx=0.0, lw_neg_q=0.0).double().train()
    batch = _double(vcmr_batch(g))
    out = HeroVcmrTask(model)(batch)
    _, st, ed = model(batch, "tvr", compute_loss=False)
    rows, own = torch.arange(st.shape[0]), batch["q_vidx"]
    want = _ce(st[rows, own], batch["targets"][:, 0]) + _ce(ed[rows, own], batch["targets"][:, 1])
    torch.testing.assert_close(out["loss"], want, rtol=1e-6, atol=1e-8)
    assert out["count"] == 6


class _DesignedVcmr:
    """Stands in for HeroForVcmr in evaluate_vcmr: video scores and span logits designed from the ground truth."""

    def __init__(self, truth: dict, good: bool):
        self.truth, self.good = truth, good  # truth: query row -> (video row, st, ed)
        self.q_feat_attn = None

    def v_encoder(self, batch, mode):
        return batch["c_v_feats"][..., :4]

    def encode_txt_inputs(self, ids, pos, mask, attn_layer=None):
        return ids[:, :1].double()  # row id carried in the first token

    def get_pred_from_mod_query(self, ctx, mask, query, cross=True):
        q, v, L = query.shape[0], ctx.shape[0], ctx.shape[1]
        st, ed = torch.zeros(q, v, L), torch.zeros(q, v, L)
        for i in range(q):
            vid, s, e = self.truth[int(query[i, 0])]
            if not self.good:  # one frame outside the true span where the video has one
                n = int(mask[vid].sum())
                s = e = e + 1 if e + 1 < n else max(s - 1, 0)
            st[i, :, s], ed[i, :, e] = 10.0, 10.0
        return st, ed

    def get_video_level_scores(self, query, ctx, mask, val_gather_gpus=False):
        q2v = torch.zeros(query.shape[0], ctx.shape[0])
        for i in range(query.shape[0]):
            vid = self.truth[int(query[i, 0])][0]
            q2v[i, vid if self.good else (vid + 1) % ctx.shape[0]] = 1.0
        return q2v


def _designed_batch(g):
    batch = vcmr_batch(g)
    truth = {}
    for i in range(batch["query_input_ids"].shape[0]):
        batch["query_input_ids"][i, 0] = i
        truth[i] = (int(batch["q_vidx"][i]), int(batch["targets"][i, 0]), int(batch["targets"][i, 1]))
    return batch, truth


def test_evaluate_vcmr_designed_scores(seed):
    g = torch.Generator().manual_seed(seed)
    batch, truth = _designed_batch(g)
    perfect = evaluate_vcmr(_DesignedVcmr(truth, True), [batch])
    for k in ("vr_r1", "svmr_r1_iou0.5", "svmr_r1_iou0.7", "vcmr_r1_iou0.5", "vcmr_r1_iou0.7"):
        assert perfect[k] == 1.0, k
    assert perfect["n_queries"] == 6 and perfect["n_videos"] == 3
    wrong = evaluate_vcmr(_DesignedVcmr(truth, False), [batch])
    assert wrong["vr_r1"] == 0.0 and wrong["vcmr_r1_iou0.5"] == 0.0
    # a single wrong frame still has IoU >= 0.5 where the true span covers the whole video (the one-frame video)
    lens = [7, 1, 5]
    covered = [s == 0 and e == lens[v] - 1 for v, s, e in truth.values()]
    assert wrong["svmr_r1_iou0.5"] == pytest.approx(sum(covered) / 6)
    chance = vcmr_chance([7, 1, 5], list(truth.values()))
    assert 0.0 <= chance["vcmr_r1_iou0.5"] <= chance["vcmr_r10_iou0.5"] <= 1.0


def test_temporal_iou_nms_candidates_recall(seed):
    iou = temporal_iou(torch.tensor([[0.0, 4.0], [2.0, 6.0], [7.0, 9.0]]), torch.tensor([[2.0, 4.0], [0.0, 9.0]]))
    want = torch.tensor([[2 / 4, 4 / 9], [2 / 4, 4 / 9], [0.0, 2 / 9]], dtype=torch.float64)
    torch.testing.assert_close(iou, want)
    kept = temporal_nms([(0, 4, 0.9, "a"), (0, 3, 0.8, "a"), (0, 3, 0.7, "b"), (5, 8, 0.6, "a")], 0.5)
    assert kept == [(0, 4, 0.9, "a"), (0, 3, 0.7, "b"), (5, 8, 0.6, "a")]
    g = torch.Generator().manual_seed(seed)
    n = 7
    sp, ep = torch.softmax(torch.randn(9, generator=g), 0), torch.softmax(torch.randn(9, generator=g), 0)
    got = moment_candidates(sp, ep, n, max_moment_len=4, top_n=5)
    brute = sorted(((float(sp[s] * ep[e]), s, e + 1) for s, e in itertools.product(range(n), range(n))
                    if s <= e < s + 4), reverse=True)[:5]
    assert [(s, e) for s, e, _ in got] == [(s, e) for _, s, e in brute]
    preds = [[(1, 0, 2), (0, 1, 3)], [(0, 5, 9)], []]
    gts = [(0, 1, 3), (0, 0, 4), (2, 0, 1)]
    r = recall_at_k(preds, gts, ks=(1, 2), ious=(0.5,))
    assert r == {"r1_iou0.5": 0.0, "r2_iou0.5": pytest.approx(1 / 3)}
    vr = video_recall_at_k(torch.tensor([[0.1, 0.9, 0.0], [0.5, 0.5, 0.2]]), torch.tensor([1, 0]), ks=(1, 2))
    assert vr == {"vr_r1": 0.5, "vr_r2": 1.0}  # a tie counts against the query


def test_violin_baseline_task_paired_loss(seed):
    tcfg = TextEncoderConfig(vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                             intermediate_size=8)
    model = ViolinBaseline(tcfg, ViolinConfig(vid_feat_size=6, embed_size=8, hsize1=3, hsize2=4)).eval()
    b = 3
    batch = {"vid_feat": torch.randn(b, 5, 6), "vid_lens": torch.tensor([5, 2, 1]),
             "sub_ids": torch.randint(1, 30, (b, 4)), "sub_lens": torch.tensor([4, 3, 2]),
             "pos_ids": torch.randint(1, 30, (b, 3)), "pos_lens": torch.tensor([3, 2, 3]),
             "neg_ids": torch.randint(1, 30, (b, 4)), "neg_lens": torch.tensor([4, 4, 1])}
    task = ViolinBaselineTask(model)
    out = task(batch)
    p_pos, p_neg = torch.sigmoid(model(batch, "pos")), torch.sigmoid(model(batch, "neg"))
    want = sum(-torch.log(p_pos[i]) - torch.log(1 - p_neg[i]) for i in range(b)) / b
    torch.testing.assert_close(out["loss"], want, rtol=1e-5, atol=1e-6)
    acc = task.evaluate(batch)["accuracy"]
    assert acc.tolist() == (p_pos >= 0.5).float().tolist() + (p_neg < 0.5).float().tolist()
    assert not any(p.requires_grad for p in model.text_encoder.parameters())
    model.train()
    assert not model.text_encoder.training  # frozen features: no dropout
    with pytest.raises(KeyError, match="neg_lens"):
        model({k: v for k, v in batch.items() if k != "neg_lens"}, "neg")
