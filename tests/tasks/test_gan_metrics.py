"""BachGAN metrics: Fréchet distance against closed forms, pixel accuracy / mIoU against a hand example, the
segmenter learning the synthetic set, feature nets."""

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from fastvl.data.layouts import LayoutSet, SyntheticLayoutConfig, SyntheticLayoutSet, collate_layouts
from fastvl.tasks.gan_metrics import (
    FASTVL_FID_LABEL,
    SegmenterConfig,
    SmallSegmenter,
    class_weights,
    confusion_matrix,
    feature_statistics,
    fid,
    frechet_distance,
    load_feature_net,
    scores_from_confusion,
    segmentation_scores,
    segmenter_feature_net,
    train_segmenter,
)


@pytest.mark.parametrize("d", [1, 3, 17])
def test_frechet_distance_diagonal_closed_form(gen, d):
    mu1, mu2 = torch.randn(d, generator=gen, dtype=torch.float64), torch.randn(d, generator=gen, dtype=torch.float64)
    a, b = torch.rand(d, generator=gen, dtype=torch.float64) + 0.1, torch.rand(d, generator=gen, dtype=torch.float64)
    b[0] = 0.0  # a singular covariance is fine
    expect = float(((mu1 - mu2) ** 2).sum() + ((a.sqrt() - b.sqrt()) ** 2).sum())
    assert frechet_distance(mu1, torch.diag(a), mu2, torch.diag(b)) == pytest.approx(expect, rel=1e-9, abs=1e-12)
    # the same covariances in a rotated basis (non-diagonal, commuting): the distance is unchanged
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    got = frechet_distance(q @ mu1, q @ torch.diag(a) @ q.T, q @ mu2, q @ torch.diag(b) @ q.T)
    # the singular direction's eigenvalue comes back from eigvalsh as ~eps * |S| instead of 0, and its square root
    # (~1e-8) enters the trace: the rotated result is exact only to ~sqrt(eps) absolute (2.7e-8 seen)
    assert got == pytest.approx(expect, rel=1e-8, abs=2e-7)
    # float32 inputs are computed in float64
    assert frechet_distance(mu1.float(), torch.diag(a).float(), mu2.float(), torch.diag(b).float()) == pytest.approx(
        expect, rel=1e-5)


def test_frechet_distance_general_and_zero(gen):
    d = 6
    x = torch.randn(d, d, generator=gen, dtype=torch.float64)
    y = torch.randn(d, d, generator=gen, dtype=torch.float64)
    s1, s2 = x @ x.T, y @ y.T
    mu = torch.randn(d, generator=gen, dtype=torch.float64)
    assert abs(frechet_distance(mu, s1, mu, s1)) < 1e-8
    # tr((S1 S2)^(1/2)) = sum of the square roots of the (real, non-negative) eigenvalues of S1 S2
    ev = torch.linalg.eigvals(s1 @ s2).real.clamp_min(0).sqrt().sum()
    assert frechet_distance(mu, s1, mu, s2) == pytest.approx(float(s1.trace() + s2.trace() - 2 * ev), rel=1e-7)


def test_frechet_distance_errors():
    with pytest.raises(ValueError, match="'mu2' has D = 3, mu1 has 2"):
        frechet_distance(torch.zeros(2), torch.eye(2), torch.zeros(3), torch.eye(3))
    with pytest.raises(ValueError, match=r"'sigma2' must be \[D, D\] = \[2, 2\]"):
        frechet_distance(torch.zeros(2), torch.eye(2), torch.zeros(2), torch.eye(3))
    with pytest.raises(ValueError, match="features"):
        feature_statistics(torch.zeros(1, 4))


def test_feature_statistics(gen):
    f = torch.randn(9, 4, generator=gen, dtype=torch.float64)
    mu, cov = feature_statistics(f)
    assert torch.allclose(mu, f.mean(0)) and torch.allclose(cov, torch.cov(f.T))


