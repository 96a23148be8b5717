"""AdversarialTask (the VILLA step as a task module) against the plain VILLA loop (fastvl.adversarial.reference,
written from REFERENCE.md) on a tiny UNITER, fp32, dropout off: the same delta trajectory and the same parameter
gradients for every mode and norm, with and without the projection, on MLM, ITM (+ WRA) and MRFR (ITM and MRFR:
part of the norm settings in the fast set, the rest marked slow); the trainer contract (gradient scale,
accumulation), AMP loss scaling, a run in the Trainer."""

from __future__ import annotations

import pytest
import torch

from fastvl.adversarial import AdvConfig, AdversarialTask
from fastvl.adversarial.reference import plain_villa_step
from fastvl.models.uniter.testing import model_pair, random_pretrain_batch
from fastvl.ops.adv_perturb import adv_perturb_init
from fastvl.tasks import build_task

OT_LAMBDA = 0.1


# ----------------------------------------------------------------------------------------------------------

def _setup(task, seed, gen, batch=4):
    cfg_m, model, _ = model_pair(seed=seed)
    b = random_pretrain_batch(task, gen, cfg_m, batch=batch)
    if task == "itm":
        b.itm_targets[:2] = torch.tensor([0, 1])
    kw = {"ot_lambda": OT_LAMBDA} if task == "itm" else {}
    return model, b, build_task(task, model=model, **kw)


def _grads(model):
    return {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for n, p in model.named_parameters()}


def _fastvl(adv, batch):
    traj = []

    def rec(k, pert):
        t = pert.text.tensor.detach().clone() if pert.text is not None else None
        i = pert.image.tensor.detach().clone() if pert.image is not None else None
        traj.append((t, i))

    adv.on_step = rec
    out = adv(batch)
    return traj, out


def _check(model, want_traj, got_traj, want_grads, rtol=2e-4):
    assert len(got_traj) == len(want_traj)
    for k, (w, g) in enumerate(zip(want_traj, got_traj, strict=True)):
        for name, wt, gt in (("text", w[0], g[0]), ("image", w[1], g[1])):
            if gt is None:
                assert wt.abs().max() == 0, f"step {k}: the plain loop moved the {name} delta"
                continue
            torch.testing.assert_close(gt, wt, rtol=rtol, atol=1e-6, msg=lambda m, k=k, n=name: f"step {k} {n}: {m}")
    got = _grads(model)
    top = max(float(g.abs().max()) for g in want_grads.values())
    for n, w in want_grads.items():
        err = float((got[n] - w).abs().max())
        assert err <= rtol * max(float(w.abs().max()), 1e-2 * top), f"grad {n}: error {err:.3e}"


NORMS = [("l2", 0.0), ("l2", 0.05), ("linf", 0.0), ("linf", 0.004)]


FAST_NORMS = {"mlm": NORMS, "itm": [("l2", 0.05), ("linf", 0.0)], "mrfr": [("linf", 0.004)]}
CASES = [pytest.param(t, m, n, x, marks=() if (n, x) in FAST_NORMS[t] else pytest.mark.slow)
         for t in ("mlm", "itm", "mrfr") for m in ("text", "image", "both", "alter") for n, x in NORMS]


@pytest.mark.parametrize("task,mode,norm,max_norm", CASES)
def test_matches_plain_villa_loop(task, mode, norm, max_norm, seed, gen):
    model, batch, module = _setup(task, seed, gen)
    cfg = AdvConfig(mode=mode, norm=norm, adv_steps=3, adv_lr_txt=0.05, adv_lr_img=0.02, adv_max_norm=max_norm,
                    adv_kl_weight=1.5)
    want_traj, want_total = plain_villa_step(model, task, batch, cfg, OT_LAMBDA)
    want = _grads(model)
    model.zero_grad(set_to_none=True)
    got_traj, out = _fastvl(AdversarialTask(module, cfg), batch)
    out["loss"].backward()
    _check(model, want_traj, got_traj, want)
    torch.testing.assert_close(float(out["loss"].detach()), want_total, rtol=1e-4, atol=1e-6)
    moved = [t for pair in got_traj[1:] for t in pair if t is not None]
    assert moved and all(t.abs().sum() > 0 for t in moved), "the deltas must move"
    if max_norm > 0 and norm == "l2":
        for t in moved:
            assert t.norm() <= max_norm * batch.batch_size ** 0.5 + 1e-6


