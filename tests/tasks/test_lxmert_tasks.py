"""LXMERT tasks on packed batches: the packed encoder equals the padded drop-in forward, each task's loss equals the
port's reduction written out on padded tensors, VILLA's view and the generic adversarial loop, bad batches."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastvl.adversarial import AdvConfig, AdversarialTask
from fastvl.batch import PackedVLBatch
from fastvl.models.lxmert import LxmertConfig, LxmertForPreTraining
from fastvl.tasks.lxmert import LxmertPretrainTask, lxmert_tasks

CFG = dict(vocab_size=41, hidden_size=16, num_attention_heads=2, intermediate_size=24, l_layers=1, x_layers=1,
           r_layers=1, num_qa_labels=6, num_object_labels=9, visual_feat_dim=11, max_position_embeddings=24,
           visual_attr_loss=False)


def model() -> LxmertForPreTraining:
    return LxmertForPreTraining(LxmertConfig(**CFG)).eval()


def batch(gen, txt_lens=(5, 1, 9), img_lens=(4, 7, 1)) -> PackedVLBatch:
    nt, ni = sum(txt_lens), sum(img_lens)
    ids = torch.randint(1, CFG["vocab_size"], (nt,), generator=gen)
    labels = torch.where(torch.rand(nt, generator=gen) < 0.4, ids, torch.full_like(ids, -1))
    labels[0] = ids[0]
    masks = torch.rand(ni, generator=gen) < 0.4
    masks[0] = True
    feat = torch.randn(ni, CFG["visual_feat_dim"], generator=gen)
    soft = torch.softmax(torch.randn(int(masks.sum()), CFG["num_object_labels"], generator=gen) * 3, -1)
    pos = torch.rand(ni, 7, generator=gen)
    return PackedVLBatch(input_ids=ids, txt_lens=list(txt_lens), img_feat=feat, img_pos=pos,
                         img_lens=list(img_lens), txt_labels=labels, img_masks=masks, feat_targets=feat[masks].clone(),
                         soft_labels=soft, itm_targets=torch.randint(0, 2, (len(txt_lens),), generator=gen),
                         targets=torch.rand(len(txt_lens), CFG["num_qa_labels"], generator=gen))


def padded(b: PackedVLBatch, zero_masked: bool = True):
    """The batch as the port's padded arguments, written out by hand."""
    n, lt, li = b.batch_size, b.max_txt, b.max_img
    ids = torch.zeros(n, lt, dtype=torch.long)
    am = torch.zeros(n, lt, dtype=torch.long)
    feats = torch.zeros(n, li, b.img_feat.shape[1])
    pos = torch.zeros(n, li, 4)
    vm = torch.zeros(n, li)
    t = i = 0
    img_feat = b.img_feat.masked_fill(b.img_masks[:, None], 0.0) if zero_masked else b.img_feat
    for k in range(n):
        a, c = b.txt_lens[k], b.img_lens[k]
        ids[k, :a], am[k, :a] = b.input_ids[t:t + a], 1
        feats[k, :c], pos[k, :c], vm[k, :c] = img_feat[i:i + c], b.img_pos[i:i + c, :4], 1
        t, i = t + a, i + c
    return dict(input_ids=ids, visual_feats=feats, visual_pos=pos, attention_mask=am, visual_attention_mask=vm)