# target / prediction with ignore pixels (255):
#   target [[0, 0, 1], [1, 255, 2]]   pred [[0, 1, 1], [1, 2, 0]]
# counted pixels: (0,0) (0,1) (1,1) (1,1) (2,0) -> 3 correct of 5
# IoU: class 0 = 1 / (1 + 1 fp + 1 fn) = 1/3; class 1 = 2 / (2 + 1 fp) = 2/3; class 2 = 0 / 1 (its one predicted
# pixel sits on an ignore pixel) = 0; class 3 appears nowhere -> NaN, left out of the mean.
HAND_TARGET = torch.tensor([[[0, 0, 1], [1, 255, 2]]])
HAND_PRED = torch.tensor([[[0, 1, 1], [1, 2, 0]]])


def test_scores_hand_example():
    cm = confusion_matrix(HAND_PRED, HAND_TARGET, 4)
    assert cm.sum() == 5 and cm[0, 0] == 1 and cm[0, 1] == 1 and cm[1, 1] == 2 and cm[2, 0] == 1
    s = scores_from_confusion(cm)
    assert s["pixel_acc"] == pytest.approx(3 / 5)
    assert s["miou"] == pytest.approx((1 / 3 + 2 / 3 + 0) / 3)
    assert s["iou"][:3] == pytest.approx([1 / 3, 2 / 3, 0.0]) and math.isnan(s["iou"][3])
    with pytest.raises(ValueError, match="target"):
        confusion_matrix(HAND_PRED, torch.full_like(HAND_TARGET, 7), 4)
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(HAND_PRED[:, :1], HAND_TARGET, 4)


class _FixedPrediction(nn.Module):
    """Logits whose arg-max is a given class map, whatever the image."""

    def __init__(self, pred: torch.Tensor, num_classes: int):
        super().__init__()
        self.num_classes = num_classes
        self.register_buffer("logits", nn.functional.one_hot(pred, num_classes).permute(0, 3, 1, 2).float())

    def forward(self, images):
        return self.logits[: images.shape[0]]


def test_segmentation_scores_hand_example():
    seg = _FixedPrediction(HAND_PRED, 4)
    s = segmentation_scores(seg, torch.zeros(1, 3, 2, 3), HAND_TARGET)
    assert s["pixel_acc"] == pytest.approx(3 / 5) and s["miou"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="labels"):
        segmentation_scores(seg, torch.zeros(1, 3, 2, 3), HAND_TARGET[:, :1])
    with pytest.raises(ValueError, match="images"):
        segmentation_scores(seg, torch.zeros(1, 2, 3), HAND_TARGET)


def test_segmenter_shapes_and_state(seed, tmp_path):
    m = SmallSegmenter(5, width=4).eval()
    x = torch.randn(2, 3, 19, 23)
    assert m(x).shape == (2, 5, 19, 23) and m.features(x).shape == (2, 12)
    torch.save(m.to_state(), tmp_path / "seg.pt")
    back = SmallSegmenter.from_state(torch.load(tmp_path / "seg.pt", weights_only=True))
    assert torch.equal(back(x), m(x))
    with pytest.raises(ValueError, match="'width'"):
        SmallSegmenter.from_state({"num_classes": 5, "state_dict": {}})


def test_train_segmenter_deterministic(seed):
    ds = SyntheticLayoutSet("train", SyntheticLayoutConfig(seed=seed, size=(16, 24), n_train=12, n_val=2))
    cfg = SegmenterConfig(width=4, steps=3, batch_size=4, seed=seed)
    a, b = train_segmenter(ds, cfg, progress=False), train_segmenter(ds, cfg, progress=False)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    c = train_segmenter(ds, SegmenterConfig(width=4, steps=3, batch_size=4, seed=seed + 1), progress=False)
    assert not torch.equal(a.classifier.weight, c.classifier.weight)


