"""Perturbation: packed and padded deltas, init, the fused step against a plain FreeLB/VILLA loop on a toy model."""

import pytest
import torch
import torch.nn.functional as F

import fastvl
from fastvl.adversarial import AdvConfig, Perturbation
from fastvl.batch import PackedVLBatch
from fastvl.ops import adv_perturb as A
from fastvl.ops.testing import cu_seqlens, pad_mask

BACKENDS = ["reference"] + (["cpu"] if fastvl.HAS_C else [])
H, D_IMG, C = 6, 10, 3
TXT_LENS, IMG_LENS = [4, 1, 0, 3], [2, 5, 3, 0]


class Toy:
    """A stand-in for UNITER: word embeddings + raw region features -> per-example logits (real positions only)."""

    def __init__(self, gen):
        self.emb = torch.randn(20, H, generator=gen).requires_grad_()
        self.wt = torch.randn(H, C, generator=gen).requires_grad_()
        self.wi = torch.randn(D_IMG, C, generator=gen).mul(0.3).requires_grad_()

    def params(self):
        return [self.emb, self.wt, self.wi]

    def padded_loss(self, ids, feat, tmask, imask, y, txt_delta=None, img_delta=None):
        words = self.emb[ids] + (txt_delta if txt_delta is not None else 0)
        feat = feat + (img_delta if img_delta is not None else 0)
        pooled = (torch.tanh(words @ self.wt) * tmask[..., None]).sum(1) + \
            (torch.tanh(feat @ self.wi) * imask[..., None]).sum(1)
        return F.cross_entropy(pooled, y)

    def packed_loss(self, batch, y, txt_delta=None, img_delta=None):
        words = self.emb[batch.input_ids] + (txt_delta if txt_delta is not None else 0)
        feat = batch.img_feat + (img_delta if img_delta is not None else 0)
        ex_t = torch.repeat_interleave(torch.arange(len(TXT_LENS)), torch.tensor(batch.txt_lens))
        ex_i = torch.repeat_interleave(torch.arange(len(IMG_LENS)), torch.tensor(batch.img_lens))
        pooled = torch.zeros(len(TXT_LENS), C).index_add(0, ex_t, torch.tanh(words @ self.wt)) \
            .index_add(0, ex_i, torch.tanh(feat @ self.wi))
        return F.cross_entropy(pooled, y)


def _data(gen):
    tmask, imask = ~pad_mask(TXT_LENS), ~pad_mask(IMG_LENS)
    ids = torch.randint(1, 20, tmask.shape, generator=gen) * tmask
    feat = torch.randn(*imask.shape, D_IMG, generator=gen) * imask[..., None]
    y = torch.randint(0, C, (len(TXT_LENS),), generator=gen)
    batch = PackedVLBatch(input_ids=ids[tmask], txt_lens=TXT_LENS, img_feat=feat[imask],
                          img_pos=torch.zeros(sum(IMG_LENS), 7), img_lens=IMG_LENS)
    return ids, feat, tmask, imask, y, batch


def _plain_loop(toy, ids, feat, tmask, imask, y, cfg):
    """VILLA's adversarial step as REFERENCE.md states it, written plainly on padded deltas (zero init):
    K perturbed passes, loss / K (alter: a text pass and an image pass, / 2K), parameter gradients accumulate,
    between passes delta += lr * g / max(||g||, 1e-8) per example, then the projection."""
    K = cfg.adv_steps
    txt = torch.zeros(*tmask.shape, H)
    img = torch.zeros(*imask.shape, D_IMG)
    trajectory = []
    for k in range(K):
        txt.requires_grad_()
        img.requires_grad_()
        perturb_t, perturb_i = cfg.mode in ("text", "both", "alter"), cfg.mode in ("image", "both", "alter")
        if cfg.mode == "alter":
            loss = (toy.padded_loss(ids, feat, tmask, imask, y, txt_delta=txt) +
                    toy.padded_loss(ids, feat, tmask, imask, y, img_delta=img)) / (2 * K)
        else:
            loss = toy.padded_loss(ids, feat, tmask, imask, y, txt if perturb_t else None,
                                   img if perturb_i else None) / K
        loss.backward()
        trajectory.append((txt.detach().clone(), img.detach().clone()))
        if k == K - 1:
            break
        new = []
        for delta, lr, on in ((txt, cfg.adv_lr_txt, perturb_t), (img, cfg.adv_lr_img, perturb_i)):
            if not on:
                new.append(delta.detach())
                continue
            g = delta.grad.flatten(1)
            n = g.norm(dim=1) if cfg.norm == "l2" else g.abs().amax(dim=1)
            d = delta.detach() + lr * delta.grad / n.clamp(min=1e-8)[:, None, None]
            if cfg.adv_max_norm > 0 and cfg.norm == "l2":
                dn = d.flatten(1).norm(dim=1)
                d = d * torch.where(dn > cfg.adv_max_norm, cfg.adv_max_norm / dn, 1.0)[:, None, None]
            elif cfg.adv_max_norm > 0:
                d = d.clamp(-cfg.adv_max_norm, cfg.adv_max_norm)
            new.append(d)
        txt, img = new
    return trajectory, [p.grad.clone() for p in toy.params()]


