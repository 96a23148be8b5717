"""BachGAN losses against their formulas: hinge, feature matching, VGG19 perceptual (torchvision layout), NLL."""

from __future__ import annotations

import pytest
import torch

from fastvl.models.bachgan import (
    VGG19Features,
    VGGLoss,
    feature_matching_loss,
    hinge_d_loss,
    hinge_g_loss,
    load_vgg19,
    seg_nll_loss,
    vgg_loss_or_none,
)


def _pred(gen, n=3, scales=2, layers=3):
    return [[torch.randn(n, 2 + j, 5 - s, 7 - s, generator=gen) for j in range(layers)] + [
        torch.randn(n, 1, 4 - s, 6 - s, generator=gen) * 2] for s in range(scales)]


def test_hinge_losses_match_formula(seed, gen):
    fake, real = _pred(gen), _pred(gen)
    d_fake, d_real = hinge_d_loss(fake, real)
    ef = sum(torch.clamp(1 + s[-1], min=0).mean() for s in fake) / 2
    er = sum(torch.clamp(1 - s[-1], min=0).mean() for s in real) / 2
    torch.testing.assert_close(d_fake, ef)
    torch.testing.assert_close(d_real, er)
    torch.testing.assert_close(hinge_g_loss(fake), -(fake[0][-1].mean() + fake[1][-1].mean()) / 2)


def test_feature_matching_matches_formula(seed, gen):
    fake, real = _pred(gen), _pred(gen)
    for s in fake:
        for t in s:
            t.requires_grad_(True)
    for s in real:
        for t in s:
            t.requires_grad_(True)
    got = feature_matching_loss(fake, real, weight=10.0)
    expected = sum((f - r).abs().mean() * 10.0 / 2 for fs, rs in zip(fake, real) for f, r in zip(fs[:-1], rs[:-1]))
    torch.testing.assert_close(got, expected)
    got.backward()
    assert all(s[-1].grad is None for s in fake)  # the logits never enter feature matching
    assert all(t.grad is None for s in real for t in s)  # real features are targets (detached)


def test_seg_nll_ignores_255(seed, gen):
    logp = torch.log_softmax(torch.randn(2, 4, 3, 5, generator=gen), 1)
    label = torch.randint(0, 4, (2, 3, 5), generator=gen)
    label[0, 0, :] = 255
    keep = label != 255
    picked = logp.permute(0, 2, 3, 1)[keep].gather(1, label[keep][:, None]).squeeze(1)
    torch.testing.assert_close(seg_nll_loss(logp, label), -picked.mean())


@pytest.mark.slow
def test_vgg19_loads_torchvision_layout_and_loss(tmp_path, seed, gen):
    ref = VGG19Features()
    conv_ids = [i for i, m in enumerate(ref.features) if isinstance(m, torch.nn.Conv2d)]
    assert conv_ids == [0, 2, 5, 7, 10, 12, 14, 16, 19, 21, 23, 25, 28, 30, 32, 34]  # torchvision's vgg19 indices
    state = {f"features.{k}": v.normal_(0, 0.05, generator=gen) for k, v in ref.features.state_dict().items()}
    state["classifier.0.weight"] = torch.zeros(2, 2)  # ignored
    path = tmp_path / "vgg19.pth"
    torch.save(state, path)
    net = load_vgg19(path)
    loss = VGGLoss(net)
    a, b = torch.rand(2, 3, 32, 32, generator=gen) * 2 - 1, torch.rand(2, 3, 32, 32, generator=gen) * 2 - 1
    got = loss(a, b)
    # by hand: relu1_1, relu2_1, relu3_1, relu4_1, relu5_1 = features[:2], [:7], [:12], [:21], [:30]
    expected = 0
    for w, end in zip([1 / 32, 1 / 16, 1 / 8, 1 / 4, 1.0], [2, 7, 12, 21, 30]):
        expected = expected + w * (net.features[:end](a) - net.features[:end](b)).abs().mean()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    bad = tmp_path / "bad.pth"
    torch.save({"features.0.weight": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="bad.pth"):
        load_vgg19(bad)
    with pytest.raises(FileNotFoundError):
        load_vgg19(tmp_path / "missing.pth")


def test_no_vgg_file_says_so_once():
    said = []
    assert vgg_loss_or_none(None, log=said.append) is None
    assert len(said) == 1 and "without the perceptual loss" in said[0]