@pytest.mark.parametrize("task,mode,reuse", [("mlm", "both", True), ("itm", "alter", True), ("mrfr", "image", True),
                                             ("itm", "text", False)])
def test_stop_gradient_clean_target(task, mode, reuse, seed, gen):
    """kl_clean_grad=False (opt-in): same delta trajectory and parameter gradients as the plain loop with the clean
    predictions detached, and a different parameter gradient from the exact VILLA loop."""
    model, batch, module = _setup(task, seed, gen)
    cfg = AdvConfig(mode=mode, adv_steps=3, adv_lr_txt=0.05, adv_lr_img=0.02, adv_kl_weight=1.5, kl_clean_grad=False)
    want_traj, want_total = plain_villa_step(model, task, batch, cfg, OT_LAMBDA)
    want = _grads(model)
    model.zero_grad(set_to_none=True)
    got_traj, out = _fastvl(AdversarialTask(module, cfg, reuse_clean=reuse), batch)
    out["loss"].backward()
    _check(model, want_traj, got_traj, want)
    torch.testing.assert_close(float(out["loss"].detach()), want_total, rtol=1e-4, atol=1e-6)
    model.zero_grad(set_to_none=True)
    plain_villa_step(model, task, batch, AdvConfig(**{**cfg.to_dict(), "kl_clean_grad": True}), OT_LAMBDA)
    exact = _grads(model)
    assert any(float((exact[n] - want[n]).abs().max()) > 1e-6 for n in want), "the clean branch must matter"
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("task,mode", [("mlm", "both"), ("itm", "alter"), ("mrfr", "image")])
def test_separate_clean_pass_and_random_init(task, mode, seed, gen):
    """reuse_clean=False (upstream's separate clean pass), and the scaled random init (always separate)."""
    model, batch, module = _setup(task, seed, gen)
    for init in (0.0, 0.02):
        cfg = AdvConfig(mode=mode, adv_steps=3, adv_lr_txt=0.05, adv_lr_img=0.02, adv_init_mag=init)
        txt0 = img0 = None
        if init:
            g = torch.Generator().manual_seed(seed)
            H = model.uniter.config.hidden_size
            if "text" in cfg.modalities:
                txt0 = adv_perturb_init((batch.input_ids.shape[0], H), batch.cu_seqlens("txt"), init, "uniform",
                                        "l2", g, max_seqlen=max(batch.txt_lens))
            if "image" in cfg.modalities:
                img0 = adv_perturb_init(tuple(batch.img_feat.shape), batch.cu_seqlens("img"), init, "uniform", "l2",
                                        g, max_seqlen=max(batch.img_lens))
        model.zero_grad(set_to_none=True)
        want_traj, _ = plain_villa_step(model, task, batch, cfg, OT_LAMBDA, txt0, img0)
        want = _grads(model)
        model.zero_grad(set_to_none=True)
        adv = AdversarialTask(module, cfg, reuse_clean=False, generator=torch.Generator().manual_seed(seed))
        got_traj, out = _fastvl(adv, batch)
        out["loss"].backward()
        _check(model, want_traj, got_traj, want)


def test_trainer_contract_scale_and_accumulation(seed, gen):
    """(loss * m).backward() on top of earlier micro-batches' gradients adds m x the plain loop's gradients."""
    model, batch, module = _setup("mlm", seed, gen)
    cfg = AdvConfig(mode="alter", adv_steps=3, adv_lr_txt=0.05, adv_lr_img=0.02)
    plain_villa_step(model, "mlm", batch, cfg)
    want = _grads(model)
    earlier = {n: torch.randn(p.shape, generator=gen) for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.grad = earlier[n].clone()
    out = AdversarialTask(module, cfg)(batch)
    assert set(out) == {"loss", "logs", "count"} and int(out["count"]) == batch.n_txt_masked
    (out["loss"] * 0.37).backward()
    got = _grads(model)
    for n in want:
        torch.testing.assert_close(got[n], earlier[n] + 0.37 * want[n], rtol=2e-4, atol=2e-6)
    assert all(not v.requires_grad for v in out["logs"].values())


def test_one_step_is_the_clean_task_and_eval_is_plain(seed, gen):
    model, batch, module = _setup("itm", seed, gen)
    module(batch)["loss"].backward()
    want = _grads(model)
    model.zero_grad(set_to_none=True)
    adv = AdversarialTask(module, AdvConfig(mode="both", adv_steps=1))
    out = adv(batch)
    out["loss"].backward()
    got = _grads(model)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-7)
    adv.eval()
    with torch.no_grad():
        plain = adv(batch)
    torch.testing.assert_close(plain["loss"], out["loss"].detach(), rtol=1e-5, atol=1e-7)