@pytest.mark.slow
def test_segmenter_learns_synthetic_set_and_fid_separates(seed):
    cfg = SyntheticLayoutConfig(seed=seed, size=(32, 32), n_train=300, n_val=96)
    seg = train_segmenter(SyntheticLayoutSet("train", cfg), SegmenterConfig(width=8, steps=250, batch_size=8, lr=5e-3,
                                                                            seed=seed), progress=False)
    val = collate_layouts([it for it in SyntheticLayoutSet("val", cfg)])
    majority = torch.bincount(val["label"].flatten()).max().item() / val["label"].numel()
    s = segmentation_scores(seg, val["image"], val["label"])
    assert s["pixel_acc"] > max(0.7, majority + 0.3), (s, majority)  # seeds 7-47: 0.81-0.96, majority 0.30-0.37
    assert s["miou"] > 0.25
    # FID in the segmenter's feature space: two halves of the real set are closer than real vs. corrupted images
    net = segmenter_feature_net(seg)
    assert net.label == FASTVL_FID_LABEL and "Inception" not in net.label
    real_a, real_b = val["image"][:48], val["image"][48:]
    shuffled = real_b.flatten(2)[:, :, torch.randperm(32 * 32)].reshape(real_b.shape)  # pixels scrambled
    same, different = fid(net, real_a, real_b), fid(net, real_a, shuffled)
    assert same["label"] == FASTVL_FID_LABEL and same["n_real"] == 48
    assert same["fid"] >= 0 and different["fid"] > 3 * same["fid"]  # seeds 23-47: ratio 8-88


def test_load_feature_net(tmp_path):
    class Pool(nn.Module):
        def forward(self, x):
            return x.mean((2, 3), keepdim=True)

    p = tmp_path / "pool3.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated in recent torch; still loadable
        torch.jit.script(Pool()).save(str(p))
    net = load_feature_net(p, resize_to=(8, 8))
    assert net.label == "FID (feature net: pool3.pt)"
    x = torch.rand(5, 3, 13, 11) * 2 - 1
    f = net(x, batch_size=2)
    assert f.shape == (5, 3) and f.dtype == torch.float64
    assert torch.allclose(f, nn.functional.interpolate(x, size=(8, 8), mode="bilinear").mean((2, 3)).double(),
                          atol=1e-6)
    exported = tmp_path / "pool3.pt2"
    program = torch.export.export(Pool(), (torch.zeros(2, 3, 8, 8),),
                                  dynamic_shapes={"x": {0: torch.export.Dim.DYNAMIC}})  # any batch size
    torch.export.save(program, str(exported))
    net2 = load_feature_net(exported, resize_to=(8, 8))
    assert net2.label == "FID (feature net: pool3.pt2)" and torch.allclose(net2(x, batch_size=2), f)
    sd = tmp_path / "weights.pth"
    torch.save({"w": torch.zeros(2)}, sd)
    with pytest.raises(ValueError, match="not a TorchScript module"):
        load_feature_net(sd)
    with pytest.raises(ValueError, match="not a file"):
        load_feature_net(tmp_path / "missing.pt")


class _TwoMaps(LayoutSet):
    num_classes, foreground_classes, class_names = 3, [1], ["a", "b", "c"]
    maps = [np.array([[0, 0], [0, 1]]), np.array([[0, 0], [255, 1]])]

    def __init__(self):
        super().__init__("train", (2, 2))

    def __len__(self):
        return 2

    def load(self, index):
        return np.zeros((2, 2, 3), np.uint8), self.maps[index], np.array([[1, 1, 1, 2, 2]])


def test_class_weights_hand_example():
    # counts: class 0 -> 5 pixels, class 1 -> 2, class 2 -> none (the 255 pixel is skipped); freq 5/7, 2/7
    w = class_weights(_TwoMaps(), power=0.5)
    raw = torch.tensor([(5 / 7) ** -0.5, (2 / 7) ** -0.5])
    assert torch.allclose(w[:2], raw / raw.mean()) and w[2] == 0
    assert torch.allclose(class_weights(_TwoMaps(), power=0.0), torch.tensor([1.0, 1.0, 0.0]))
