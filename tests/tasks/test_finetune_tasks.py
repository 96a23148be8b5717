"""Fine-tuning task modules and metrics: losses against plain formulas, metrics against brute force, bad input."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from fastvl.batch import PackedVLBatch
from fastvl.models.uniter import (
    UniterForImageTextRetrieval,
    UniterForNlvr2Paired,
    UniterForReferringExpressionComprehension,
    UniterForVisualCommonsenseReasoning,
    UniterForVisualQuestionAnswering,
)
from fastvl.models.uniter.testing import random_pretrain_batch, tiny_config
from fastvl.tasks import build_task, list_tasks
from fastvl.tasks import metrics as M
from fastvl.tasks.itr import ITRTask, pair_batch
from fastvl.tasks.vqa import vqa_soft_targets

TOL = dict(rtol=1e-4, atol=1e-5)


def _model(cls, *args):
    cfg = tiny_config(initializer_range=0.3)
    torch.manual_seed(0)
    return cls(cfg, cfg.img_dim, *args).eval(), cfg


def _batch(gen, cfg, b, **kw):
    return random_pretrain_batch("none", gen, cfg, batch=b, **kw)


# ----------------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------------


def test_vqa_score_and_accuracy(gen):
    logits = torch.randn(6, 9, generator=gen)
    soft = torch.rand(6, 9, generator=gen)
    want = torch.tensor([float(soft[i, int(logits[i].argmax())]) for i in range(6)])
    torch.testing.assert_close(M.vqa_score(logits, soft), want)
    t = torch.randint(0, 9, (6,), generator=gen)
    torch.testing.assert_close(M.accuracy(logits, t), torch.tensor([float(int(logits[i].argmax()) == int(t[i]))
                                                                    for i in range(6)]))
    with pytest.raises(ValueError, match="'soft_targets' must have the shape"):
        M.vqa_score(logits, soft[:, :3])


def _brute_recall(scores, txt2img, k):
    n_txt, n_img = scores.shape
    ir = sum(int(txt2img[t]) in scores[t].argsort(descending=True)[:k].tolist() for t in range(n_txt)) / n_txt
    hits, n = 0, 0
    for i in range(n_img):
        texts = [t for t in range(n_txt) if int(txt2img[t]) == i]
        if texts:
            n += 1
            hits += any(t in scores[:, i].argsort(descending=True)[:k].tolist() for t in texts)
    return 100 * ir, 100 * hits / n


def test_retrieval_recall_equals_brute_force(gen):
    n_img, per = 13, 3
    txt2img = torch.arange(n_img).repeat_interleave(per)[:-2]  # the last image has a single text
    scores = torch.randn(txt2img.numel(), n_img, generator=gen)  # continuous: no ties
    got = M.retrieval_recall(scores, txt2img)
    for k in (1, 5, 10):
        ir, tr = _brute_recall(scores, txt2img, k)
        assert got[f"ir_r{k}"] == pytest.approx(ir) and got[f"tr_r{k}"] == pytest.approx(tr)
    with pytest.raises(ValueError, match="outside"):
        M.retrieval_recall(scores, txt2img + 1)


def test_box_iou_and_re_accuracy():
    a = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 4, 4.0]])
    b = torch.tensor([[0, 0, 10, 10], [5, 0, 15, 10], [10, 10, 12, 12.0]])
    torch.testing.assert_close(M.box_iou(a, b), torch.tensor([1.0, 50 / 150, 0.0]))
    b2 = b.clone()
    b2[1] = torch.tensor([2, 0, 10, 10.0])  # IoU 0.8
    torch.testing.assert_close(M.re_accuracy(a, b2), torch.tensor([1.0, 1.0, 0.0]))


def test_re_box_outside_image_is_an_error():
    boxes = torch.tensor([[0, 0, 10, 10], [5, 5, 30, 12.0]])
    sizes = torch.tensor([[20, 20], [20, 20]])
    with pytest.raises(ValueError, match=r"'gt_boxes' box 1 .* outside its image"):
        M.re_accuracy(boxes[:1].repeat(2, 1), boxes, sizes)
    with pytest.raises(ValueError, match="box 0 .* x2 < x1"):
        M.check_boxes(torch.tensor([[5, 0, 1, 1.0]]), "boxes")


def test_vcr_accuracy(gen):
    qa, qar = torch.randn(5, 4, generator=gen), torch.randn(5, 4, generator=gen)
    a, r = qa.argmax(1), torch.tensor([0, 1, 2, 3, 0])
    out = M.vcr_accuracy(qa, qar, a, r)
    assert bool((out["q2a"] == 1).all())
    torch.testing.assert_close(out["q2ar"], (qar.argmax(1) == r).float())
    with pytest.raises(ValueError, match="4 choices"):
        M.vcr_accuracy(qa[:, :3], qar, a, r)


# ----------------------------------------------------------------------------------------------------------
# Tasks
# ----------------------------------------------------------------------------------------------------------


def test_registry():
    assert {"vqa", "gqa", "ve", "nlvr2", "itr", "re", "vcr"} <= set(list_tasks())


def test_vqa_task_loss_and_targets(gen):
    model, cfg = _model(UniterForVisualQuestionAnswering, 7)
    pb = _batch(gen, cfg, 4)
    targets = vqa_soft_targets([[1, 3], [], [6], [0, 1, 2]], [[1.0, 0.3], [], [0.6], [0.3, 0.3, 1.0]], 7)
    assert targets[0, 3] == pytest.approx(0.3) and targets[1].sum() == 0
    pb.targets = targets
    task = build_task("gqa", model=model)
    out = task(pb)
    logits = model(pb, compute_loss=False)
    want = F.binary_cross_entropy_with_logits(logits, targets, reduction="sum") / 4
    torch.testing.assert_close(out["loss"], want, **TOL)
    assert out["count"] == 4 and set(out["logs"]) == {"vqa_loss"}
    out["loss"].backward()
    assert model.vqa_output[0].weight.grad is not None
    torch.testing.assert_close(task.evaluate(pb)["score"], M.vqa_score(logits, targets))


def test_vqa_answer_out_of_vocabulary():
    with pytest.raises(ValueError, match=r"example 1 has answer id 7 outside the answer vocabulary \[0, 7\)"):
        vqa_soft_targets([[1], [7]], [[1.0], [1.0]], 7)
    with pytest.raises(ValueError, match="example 0 has score 1.5"):
        vqa_soft_targets([[1]], [[1.5]], 7)


def test_nlvr2_task_and_missing_image(gen):
    model, cfg = _model(UniterForNlvr2Paired)
    model.init_type_embedding()
    pb = _batch(gen, cfg, 4, img_lens=[3, 2, 4, 1])
    pb.img_type_ids = torch.cat([torch.full((n,), 1 + i % 2) for i, n in enumerate(pb.img_lens)])
    pb.targets = torch.tensor([1, 0])
    task = build_task("nlvr2", model=model)
    out = task(pb)
    scores = model(pb, compute_loss=False)
    torch.testing.assert_close(out["loss"], F.cross_entropy(scores, torch.tensor([1, 0])), **TOL)
    assert out["count"] == 2
    torch.testing.assert_close(task.evaluate(pb)["accuracy"], (scores.argmax(1) == torch.tensor([1, 0])).float())
    pb = _batch(gen, cfg, 4, img_lens=[3, 2, 0, 1])
    pb.targets = torch.tensor([1, 0])
    with pytest.raises(ValueError, match=r"example\(s\) \[1\] have an image with 0 regions"):
        task(pb)


def test_itr_task_groups_and_loss(gen):
    model, cfg = _model(UniterForImageTextRetrieval)
    pb = _batch(gen, cfg, 4)
    task = ITRTask(model, num_neg=2, generator=torch.Generator().manual_seed(1))
    ti, ii = task.groups(4)
    assert len(ti) == len(ii) == 4 * 5
    for g in range(4):
        t, i = ti[5 * g:5 * g + 5], ii[5 * g:5 * g + 5]
        assert t[0] == i[0] == g
        assert all(x == g for x in t[:3]) and all(x != g for x in i[1:3])  # image negatives
        assert all(x == g for x in i[3:]) and all(x != g for x in t[3:])  # text negatives
    task.generator = torch.Generator().manual_seed(5)
    out = task(pb)
    task.generator = torch.Generator().manual_seed(5)
    ti, ii = task.groups(4)
    s = torch.sigmoid(model(pair_batch(pb, ti, ii), compute_loss=False)).reshape(4, 5)
    torch.testing.assert_close(out["loss"], torch.clamp(0.2 + s[:, 1:] - s[:, :1], min=0).mean(), **TOL)
    with pytest.raises(ValueError, match=">= 2 pairs"):
        task(_batch(gen, cfg, 1))


def test_itr_hard_negatives(gen):
    """hard_neg: each pair's negatives are its highest-scoring other images / texts of the eval-mode score matrix
    (hardest repeated when the batch has fewer others than num_neg); the model is left in training mode."""
    model, cfg = _model(UniterForImageTextRetrieval)
    scores = torch.tensor([[9.0, 1.0, 5.0], [2.0, 9.0, 7.0], [8.0, 3.0, 9.0]])  # text x image
    task = ITRTask(model, num_neg=3, hard_neg=True)
    ti, ii = task.groups(3, scores)
    groups = [(ti[7 * g:7 * g + 7], ii[7 * g:7 * g + 7]) for g in range(3)]
    assert groups[0] == ([0, 0, 0, 0, 2, 1, 2], [0, 2, 1, 2, 0, 0, 0])  # images for text 0: 2 (5) > 1 (1)
    assert groups[1] == ([1, 1, 1, 1, 2, 0, 2], [1, 2, 0, 2, 1, 1, 1])  # texts for image 1: 2 (3) > 0 (1)
    assert groups[2] == ([2, 2, 2, 2, 1, 0, 1], [2, 0, 1, 0, 2, 2, 2])
    pb = _batch(gen, cfg, 5)
    task = ITRTask(model, num_neg=2, hard_neg=True)
    model.train()
    out = task(pb)
    assert model.training
    model.eval()
    m = task.score_matrix(pb, range(5), range(5))
    model.train()
    ti, ii = task.groups(5, m)
    s = torch.sigmoid(model(pair_batch(pb, ti, ii), compute_loss=False)).reshape(5, 5)
    torch.testing.assert_close(out["loss"], torch.clamp(0.2 + s[:, 1:] - s[:, :1], min=0).mean(), **TOL)
    off = m.masked_fill(torch.eye(5, dtype=torch.bool), -1e9)
    assert ii[1] == int(off[0].argmax()) and ti[3] == int(off[:, 0].argmax())  # pair 0's hardest image / text
    with pytest.raises(ValueError, match="'hard_neg' must be true or false"):
        ITRTask(model, hard_neg="yes")


def test_itr_score_matrix_is_brute_force(gen):
    model, cfg = _model(UniterForImageTextRetrieval)
    pb = _batch(gen, cfg, 5)
    task = ITRTask(model)
    m = task.score_matrix(pb, range(5), range(5), chunk=7)
    for t in range(5):
        for i in range(5):
            single = model(pair_batch(pb, [t], [i]), compute_loss=False)
            torch.testing.assert_close(m[t, i], single[0, 0], **TOL)
    rec = task.evaluate(pb)
    assert rec == M.retrieval_recall(m, torch.arange(5))


def test_re_task(gen):
    model, cfg = _model(UniterForReferringExpressionComprehension)
    pb = _batch(gen, cfg, 3, img_lens=[4, 2, 5])
    pb.targets = torch.tensor([3, 0, 4])
    task = build_task("re", model=model)
    scores = model(pb, compute_loss=False)
    torch.testing.assert_close(task(pb)["loss"], F.cross_entropy(scores, pb.targets), **TOL)
    boxes = torch.rand(11, 2, generator=gen) * 10
    boxes = torch.cat([boxes, boxes + 5], 1)
    pred = scores.argmax(1)
    gt = boxes[torch.tensor([0, 4, 6]) + pred]  # the predicted regions' own boxes: all correct
    pb.boxes, pb.gt_boxes, pb.image_sizes = boxes, gt, torch.full((3, 2), 16.0)
    assert bool((task.evaluate(pb)["accuracy"] == 1).all())
    pb.gt_boxes = gt + 100
    with pytest.raises(ValueError, match="outside its image"):
        task.evaluate(pb)
    pb.targets = torch.tensor([3, 2, 4])
    with pytest.raises(ValueError, match="example 1 targets region 2 but has 2 regions"):
        task(pb)


def test_vcr_task_and_choice_count(gen):
    model, cfg = _model(UniterForVisualCommonsenseReasoning)
    model.init_type_embedding()
    pb = _batch(gen, cfg, 8)
    targets = torch.tensor([0, 0, 1, 0, 1, 0, 0, 0])
    pb.targets, pb.num_choices = targets, [4, 4]
    task = build_task("vcr", model=model)
    scores2 = model(pb, compute_loss=False)
    out = task(pb)
    assert out["loss"].dim() == 0 and out["count"] == 8
    acc = task.evaluate(pb)["accuracy"]
    torch.testing.assert_close(acc, (scores2.reshape(2, 4).argmax(1) == torch.tensor([2, 0])).float())
    pb.num_choices = [3, 5]
    with pytest.raises(ValueError, match=r"question\(s\) \[0, 1\] have \[3, 5\] choices; VCR needs exactly 4"):
        task(pb)
    pb = PackedVLBatch(input_ids=pb.input_ids[:sum(pb.txt_lens[:6])], txt_lens=pb.txt_lens[:6],
                       img_feat=pb.img_feat[:sum(pb.img_lens[:6])], img_pos=pb.img_pos[:sum(pb.img_lens[:6])],
                       img_lens=pb.img_lens[:6], targets=targets[:6])
    with pytest.raises(ValueError, match="not a multiple of 4"):
        task(pb)
