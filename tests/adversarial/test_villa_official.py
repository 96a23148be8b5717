"""AdversarialTask against plain transcriptions of the official VILLA loops (zhegan27/VILLA), written out here:

- the VCR loop of ``train_vcr_adv.py`` (2-way scores [4n, 2], cross-entropy over rows, symmetric KL of each row's
  2-way softmax reduced by the element mean, deltas on the official padded layout), for text / image / both and
  l2 / linf, with and without the projection: the delta trajectory and the parameter gradients;
- with dropout on (0.1, as every official config), the default step is the official algorithm (a separate clean
  pass, step 0 with its own dropout masks): same RNG seeding, same gradients; with dropout off the clean pass is
  reused as step 0 (one forward fewer).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastvl.adversarial import AdvConfig, AdversarialTask
from fastvl.adversarial.reference import plain_villa_step
from fastvl.models.uniter import UniterForVisualCommonsenseReasoning
from fastvl.models.uniter.testing import model_pair, random_pretrain_batch, tiny_config
from fastvl.tasks import VCRTask, build_task

OFFICIAL_MODALITY = {"text": ["text"], "image": ["image"], "both": ["image", "text"]}


def _padded_mask(lens: list[int]) -> torch.Tensor:
    return torch.arange(max(lens))[None] < torch.tensor(lens)[:, None]


def official_vcr_adv_step(model, batch, modality: list[str], cfg: AdvConfig) -> list[tuple[torch.Tensor, ...]]:
    """One micro-batch of VILLA's ``train_vcr_adv.py`` loop, transcribed (fp32, no amp, one process).

    The model call stands in for the official ``model(batch, adv_training=True, adv_delta_txt=..,
    adv_delta_img=.., compute_loss=False)``: the text delta is added to the word embeddings and the image delta to
    the raw features, and it returns the 2-way scores [4n, 2]. The deltas live in the official padded layout
    ([B, L_txt, H] and [B, L_img, D], zeros at padding); the model reads their real positions. Returns the (text,
    image) deltas every step used, in packed order.
    """
    layout = batch.packed_layout()
    tmask, imask = _padded_mask(batch.txt_lens), _padded_mask(batch.img_lens)
    hidden = model.uniter.config.hidden_size

    def scores(txt_delta, img_delta):
        h = model.uniter.forward_packed(batch, layout=layout, txt_delta=None if txt_delta is None else txt_delta[tmask],
                                        img_delta=None if img_delta is None else img_delta[imask])
        return model.vcr_output(model.pooled(h, layout))

    targets = batch.targets
    txt_embeds_init = torch.zeros(*tmask.shape, hidden)  # the shapes of word_embeddings(input_ids) and img_feat
    img_embeds_init = torch.zeros(*imask.shape, batch.img_feat.shape[-1])
    txt_delta = torch.zeros_like(txt_embeds_init)
    img_delta = torch.zeros_like(img_embeds_init)
    gt_answer_scores = scores(None, None)
    gt_answer_prob = F.softmax(gt_answer_scores, dim=1)
    gt_answer_logprob = F.log_softmax(gt_answer_scores, dim=1)
    used = []
    for astep in range(cfg.adv_steps):
        if modality == ["text"]:
            txt_delta.requires_grad_()
            img_delta = torch.zeros_like(img_embeds_init)
        elif modality == ["image"]:
            img_delta.requires_grad_()
            txt_delta = torch.zeros_like(txt_embeds_init)
        else:
            txt_delta.requires_grad_()
            img_delta.requires_grad_()
        used.append((txt_delta.detach()[tmask].clone(), img_delta.detach()[imask].clone()))
        answer_scores = scores(txt_delta, img_delta)
        ce_loss = F.cross_entropy(answer_scores, targets, reduction="mean")
        answer_prob = F.softmax(answer_scores, dim=1)
        answer_logprob = F.log_softmax(answer_scores, dim=1)
        kl_loss = F.kl_div(answer_logprob, gt_answer_prob, reduction="none") + \
            F.kl_div(gt_answer_logprob, answer_prob, reduction="none")
        kl_loss = kl_loss.mean()
        loss = (ce_loss + cfg.adv_kl_weight * kl_loss) / cfg.adv_steps
        loss.backward(retain_graph=True)
        if astep == cfg.adv_steps - 1:
            break
        if "text" in modality:
            txt_delta = _official_update(txt_delta, txt_delta.grad.clone().detach().float(), cfg.adv_lr_txt, cfg)
        if "image" in modality:
            img_delta = _official_update(img_delta, img_delta.grad.clone().detach().float(), cfg.adv_lr_img, cfg)
    return used


def _official_update(delta: torch.Tensor, grad: torch.Tensor, lr: float, cfg: AdvConfig) -> torch.Tensor:
    """The official per-example ascent and projection on a padded delta [B, L, D] (one branch per norm_type)."""
    b = grad.size(0)
    if cfg.norm == "l2":
        denorm = torch.clamp(torch.norm(grad.view(b, -1), dim=1).view(-1, 1, 1), min=1e-8)
        delta = (delta + (lr * grad / denorm).to(delta)).detach()
        if cfg.adv_max_norm > 0:
            delta_norm = torch.norm(delta.view(b, -1), p=2, dim=1).detach()
            exceed = (delta_norm > cfg.adv_max_norm).to(delta)
            reweights = (cfg.adv_max_norm / delta_norm * exceed + (1 - exceed)).view(-1, 1, 1)
            delta = (delta * reweights).detach()
    else:
        denorm = torch.clamp(torch.norm(grad.view(b, -1), dim=1, p=float("inf")).view(-1, 1, 1), min=1e-8)
        delta = (delta + (lr * grad / denorm).to(delta)).detach()
        if cfg.adv_max_norm > 0:
            delta = torch.clamp(delta, -cfg.adv_max_norm, cfg.adv_max_norm).detach()
    return delta


def _vcr_setup(gen, seed, dropout: float = 0.0):
    cfg = tiny_config(initializer_range=0.3, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    torch.manual_seed(seed)
    model = UniterForVisualCommonsenseReasoning(cfg, cfg.img_dim)
    model.init_type_embedding()
    batch = random_pretrain_batch("none", gen, cfg, batch=8)
    targets = torch.zeros(8, dtype=torch.long)
    targets[int(torch.randint(4, (1,), generator=gen))] = 1
    targets[4 + int(torch.randint(4, (1,), generator=gen))] = 1
    batch.targets = targets
    return model.train(), batch


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _run_fastvl(task, cfg, batch, **kw):
    traj = []
    adv = AdversarialTask(task, cfg, **kw)
    adv.on_step = lambda k, pert: traj.append(tuple(
        None if d is None else d.tensor.detach().clone() for d in (pert.text, pert.image)))
    out = adv(batch)
    out["loss"].backward()
    return traj, out


def _max_rel(got: dict, want: dict) -> float:
    top = max(float(w.abs().max()) for w in want.values())
    return max(float((got[n] - want[n]).abs().max()) for n in want) / top


def _compare(model, want_traj, got_traj, want, label: str, rtol: float = 2e-4, traj_rtol: float = 1e-3) -> None:
    """Deltas and parameter gradients equal up to fp32 rounding in another order: the largest error relative to
    the largest element (deltas: ``traj_rtol``, loose because linf steps divide by a per-example max and the
    projection bounds the delta's size; gradients: ``rtol``). A change of algorithm moves them by O(1)."""
    got = _grads(model)
    assert set(got) == set(want), set(got) ^ set(want)
    assert len(got_traj) == len(want_traj)
    traj_rel = 0.0
    for k, (w, g) in enumerate(zip(want_traj, got_traj, strict=True)):
        for name, wt, gt in (("text", w[0], g[0]), ("image", w[1], g[1])):
            if gt is None:
                assert wt.abs().max() == 0, f"step {k}: the official loop moved the {name} delta"
                continue
            err = float((gt - wt).abs().max())
            if k == 0:  # both start at zero
                assert err == 0 and wt.abs().max() == 0, f"step 0 {name}: the delta must start at zero"
                continue
            rel = err / float(wt.abs().max())
            traj_rel = max(traj_rel, rel)
            assert rel <= traj_rtol, f"step {k} {name}: the delta differs by {rel:.2e} of its largest element"
    grad_rel = _max_rel(got, want)
    print(f"[villa-official] {label}: max rel diff delta {traj_rel:.2e}, parameter grads {grad_rel:.2e}")
    assert grad_rel <= rtol, f"{label}: parameter gradients differ by {grad_rel:.2e} of the largest"


NORMS = [("l2", 0.0), ("l2", 0.07), ("linf", 0.0), ("linf", 0.004)]


@pytest.mark.parametrize("norm,max_norm", NORMS)
@pytest.mark.parametrize("mode", ["text", "image", "both"])
def test_vcr_matches_official_vcr_loop(mode, norm, max_norm, gen, seed):
    model, batch = _vcr_setup(gen, seed)
    cfg = AdvConfig(mode=mode, norm=norm, adv_steps=3, adv_lr_txt=0.05, adv_lr_img=0.02, adv_max_norm=max_norm,
                    adv_kl_weight=1.5)
    want_traj = official_vcr_adv_step(model, batch, OFFICIAL_MODALITY[mode], cfg)
    want = _grads(model)
    model.zero_grad(set_to_none=True)
    got_traj, out = _run_fastvl(VCRTask(model), cfg, batch)
    _compare(model, want_traj, got_traj, want, f"vcr {mode} {norm} max_norm={max_norm}")
    assert float(out["logs"]["adv_kl"]) > 0
    moved = [t for pair in got_traj[1:] for t in pair if t is not None]
    assert moved and all(t.abs().sum() > 0 for t in moved), "the deltas must move"


def test_vcr_consistency_is_the_official_element_mean(gen, seed):
    """The view's consistency term: symmetric KL of each row's 2-way softmax, mean over the [4n, 2] elements."""
    model, batch = _vcr_setup(gen, seed)
    view = VCRTask(model).adversarial_view()
    ctx = view.context(batch)
    out = view.forward(ctx, None, None)
    assert out.pred.shape == (8, 2)
    other = out.pred.detach() + torch.randn(8, 2, generator=gen)
    a, b = out.pred.detach(), other
    want = (F.kl_div(F.log_softmax(a, 1), F.softmax(b, 1), reduction="none")
            + F.kl_div(F.log_softmax(b, 1), F.softmax(a, 1), reduction="none")).mean()
    torch.testing.assert_close(view.consistency(a, b), want, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------------------------------------
# Step 0 with dropout: the official separate pass by default; the reuse only where exact
# ----------------------------------------------------------------------------------------------------------


def official_set_dropout(model: nn.Module, p: float) -> None:
    """The official training scripts' set_dropout (written out)."""
    for _, module in model.named_modules():
        if isinstance(module, nn.Dropout) and module.p != p:
            module.p = p


def active_dropout(model: nn.Module) -> bool:
    """A train-mode forward draws dropout (every fastvl dropout rate is held by an nn.Dropout)."""
    return any(m.training and isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules())


class _Count:
    """Counts encoder forward passes."""

    def __init__(self, model):
        self.n = 0
        model.uniter.encoder.register_forward_pre_hook(self)

    def __call__(self, *_):
        self.n += 1


@pytest.mark.parametrize("mode", ["text", "both"])
def test_dropout_default_is_the_official_separate_step0(mode, gen, seed):
    model, batch = _vcr_setup(gen, seed, dropout=0.1)
    cfg = AdvConfig(mode=mode, adv_steps=3, adv_lr_txt=0.05, adv_lr_img=0.02, adv_kl_weight=1.5)
    assert active_dropout(model)
    torch.manual_seed(seed + 1)
    want_traj = official_vcr_adv_step(model, batch, OFFICIAL_MODALITY[mode], cfg)
    want = _grads(model)
    model.zero_grad(set_to_none=True)
    count = _Count(model)
    torch.manual_seed(seed + 1)
    got_traj, out = _run_fastvl(VCRTask(model), cfg, batch)
    assert count.n == cfg.adv_steps + 1, "the default must run a separate clean pass when dropout is active"
    _compare(model, want_traj, got_traj, want, f"vcr dropout=0.1 {mode}")
    # the forced reuse is another algorithm with dropout on (its step-0 KL is 0): it must differ
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed + 1)
    _run_fastvl(VCRTask(model), cfg, batch, reuse_clean=True)
    assert _max_rel(_grads(model), want) > 1e-3


def test_dropout_default_matches_plain_loop_on_mlm(gen, seed):
    """The same on a pre-training task against fastvl.adversarial.reference.plain_villa_step (separate clean pass)."""
    _, model, _ = model_pair(seed=seed, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    model.train()
    batch = random_pretrain_batch("mlm", gen, model.uniter.config, batch=4)
    cfg = AdvConfig(mode="both", adv_steps=3, adv_lr_txt=0.05, adv_lr_img=0.02, adv_kl_weight=1.5)
    torch.manual_seed(seed + 1)
    want_traj, _ = plain_villa_step(model, "mlm", batch, cfg)
    want = _grads(model)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed + 1)
    got_traj, _ = _run_fastvl(build_task("mlm", model=model), cfg, batch)
    _compare(model, want_traj, got_traj, want, "mlm dropout=0.1 both")


def test_no_dropout_reuses_the_clean_pass(gen, seed):
    from fastvl.adversarial import has_active_dropout

    model, batch = _vcr_setup(gen, seed, dropout=0.1)
    official_set_dropout(model, 0.0)  # every dropout, the attention probabilities' included
    assert not active_dropout(model) and not has_active_dropout(model)
    cfg = AdvConfig(mode="both", adv_steps=3, adv_lr_txt=0.05, adv_lr_img=0.02)
    want_traj = official_vcr_adv_step(model, batch, OFFICIAL_MODALITY["both"], cfg)
    want = _grads(model)
    model.zero_grad(set_to_none=True)
    count = _Count(model)
    adv = AdversarialTask(VCRTask(model), cfg)
    assert adv.reuse_clean is None and adv.reuses_clean_pass()
    got_traj, _ = _run_fastvl(VCRTask(model), cfg, batch)
    assert count.n == cfg.adv_steps, "without dropout the clean pass is step 0 (one forward fewer)"
    _compare(model, want_traj, got_traj, want, "vcr set_dropout(0) both (reused clean pass)")
    assert not AdversarialTask(VCRTask(model), cfg, reuse_clean=False).reuses_clean_pass()
    assert not AdversarialTask(VCRTask(model), AdvConfig(adv_init_mag=0.1)).reuses_clean_pass()
    model.eval()
    assert not has_active_dropout(model)
    model.train()
    official_set_dropout(model, 0.1)
    assert has_active_dropout(model) and not adv.reuses_clean_pass()
    assert AdversarialTask(VCRTask(model), cfg, reuse_clean=True).reuses_clean_pass()
    mha = nn.MultiheadAttention(8, 2, dropout=0.1)
    assert has_active_dropout(mha) and not has_active_dropout(mha.eval())
    with pytest.raises(ValueError, match="argument 'reuse_clean' must be None"):
        AdversarialTask(VCRTask(model), cfg, reuse_clean="auto")
