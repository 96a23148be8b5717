"""UniterForPretraining: every task's outputs and gradients vs the padded reference, on both APIs; bad input."""

from __future__ import annotations

import pytest
import torch

from fastvl.models.uniter import UniterForPretraining
from fastvl.models.uniter.testing import (
    assert_autocast_rule,
    assert_nested_close,
    assert_same_grads,
    model_pair,
    random_pretrain_batch,
    tiny_config,
    to_official_batch,
    weighted_sum,
)

TASKS = ["mlm", "mrfr", "mrc", "mrc-kl", "itm"]


def _split_ot(out, targets):
    """Packed-API itm output (loss, dist [B]) -> the official (loss, (pos, neg))."""
    loss, dist = out
    return loss, (dist[targets == 1], dist[targets == 0])


def _check_task(task, api, compute_loss, gen, seed):
    cfg, fast, ref = model_pair(seed=seed)
    pb = random_pretrain_batch(task, gen, cfg, batch=6)
    if task == "itm":  # both labels present whatever the draw
        pb.itm_targets[:2] = torch.tensor([0, 1])
    ob = to_official_batch(pb, task)
    want = ref(ob, task, compute_loss=compute_loss)
    got = fast(ob, task, compute_loss=compute_loss) if api == "official" else \
        fast(pb, task, compute_loss=compute_loss)
    if task == "itm" and api == "packed":
        got = _split_ot(got, pb.itm_targets)
    assert_nested_close(got, want, name=f"{task}/{api}")
    w = int(torch.randint(2**31, (1,), generator=gen))
    weighted_sum(got, torch.Generator().manual_seed(w)).backward()
    weighted_sum(want, torch.Generator().manual_seed(w)).backward()
    assert_same_grads(fast, ref)


@pytest.mark.parametrize("api", ["official", "packed"])
@pytest.mark.parametrize("task", TASKS)
def test_task_loss_and_grads_match_reference(task, api, gen, seed):
    _check_task(task, api, True, gen, seed)


@pytest.mark.parametrize("task", TASKS)
def test_task_predictions_match_reference(task, gen, seed):
    _check_task(task, "official", False, gen, seed)


def test_extreme_lengths(gen, seed):
    """A batch of one example with a 1-token text and 1 region, and a batch mixing it with long ones."""
    cfg, fast, ref = model_pair(seed=seed)
    for txt_lens, img_lens in (([1], [1]), ([1, 30, 2], [1, 1, 40])):
        for task in ("mlm", "mrfr", "itm"):
            pb = random_pretrain_batch(task, gen, cfg, txt_lens=txt_lens, img_lens=img_lens)
            ob = to_official_batch(pb, task)
            got, want = fast(pb, task), ref(ob, task)
            if task == "itm":
                got = _split_ot(got, pb.itm_targets)
            assert_nested_close(got, want, name=f"{task} {txt_lens}/{img_lens}")


def test_mean_reduction_is_official(gen, seed):
    cfg, fast, ref = model_pair(seed=seed)
    for task in ("mlm", "mrfr", "mrc", "mrc-kl"):
        pb = random_pretrain_batch(task, gen, cfg, batch=4)
        mean = fast(pb, task, reduction="mean")
        assert mean.dim() == 0
        torch.testing.assert_close(mean, ref(to_official_batch(pb, task), task).mean(), rtol=1e-5, atol=1e-6)


def test_packed_mlm_without_count_and_modality_masks(gen, seed):
    """n_txt_masked unknown -> read from the device; MLM/ITM ignore img_masks (only MRM masks regions)."""
    cfg, fast, _ = model_pair(seed=seed)
    pb = random_pretrain_batch("mlm", gen, cfg, batch=4)
    want = fast(pb, "mlm")
    pb.n_txt_masked = None
    torch.testing.assert_close(fast(pb, "mlm"), want, rtol=0, atol=0)
    pb.img_masks = torch.ones(pb.img_feat.shape[0], dtype=torch.bool)
    torch.testing.assert_close(fast(pb, "mlm"), want, rtol=0, atol=0)
    pb.n_txt_masked = 1000
    with pytest.raises(ValueError, match="n_txt_masked is 1000"):
        fast(pb, "mlm", check_finite=True)


# ----------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture
def tiny_model():
    cfg = tiny_config()
    return cfg, UniterForPretraining(cfg, cfg.img_dim, cfg.img_label_dim)