def packed_rows(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return x[mask.bool()]


def test_packed_encoder_equals_padded_forward(gen):
    m = model()
    b = batch(gen)
    p = padded(b)
    out = m.forward_packed(b, output_attentions=True)
    ref = m.lxmert(**p, output_attentions=True)
    assert torch.allclose(out.language_output, packed_rows(ref.language_output, p["attention_mask"]), atol=1e-5)
    assert torch.allclose(out.vision_output, packed_rows(ref.vision_output, p["visual_attention_mask"]), atol=1e-5)
    assert torch.allclose(out.pooled_output, ref.pooled_output, atol=1e-5)
    a, r = out.cross_encoder_attentions[0], ref.cross_encoder_attentions[0]
    assert torch.allclose(a, r[:, :, :a.shape[2], :a.shape[3]], atol=1e-6)
    assert torch.allclose(a.sum(-1), (torch.arange(a.shape[2])[None] < torch.tensor(b.txt_lens)[:, None]).float()
                          [:, None].expand_as(a.sum(-1)), atol=1e-5)


def test_task_losses_follow_the_port_reductions(gen):
    m = model()
    b = batch(gen)
    p = padded(b)
    ref = m.lxmert(**p)
    am, vm = p["attention_mask"].bool(), p["visual_attention_mask"].bool()
    lang, vis, pooled = ref.language_output[am], ref.vision_output[vm], ref.pooled_output
    tasks = lxmert_tasks(m)
    # mlm: mean CE over the masked tokens (the port's labels = -100 elsewhere)
    sel = b.txt_labels != -1
    want = F.cross_entropy(m.cls.predictions(lang[sel]), b.txt_labels[sel])
    got = tasks["mlm"](b)
    assert torch.allclose(got["loss"], want, atol=1e-5) and int(got["count"]) == int(sel.sum())
    # mrfr: smooth-L1 mean over dims, summed over masked regions / all regions x normalizer (mask_conf = the mask)
    h = m.obj_predict_head.transform(vis[b.img_masks])
    per = F.smooth_l1_loss(m.obj_predict_head.decoder_dict["feat"](h), b.feat_targets, reduction="none").mean(1)
    want = per.sum() / b.n_img * m.config.visual_loss_normalizer
    assert torch.allclose(tasks["mrfr"](b)["loss"], want, atol=1e-5)
    # mrc: CE to the detector's top class weighted by its probability (LXMERT's obj mask_conf)
    conf, label = b.soft_labels.max(-1)
    ce = F.cross_entropy(m.obj_predict_head.decoder_dict["obj"](h), label, reduction="none")
    want = (ce * conf).sum() / b.n_img * m.config.visual_loss_normalizer
    assert torch.allclose(tasks["mrc"](b)["loss"], want, atol=1e-5)
    # itm and qa on the pooled [CLS]
    want = F.cross_entropy(m.cls.seq_relationship(pooled), b.itm_targets)
    assert torch.allclose(tasks["itm"](b)["loss"], want, atol=1e-5)
    want = F.cross_entropy(m.answer_head(pooled), b.targets.argmax(-1))
    assert torch.allclose(tasks["qa"](b)["loss"], want, atol=1e-5)


def test_with_no_padding_mrfr_equals_the_port_loss(gen):
    """Equal region counts: the packed denominator (regions) is the port's B x N; obj_labels as the port takes them."""
    m = model()
    b = batch(gen, img_lens=(3, 3, 3))
    p = padded(b)
    n, width = p["visual_feats"].shape[:2]
    target = torch.zeros(n * width, CFG["visual_feat_dim"])
    target[b.img_masks] = b.feat_targets
    obj = torch.zeros(n * width, dtype=torch.long)
    conf, label = b.soft_labels.max(-1)
    obj[b.img_masks] = label
    oconf = torch.zeros(n * width)
    oconf[b.img_masks] = conf
    out = m(**p, obj_labels={"obj": (obj.view(n, width), oconf.view(n, width)),
                             "feat": (target.view(n, width, -1), b.img_masks.float().view(n, width))})
    tasks = lxmert_tasks(m)
    assert torch.allclose(out.loss, tasks["mrfr"](b)["loss"] + tasks["mrc"](b)["loss"], atol=1e-5)


@pytest.mark.parametrize(("name", "mode"), [("mlm", "text"), ("mrfr", "image"), ("mrc", "both"), ("itm", "alter"),
                                            ("qa", "both")])
def test_villa_view_and_adversarial_loop(name, mode, gen):
    m = model()
    b = batch(gen)
    task = LxmertPretrainTask(m, name)
    view = task.adversarial_view()
    ctx = view.context(b)
    clean = view.forward(ctx, None, None)
    assert torch.allclose(clean.loss, task(b)["loss"], atol=1e-6)
    txt = torch.randn(b.n_txt, CFG["hidden_size"], generator=gen) * 0.1
    img = torch.randn(b.n_img, CFG["visual_feat_dim"], generator=gen) * 0.1
    pert = view.forward(ctx, txt, img)
    assert not torch.allclose(pert.pred, clean.pred)
    assert float(view.consistency(clean.pred, clean.pred).detach()) == pytest.approx(0.0, abs=1e-6)
    m.train()
    deltas = []
    adv = AdversarialTask(task, AdvConfig(mode=mode, adv_steps=2, adv_lr_txt=1e-2, adv_lr_img=1e-2))
    adv.on_step = lambda k, pert: deltas.append([None if d is None else d.tensor.detach().clone()
                                                 for d in (pert.text, pert.image)])
    out = adv(b)
    # the perturbed modalities: the image delta [T_img, visual_feat_dim] reaches LXMERT's raw features
    used = {m for d in deltas for m, t in zip(("text", "image"), d) if t is not None and t.abs().sum() > 0}
    assert used == {"text": {"text"}, "image": {"image"}}.get(mode, {"text", "image"})
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    grads = [p.grad for p in m.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_bad_batches_are_named(gen):
    m = model()
    b = batch(gen)
    b.itm_targets = None
    with pytest.raises(ValueError, match="batch.itm_targets"):
        LxmertPretrainTask(m, "itm")(b)
    b = batch(gen)
    b.soft_labels = b.soft_labels[:, :4]
    with pytest.raises(ValueError, match="soft_labels has 4 classes"):
        LxmertPretrainTask(m, "mrc")(b)
    with pytest.raises(ValueError, match="must be one of"):
        LxmertPretrainTask(m, "mrc-kl")
    b = batch(gen)
    b.img_feat = b.img_feat[:, :5]
    with pytest.raises(ValueError, match="visual_feat_dim"):
        LxmertPretrainTask(m, "itm")(b)
