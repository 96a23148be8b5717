"""HERO pre-training task modules: each task's training loss against the hand-written official reduction of the
model's outputs on official-format batches, the validation sums, and the VILLA view."""

import pytest
import torch
from test_hero_batches import MAX_FRM, VDIM, fom_batch, mfm_batch, mlm_batch, tiny_config, vcmr_batch

from fastvl.adversarial import AdvConfig, AdversarialTask
from fastvl.models.hero import HeroForPretraining
from fastvl.tasks.hero import HeroPretrainTask, hero_pretrain_tasks, summarize_validation

BUILDERS = {"mlm": mlm_batch, "mfm-nce": mfm_batch, "mffr": mfm_batch, "fom": fom_batch}


def _model(**kw) -> HeroForPretraining:
    return HeroForPretraining(tiny_config(), VDIM, MAX_FRM, **kw).double()


def _double(batch: dict) -> dict:
    return {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in batch.items()}


def _hand_ce(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """mean_i -log softmax(scores_i)[labels_i], written out."""
    logp = scores - scores.exp().sum(1, keepdim=True).log()
    return -torch.stack([logp[i, labels[i]] for i in range(len(labels))]).mean()


@pytest.mark.parametrize("rep", range(2))
@pytest.mark.parametrize("task", ["mlm", "mfm-nce", "mffr", "fom"])
def test_loss_is_official_reduction(seed, task, rep):
    g = torch.Generator().manual_seed(seed + rep)
    model = _model().eval()  # no dropout: the two passes below see the same network
    batch = _double(BUILDERS[task](g))
    out = HeroPretrainTask(model, task)(batch)
    if task == "mlm":
        scores = model(batch, "mlm", compute_loss=False)
        want, n = _hand_ce(scores, batch["txt_labels"]), batch["txt_labels"].numel()
    elif task == "mffr":
        pred, tgt = model(batch, "mffr", compute_loss=False), batch["feat_targets"]
        want = torch.stack([((p - t) ** 2).sum().sqrt() for p, t in zip(pred, tgt)]).mean()
        n = tgt.shape[0]
    elif task == "mfm-nce":
        pred, neg = model(batch, "mfm-nce", compute_loss=False)
        logits = torch.cat([pred @ batch["feat_targets"].t(), pred @ neg.t()], 1)
        want, n = _hand_ce(logits, torch.arange(pred.shape[0])), pred.shape[0]
        # negatives: every unmasked slot of the padded [B, max_frames] grid, padding included
        assert neg.shape[0] == batch["c_v_masks"].numel() - int(batch["c_v_masks"].sum())
    else:
        logits = model(batch, "fom", compute_loss=False)
        tgt = batch["targets"].reshape(-1)
        keep = tgt != -1
        want, n = _hand_ce(logits[keep], tgt[keep]), int(keep.sum())
    torch.testing.assert_close(out["loss"].double(), want.double(), rtol=1e-6, atol=1e-8)
    assert int(out["count"]) == n
    assert out["logs"][f"{task}_loss"] == pytest.approx(float(want.detach()), rel=1e-6)


def test_vsm_loss_is_sum_of_weighted_parts(seed):
    g = torch.Generator().manual_seed(seed)
    # train mode (means, as the trainer calls it); the tiny config has no dropout
    model = _model(lw_st_ed=0.5, lw_neg_ctx=0.0, lw_neg_q=0.0, drop_svmr_prob=0.0).train()
    batch = _double(vcmr_batch(g))
    task = HeroPretrainTask(model, "vsm")
    out = task(batch)
    _, st, ed = model(batch, "vsm", compute_loss=False)  # [Q, V, L]: every query against every video
    rows, own = torch.arange(st.shape[0]), batch["q_vidx"]
    tgt = batch["targets"]
    want = 0.5 * (_hand_ce(st[rows, own], tgt[:, 0]) + _hand_ce(ed[rows, own], tgt[:, 1]))
    torch.testing.assert_close(out["loss"].double(), want, rtol=1e-6, atol=1e-8)
    assert out["count"] == batch["query_input_ids"].shape[0]
    assert out["logs"]["vsm_st_ed"] == pytest.approx(float(want.detach()) / 0.5, rel=1e-6)  # logged unweighted
    model.lw_neg_ctx = model.lw_neg_q = 1.0
    parts = model(batch, "vsm", compute_loss=True)
    torch.manual_seed(0)
    total = task(batch)["loss"]
    torch.testing.assert_close(total, sum(p.mean() for p in parts), rtol=1e-6, atol=1e-8)


def test_validation_sums(seed):
    g = torch.Generator().manual_seed(seed)
    model = _model(lw_neg_ctx=1.0, lw_neg_q=1.0).eval()
    tasks = hero_pretrain_tasks(model, ["mlm", "fom", "vsm", "mfm-nce"])
    mlm, fom, vsm, nce = _double(mlm_batch(g)), _double(fom_batch(g)), _double(vcmr_batch(g)), _double(mfm_batch(g))
    totals = {"mlm": tasks["mlm"].evaluate(mlm), "fom": tasks["fom"].evaluate(fom), "vsm": tasks["vsm"].evaluate(vsm),
              "mfm-nce": tasks["mfm-nce"].evaluate(nce)}
    scores = model(mlm, "mlm", compute_loss=False)
    assert totals["mlm"]["correct"] == float((scores.argmax(1) == mlm["txt_labels"]).sum())
    q2v, st, ed = model(vsm, "vsm", compute_loss=False)
    own = vsm["q_vidx"]
    assert totals["vsm"]["r1"] == float((q2v.argmax(1) == own).sum())
    rows = torch.arange(own.shape[0])
    assert totals["vsm"]["st_correct"] == float((st[rows, own].argmax(-1) == vsm["targets"][:, 0]).sum())
    out = summarize_validation(totals)
    assert set(out) >= {"mlm_acc", "mlm_loss", "fom_acc", "vsm_r1", "vsm_st_acc", "vsm_ed_acc", "mfm-nce_acc"}
    assert out["mlm_acc"] == totals["mlm"]["correct"] / mlm["txt_labels"].numel()
    assert 0.0 <= out["vsm_r1"] <= 1.0


@pytest.mark.parametrize("task", ["mlm", "mfm-nce", "fom", "mffr"])
def test_villa_view(seed, task):
    g = torch.Generator().manual_seed(seed)
    model = _model().float().eval()
    batch = BUILDERS[task](g)
    plain = HeroPretrainTask(model, task)
    view = plain.adversarial_view()
    ctx = view.context(batch)
    clean = view.forward(ctx, None, None)
    torch.testing.assert_close(clean.loss, plain(batch)["loss"].float(), rtol=1e-5, atol=1e-6)
    txt = torch.zeros(ctx.batch.input_ids.shape[0], 16)
    img = torch.zeros_like(ctx.batch.img_feat)
    torch.testing.assert_close(view.forward(ctx, txt, img).pred, clean.pred)  # zero perturbation = clean
    moved_t = view.forward(ctx, torch.randn_like(txt), None).pred
    moved_i = view.forward(ctx, None, torch.randn_like(img)).pred
    assert not torch.allclose(moved_t, clean.pred) and not torch.allclose(moved_i, clean.pred)
    # the VILLA loop trains the task: loss finite, gradients reach the model
    model.train()
    adv = AdversarialTask(plain, AdvConfig(adv_steps=2, mode="both"))
    out = adv(batch)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and out["count"] == plain.count(batch)
    assert model.v_encoder.f_encoder.embeddings.word_embeddings.weight.grad is not None
    # no hook is left behind
    assert not model.v_encoder.f_encoder.embeddings.word_embeddings._forward_hooks


def test_frame_perturbation_reaches_frame_transform(seed):
    """An unmatched frame (no subtitle) is never perturbed; a matched frame's perturbation reaches both its
    segment embedding and its frame_transform input."""
    g = torch.Generator().manual_seed(seed)
    model = _model().float().eval()
    batch = mfm_batch(g)
    view = HeroPretrainTask(model, "mfm-nce").adversarial_view()
    ctx = view.context(batch)
    seen = {}
    h = model.v_encoder.frame_transform.register_forward_hook(lambda m, a, out: seen.__setitem__("x", out.clone()))
    view.forward(ctx, None, None)
    base = seen["x"]
    delta = torch.zeros_like(ctx.batch.img_feat)
    delta[0] = 1.0  # first frame of the first segment = video 0, frame 0
    view.forward(ctx, None, delta)
    h.remove()
    diff = (seen["x"] - base).abs().sum(-1)
    assert diff[0, 0] > 0 and diff.sum() == diff[0, 0]


def test_errors():
    model = _model()
    with pytest.raises(ValueError, match="'task' must be one of"):
        HeroPretrainTask(model, "itm")
    with pytest.raises(TypeError, match="official collate dict"):
        HeroPretrainTask(model, "mlm")([1, 2])
    with pytest.raises(TypeError, match="no adversarial view"):
        HeroPretrainTask(model, "vsm").adversarial_view()