def _fastvl_loop(toy, ids, feat, tmask, imask, y, batch, cfg, layout, backend):
    """The same step through Perturbation; returns the trajectory as padded deltas."""
    if layout == "packed":
        pert = Perturbation.packed(cfg, batch, H, backend=backend)
    else:
        pert = Perturbation.padded(cfg, tmask, imask, H, D_IMG, backend=backend)
    trajectory = []
    for k in range(cfg.adv_steps):
        for modalities in cfg.passes:
            td, idl = pert.deltas(modalities)
            if layout == "packed":
                loss = toy.packed_loss(batch, y, td, idl)
            else:
                loss = toy.padded_loss(ids, feat, tmask, imask, y, td, idl)
            (loss * cfg.loss_scale).backward()
        trajectory.append((_as_padded(pert.text, tmask, H, layout), _as_padded(pert.image, imask, D_IMG, layout)))
        if k < cfg.adv_steps - 1:
            pert.step()
            assert all(d.tensor.grad is None for d in pert.active)
    return trajectory, [p.grad.clone() for p in toy.params()]


def _as_padded(delta, mask, dim, layout):
    out = torch.zeros(*mask.shape, dim)
    if delta is None:
        return out
    if layout == "packed":
        out[mask] = delta.tensor.detach()
        return out
    return delta.tensor.detach().clone()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["packed", "padded"])
@pytest.mark.parametrize("mode", ["text", "image", "both", "alter"])
@pytest.mark.parametrize("norm,max_norm", [("l2", 0.0), ("l2", 0.15), ("linf", 0.0), ("linf", 0.04)])
def test_step_trajectory_and_parameter_grads_match_plain_loop(backend, layout, mode, norm, max_norm, gen):
    ids, feat, tmask, imask, y, batch = _data(gen)
    cfg = AdvConfig(mode=mode, norm=norm, adv_steps=3, adv_lr_txt=0.1, adv_lr_img=0.05, adv_max_norm=max_norm)
    toy = Toy(gen)
    want_traj, want_grads = _plain_loop(toy, ids, feat, tmask, imask, y, cfg)
    for p in toy.params():
        p.grad = None
    got_traj, got_grads = _fastvl_loop(toy, ids, feat, tmask, imask, y, batch, cfg, layout, backend)
    for k, (want, got) in enumerate(zip(want_traj, got_traj, strict=True)):
        for name, w, g in (("text", want[0], got[0]), ("image", want[1], got[1])):
            # deltas are O(lr) = O(0.1) after a step; packed and padded sums associate differently in fp32, so an
            # entry near 0 can differ by a few ulp of the step size (1.7e-7 seen): atol 1e-6, about 10 ulp of 0.1
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6,
                                       msg=lambda m, k=k, name=name: f"step {k} {name} delta: {m}")
    assert any(t[0].abs().sum() > 0 or t[1].abs().sum() > 0 for t in got_traj[1:]), "the deltas must move"
    for w, g in zip(want_grads, got_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)


def test_packed_shapes_and_zero_init(gen):
    batch = _data(gen)[-1]
    pert = Perturbation.packed(AdvConfig(mode="both"), batch, H)
    assert pert.text.tensor.shape == (sum(TXT_LENS), H) and pert.image.tensor.shape == (sum(IMG_LENS), D_IMG)
    assert pert.text.tensor.is_leaf and pert.text.tensor.requires_grad and pert.text.tensor.eq(0).all()
    assert torch.equal(pert.text.mask, cu_seqlens(TXT_LENS)) and pert.image.max_seqlen == max(IMG_LENS)
    only_image = Perturbation.packed(AdvConfig(mode="image"), batch, H)
    assert only_image.text is None and only_image.deltas(("image",))[0] is None
    with pytest.raises(ValueError, match=r"no 'text' delta \(mode 'image'\)"):
        only_image.deltas(("text",))


@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_random_init_is_the_op_init(layout, seed):
    ids, feat, tmask, imask, y, batch = _data(torch.Generator().manual_seed(seed))
    cfg = AdvConfig(mode="both", adv_init_mag=0.5, adv_init_dist="normal", norm="l2")
    g = torch.Generator().manual_seed(seed)
    if layout == "packed":
        pert = Perturbation.packed(cfg, batch, H, generator=g)
        want = A.adv_perturb_init((sum(TXT_LENS), H), cu_seqlens(TXT_LENS), 0.5, "normal", "l2",
                                  torch.Generator().manual_seed(seed), max_seqlen=max(TXT_LENS))
    else:
        pert = Perturbation.padded(cfg, tmask, imask, H, D_IMG, generator=g)
        want = A.adv_perturb_init((*tmask.shape, H), tmask, 0.5, "normal", "l2", torch.Generator().manual_seed(seed))
    torch.testing.assert_close(pert.text.tensor.detach(), want, rtol=0, atol=0)
    assert pert.image.tensor.abs().sum() > 0


def test_padding_never_moves(gen):
    """A loss that (wrongly) reaches padded positions still leaves the padded deltas at exactly 0."""
    tmask = ~pad_mask([3, 1])
    pert = Perturbation.padded(AdvConfig(mode="text"), tmask, None, H)
    (pert.deltas(("text",))[0] * torch.randn(2, 3, H, generator=gen)).sum().backward()
    pert.step()
    d = pert.text.tensor.detach()
    assert d.masked_select(~tmask[..., None]).eq(0).all() and d.masked_select(tmask[..., None]).ne(0).all()


def test_step_without_gradients_is_a_no_op(gen):
    batch = _data(gen)[-1]
    pert = Perturbation.packed(AdvConfig(mode="both"), batch, H)
    pert.step()
    assert pert.text.tensor.eq(0).all()
    (pert.text.tensor.sum() * 2).backward()
    pert.zero_grad()
    assert pert.text.tensor.grad is None


def test_bad_construction():
    with pytest.raises(ValueError, match=r"argument 'img_mask' must be a bool \[B, L\] tensor .* mode 'both'"):
        Perturbation.padded(AdvConfig(mode="both"), torch.ones(2, 3, dtype=torch.bool), None, H)
    with pytest.raises(ValueError, match=r"mode 'text' perturbs text but no 'text' delta was given"):
        Perturbation(AdvConfig(mode="text"))