def test_grad_scaler_unscales_and_skips_overflow(seed, gen):
    model, batch, module = _setup("mlm", seed, gen)
    cfg = AdvConfig(mode="both", adv_steps=3, adv_lr_txt=0.05, adv_lr_img=0.02)
    want_traj, _ = plain_villa_step(model, "mlm", batch, cfg)
    want = _grads(model)
    model.zero_grad(set_to_none=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    got_traj, out = _fastvl(AdversarialTask(module, cfg, grad_scaler=scaler), batch)
    scaler.scale(out["loss"]).backward()
    for p in model.parameters():
        if p.grad is not None:
            p.grad.div_(1024.0)
    _check(model, want_traj, got_traj, want)
    # an overflowing scale: delta gradients are inf -> no delta update (upstream skips the step)
    model.zero_grad(set_to_none=True)
    huge = torch.amp.GradScaler("cpu", init_scale=float("inf"))
    traj, out = _fastvl(AdversarialTask(module, cfg, grad_scaler=huge), batch)
    for t, i in traj:
        assert t.abs().sum() == 0 and i.abs().sum() == 0


def test_runs_in_the_trainer_with_accumulation(tmp_path, seed, gen):
    from fastvl.train.loop import TrainConfig, Trainer

    model, batch, module = _setup("mlm", seed, gen)

    class Source:
        def next_batch(self):
            return batch

        def state_dict(self):
            return {}

        def load_state_dict(self, s):
            pass

    adv = AdversarialTask(module, AdvConfig(mode="both", adv_steps=2, adv_lr_txt=0.05, adv_lr_img=0.02))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    tr = Trainer(model, {"mlm": adv}, {"mlm": Source()}, {"mlm": 1.0},
                 TrainConfig(steps=2, grad_accum=2, warmup_steps=0, lr=1e-3, progress=False), tmp_path)
    rec = tr.train_step()
    assert torch.isfinite(torch.tensor(rec["loss"])) and rec["grad_norm"] > 0
    assert "mlm/adv_kl" in rec and "mlm/mlm_loss" in rec
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())


def test_vqa_finetuning_view(seed, gen):
    """VQA: with K = 1 the step is the clean task (the view's loss = the fused head's official reduction); K = 3
    moves the deltas and logs the consistency term."""
    from fastvl.models.uniter.finetune import UniterForVisualQuestionAnswering
    from fastvl.models.uniter.testing import tiny_config

    cfg = tiny_config(initializer_range=0.3)
    torch.manual_seed(seed)
    model = UniterForVisualQuestionAnswering(cfg, cfg.img_dim, num_answer=11)
    batch = random_pretrain_batch("none", gen, cfg, batch=4)
    batch.targets = torch.rand(4, 11, generator=gen) * (torch.rand(4, 11, generator=gen) < 0.3)
    task = build_task("vqa", model=model)
    task(batch)["loss"].backward()
    want = _grads(model)
    model.zero_grad(set_to_none=True)
    AdversarialTask(task, AdvConfig(mode="both", adv_steps=1))(batch)["loss"].backward()
    got = _grads(model)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-6)
    traj, out = _fastvl(AdversarialTask(task, AdvConfig(mode="both", adv_steps=3, adv_lr_txt=0.05)), batch)
    assert traj[2][0].abs().sum() > 0 and float(out["logs"]["adv_kl"]) > 0


def test_bad_arguments(seed, gen):
    model, batch, module = _setup("mlm", seed, gen)
    with pytest.raises(TypeError, match="'config' must be an AdvConfig"):
        AdversarialTask(module, {"mode": "text"})
    with pytest.raises(TypeError, match="has no adversarial interface"):
        AdversarialTask(torch.nn.Linear(2, 2), AdvConfig())
