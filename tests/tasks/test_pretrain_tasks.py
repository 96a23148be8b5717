"""Pre-training task modules: official reductions and WRA weighting, checked against the padded reference."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from fastvl.models.uniter.testing import assert_same_grads, model_pair, random_pretrain_batch, to_official_batch
from fastvl.tasks import build_task, list_tasks
from fastvl.tasks.pretrain import ITMTask, pretrain_tasks


def _reference_total(ref, ob, task, ot_lambda=0.1):
    """The official training loop's reduction of the reference model's outputs."""
    out = ref(ob, task)
    if task != "itm":
        return out.mean()
    itm, (pos, neg) = out
    ot = (pos.sum() - neg.sum()) / (pos.numel() + neg.numel())
    return itm.mean() + ot_lambda * ot


@pytest.mark.parametrize("task", ["mlm", "mrfr", "mrc", "mrc-kl", "itm"])
def test_task_loss_and_grads_are_official(task, gen, seed):
    cfg, fast, ref = model_pair(seed=seed)
    pb = random_pretrain_batch(task, gen, cfg, batch=6)
    if task == "itm":
        pb.itm_targets[:2] = torch.tensor([0, 1])
    module = build_task(task, model=fast)
    out = module(pb)
    assert set(out) == {"loss", "logs", "count"} and out["loss"].dim() == 0
    n_masked = pb.n_txt_masked if task == "mlm" else (0 if task == "itm" else pb.feat_targets.shape[0])
    width = {"mrfr": cfg.img_dim, "mrc-kl": cfg.img_label_dim}.get(task, 1)
    assert int(out["count"]) == (pb.batch_size if task == "itm" else n_masked * width)
    want = _reference_total(ref, to_official_batch(pb, task), task)
    torch.testing.assert_close(out["loss"], want, rtol=1e-4, atol=1e-6)
    for v in out["logs"].values():
        assert not v.requires_grad
    out["loss"].backward()
    want.backward()
    assert_same_grads(fast, ref)


def test_itm_logs_and_weighting(gen, seed):
    cfg, fast, ref = model_pair(seed=seed)
    pb = random_pretrain_batch("itm", gen, cfg, batch=5)
    pb.itm_targets = torch.tensor([1, 0, 1, 1, 0])
    out = ITMTask(fast, ot_lambda=0.1)(pb)
    _, (pos, neg) = ref(to_official_batch(pb, "itm"), "itm")
    logs = out["logs"]
    torch.testing.assert_close(logs["ot_pos"], pos.mean().detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logs["ot_neg"], neg.mean().detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["loss"].detach(), logs["itm_loss"] + 0.1 * logs["ot_loss"])
    plain = ITMTask(fast, ot_lambda=0.0)(pb)
    assert set(plain["logs"]) == {"itm_loss"}
    torch.testing.assert_close(plain["loss"], logs["itm_loss"])
    all_pos = replace(pb, itm_targets=torch.ones(5, dtype=torch.long))
    assert torch.isnan(ITMTask(fast)(all_pos)["logs"]["ot_neg"])  # no negative pair: mean of nothing


def test_registry_and_errors(gen):
    cfg, fast, _ = model_pair()
    assert {"mlm", "mrfr", "mrc", "mrc-kl", "mrckl", "itm"} <= set(list_tasks())
    tasks = pretrain_tasks(fast)
    assert set(tasks) == {"mlm", "mrfr", "mrc", "mrc-kl", "itm"}
    router = torch.nn.ModuleDict(tasks)  # a trainer wraps all tasks; they share one set of parameters
    assert {id(p) for p in router.parameters()} == {id(p) for p in fast.parameters()}
    with pytest.raises(ValueError, match="unknown task 'no-such-task'"):
        build_task("no-such-task", model=fast)
    with pytest.raises(ValueError, match="'ot_lambda' must be >= 0"):
        ITMTask(fast, ot_lambda=-1)
    with pytest.raises(TypeError, match="must be a PackedVLBatch"):
        build_task("mlm", model=fast)(to_official_batch(random_pretrain_batch("mlm", gen, cfg, batch=2), "mlm"))


def test_check_finite_option(gen):
    cfg, fast, _ = model_pair()
    pb = random_pretrain_batch("mrc-kl", gen, cfg, batch=3, img_range=(4, 10))
    row = int((~pb.img_masks).nonzero()[0])  # an unmasked region (masked ones are zeroed by the model)
    pb.img_feat[row, 0] = float("nan")
    assert torch.isnan(build_task("mrc-kl", model=fast)(pb)["loss"])  # off: NaN propagates (no device read)
    with pytest.raises(ValueError, match="'img_feat' has 1 non-finite"):
        build_task("mrc-kl", model=fast, check_finite=True)(pb)