def test_unknown_task(tiny_model, gen):
    cfg, model = tiny_model
    pb = random_pretrain_batch("mlm", gen, cfg, batch=2)
    for batch in (pb, to_official_batch(pb, "mlm")):
        with pytest.raises(ValueError, match="unknown task 'vqa'"):
            model(batch, "vqa")
    assert model(to_official_batch(pb, "mlm"), "mlm").shape[0] == pb.n_txt_masked


@pytest.mark.parametrize("task,key", [("mlm", "txt_labels"), ("mrfr", "feat_targets"), ("mrfr", "img_mask_tgt"),
                                      ("mrc-kl", "label_targets"), ("itm", "targets"), ("itm", "attn_masks")])
def test_missing_batch_key(tiny_model, gen, task, key):
    cfg, model = tiny_model
    ob = to_official_batch(random_pretrain_batch(task, gen, cfg, batch=3), task)
    del ob[key]
    with pytest.raises(KeyError, match=f"missing key '{key}'"):
        model(ob, task)


def test_missing_ot_key_and_packed_fields(tiny_model, gen):
    cfg, model = tiny_model
    pb = random_pretrain_batch("itm", gen, cfg, batch=3)
    ob = to_official_batch(pb, "itm")
    del ob["ot_inputs"]["txt_pad"]
    with pytest.raises(KeyError, match=r"\['ot_inputs'\] is missing key 'txt_pad'"):
        model(ob, "itm")
    pb.itm_targets = None
    with pytest.raises(ValueError, match="field 'itm_targets' is None"):
        model(pb, "itm")
    pb = random_pretrain_batch("mrfr", gen, cfg, batch=3)
    pb.feat_targets = None
    with pytest.raises(ValueError, match="field 'feat_targets' is None"):
        model(pb, "mrfr")


def test_mismatched_sizes_are_named(tiny_model, gen):
    cfg, model = tiny_model
    pb = random_pretrain_batch("itm", gen, cfg, batch=3)
    pb.itm_targets = torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"'itm_targets' must have shape \[3\]"):
        model(pb, "itm")
    pb = random_pretrain_batch("mrfr", gen, cfg, batch=3)
    ob = to_official_batch(pb, "mrfr")
    ob["feat_targets"] = ob["feat_targets"][1:]
    with pytest.raises(ValueError, match="'feat_targets' has .* rows but .* regions are masked"):
        model(ob, "mrfr")
    ob = to_official_batch(pb, "mrfr")
    ob["label_targets"] = torch.zeros(ob["feat_targets"].shape[0], 5)
    with pytest.raises(ValueError, match=r"'label_targets' must have shape \[n_masked, 13\]"):
        model(ob, "mrc")
    ob = to_official_batch(pb, "mrfr")
    ob["input_ids"] = ob["input_ids"][:2]
    with pytest.raises(ValueError, match="'input_ids' has batch size 2"):
        model(ob, "mrfr")
    pb.soft_labels = torch.zeros(pb.feat_targets.shape[0] + 1, cfg.img_label_dim)
    with pytest.raises(ValueError, match="img_masks marks .* regions but 'soft_labels' has"):
        model(pb, "mrc", check_finite=True)


def test_nan_targets_and_features_reported(tiny_model, gen):
    cfg, model = tiny_model
    pb = random_pretrain_batch("mrfr", gen, cfg, batch=3)
    pb.feat_targets[0, 0] = float("nan")
    with pytest.raises(ValueError, match="'feat_targets' has 1 non-finite"):
        model(pb, "mrfr", check_finite=True)
    ob = to_official_batch(random_pretrain_batch("itm", gen, cfg, batch=3), "itm")
    ob["img_pos_feat"][1, 0, 3] = float("inf")
    with pytest.raises(ValueError, match="'img_pos_feat' has 1 non-finite"):
        model(ob, "itm", check_finite=True)


@pytest.mark.cuda
def test_bf16_autocast_on_gpu(seed):
    """bf16 autocast on GPU: every task's predictions follow the tolerance rule against the reference in float64,
    autocast is honoured, and forward + backward run."""
    gen = torch.Generator().manual_seed(seed)
    cfg, fast, ref = model_pair(seed=seed)
    fast, ref = fast.cuda(), ref.cuda()
    for task in TASKS:
        pb = random_pretrain_batch(task, gen, cfg, batch=6)
        if task == "itm":
            pb.itm_targets[:2] = torch.tensor([0, 1])
        ob = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in to_official_batch(pb, task).items()}
        if "ot_inputs" in ob:
            ob["ot_inputs"] = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in ob["ot_inputs"].items()}
        assert_autocast_rule(fast, ref, ob, task, "cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            got = fast(pb.to("cuda"), task, reduction="mean")
        (got[0] if task == "itm" else got).backward()
