"""Image-synthesis metrics for BachGAN: segmentation scores of generated images, and the Fréchet distance (FID).

- Segmentation score (the paper's accuracy metric): a small segmenter (:class:`SmallSegmenter`, a few-conv U-Net)
  is trained on REAL images of a split (:func:`train_segmenter`, class-balanced cross-entropy so the small
  foreground classes are learnt too) and applied to generated images;
  :func:`segmentation_scores` gives its pixel accuracy and mIoU against the layouts' class maps.
  :func:`confusion_matrix` / :func:`scores_from_confusion` are the plain definitions: pixels at ``ignore_index`` are
  skipped; pixel accuracy = trace / total; IoU_c = TP / (TP + FP + FN) over the classes whose union is non-empty;
  mIoU = their mean.
- FID: :func:`frechet_distance` is ``|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))`` in float64, the trace
  term via eigen-decompositions (``tr((S1 S2)^(1/2)) = sum sqrt(eig(S1^(1/2) S2 S1^(1/2)))``, no scipy).
  Features come from a :class:`FeatureNet`:
  (i) :func:`load_feature_net` -- an exported program or TorchScript file the user gives (e.g. an Inception-v3
  pool3 network exported from its weights) mapping images [N, 3, H, W] in [-1, 1] to features [N, D]; labelled
  "FID (feature net: file)";
  (ii) :func:`segmenter_feature_net` -- by default, the segmenter fastvl trains on the real images (mean-pooled
  encoder and decoder features), labelled "FID (fastvl feature net)". Neither is ever called FID-Inception: this
  package ships no Inception weights.

Training is deterministic from a seed (for a given thread count) and shows a tqdm bar; the default (300 steps of 16
images at 64 x 64) is CPU minutes: 2.4 min measured on a heavily shared 2-core machine.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..data.layouts import IGNORE_INDEX, LayoutSet, collate_layouts

__all__ = ["FASTVL_FID_LABEL", "FeatureNet", "SegmenterConfig", "SmallSegmenter", "class_weights", "confusion_matrix",
           "feature_statistics", "fid", "frechet_distance", "load_feature_net", "scores_from_confusion",
           "segmentation_scores", "segmenter_feature_net", "train_segmenter"]

FASTVL_FID_LABEL = "FID (fastvl feature net)"


def _err(fn: str, name: str, msg: str) -> ValueError:
    return ValueError(f"fastvl.tasks.gan_metrics.{fn}: argument '{name}' {msg}")


# ----------------------------------------------------------------------------------------------------------
# Segmentation scores
# ----------------------------------------------------------------------------------------------------------


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """int64 [C, C] counts, rows = target class, columns = predicted class, over pixels whose target is not
    ``ignore_index``. pred, target: integer tensors of one shape; target ids in [0, C) or ``ignore_index``."""
    if pred.shape != target.shape:
        raise _err("confusion_matrix", "pred", f"shape {list(pred.shape)} differs from target's "
                                               f"{list(target.shape)}")
    t = target.reshape(-1).long()
    p = pred.reshape(-1).long()
    keep = t != ignore_index
    t, p = t[keep], p[keep]
    if t.numel() and (t.min() < 0 or t.max() >= num_classes):
        raise _err("confusion_matrix", "target", f"has class ids outside [0, {num_classes}) other than "
                                                 f"ignore_index {ignore_index}")
    if p.numel() and (p.min() < 0 or p.max() >= num_classes):
        raise _err("confusion_matrix", "pred", f"has class ids outside [0, {num_classes})")
    return torch.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes,
                                                                                          num_classes)


def scores_from_confusion(cm: torch.Tensor) -> dict[str, float | list[float]]:
    """``pixel_acc``, ``miou`` (mean over classes with a non-empty union) and ``iou`` (per class, NaN where the
    class is in neither target nor prediction) from a [C, C] confusion matrix."""
    cm = cm.double()
    total = cm.sum()
    tp = cm.diagonal()
    union = cm.sum(0) + cm.sum(1) - tp
    iou = torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, math.nan))
    valid = union > 0
    return {"pixel_acc": float(tp.sum() / total) if total > 0 else math.nan,
            "miou": float(iou[valid].mean()) if valid.any() else math.nan,
            "iou": iou.tolist()}


@dataclass(frozen=True)
class SegmenterConfig:
    """Width and training knobs of :class:`SmallSegmenter` / :func:`train_segmenter`."""

    width: int = 8
    steps: int = 300
    batch_size: int = 16
    lr: float = 3e-3
    seed: int = 0
    balance: float = 0.75  # class weights (pixel frequency)^-balance, mean 1 over present classes; 0 = plain CE
    balance_maps: int = 256  # label maps sampled (seeded) to count the frequencies


class SmallSegmenter(nn.Module):
    """A few-conv FCN (a small U-Net): two stride-2 stages, a dilated context conv, bilinear up-sampling with
    skips at 1/2 and full resolution. ``forward(images [N, 3, H, W]) -> logits [N, C, H, W]``;
    ``features(images) -> [N, 3 * width]`` (mean-pooled context and decoder features, the default FID feature
    space)."""

    def __init__(self, num_classes: int, width: int = 8) -> None:
        super().__init__()
        w = width

        def block(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, dilation, dilation, bias=False), nn.BatchNorm2d(cout),
                                 nn.ReLU(inplace=True))

        self.num_classes, self.width = num_classes, width
        self.stem = block(3, w)
        self.down1 = nn.Sequential(block(w, 2 * w, 2), block(2 * w, 2 * w))
        self.down2 = block(2 * w, 4 * w, 2)
        self.context = nn.Sequential(block(4 * w, 4 * w, dilation=2), block(4 * w, 2 * w))
        self.up1 = block(4 * w, 2 * w)
        self.fuse = block(3 * w, w)
        self.classifier = nn.Conv2d(w, num_classes, 1)

    def _forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.stem(images)
        h = self.down1(s)
        c = self.context(self.down2(h))
        u = self.up1(torch.cat([h, F.interpolate(c, size=h.shape[-2:], mode="bilinear", align_corners=False)], 1))
        up = F.interpolate(u, size=s.shape[-2:], mode="bilinear", align_corners=False)
        return c, self.fuse(torch.cat([s, up], 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self._forward(images)[1])

    def features(self, images: torch.Tensor) -> torch.Tensor:
        c, d = self._forward(images)
        return torch.cat([c.mean((2, 3)), d.mean((2, 3))], 1)

    def to_state(self) -> dict[str, object]:
        """Everything needed to rebuild the segmenter (tensors and ints only: loads with ``weights_only=True``)."""
        return {"num_classes": self.num_classes, "width": self.width, "state_dict": self.state_dict()}

    @classmethod
    def from_state(cls, state: dict[str, object]) -> SmallSegmenter:
        """Rebuild a segmenter saved with :meth:`to_state` (in eval mode)."""
        for key in ("num_classes", "width", "state_dict"):
            if key not in state:
                raise _err("SmallSegmenter.from_state", "state", f"has no {key!r} (expected a to_state() dict)")
        model = cls(int(state["num_classes"]), int(state["width"]))
        model.load_state_dict(state["state_dict"])
        return model.eval()


def _device(module: nn.Module) -> torch.device:
    """The device of a module's first parameter or buffer (CPU for a module that has neither)."""
    for t in (*module.parameters(), *module.buffers()):
        return t.device
    return torch.device("cpu")


def _check_images(fn: str, images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        got = list(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise _err(fn, "images", f"must be [N, 3, H, W] in [-1, 1], got {got}")


def class_weights(dataset: LayoutSet, power: float = 0.5, max_maps: int = 256, seed: int = 0) -> torch.Tensor:
    """float32 [C] cross-entropy weights ``freq_c ** -power`` from the pixel frequencies of up to ``max_maps``
    label maps (a seeded sample; ignore pixels skipped), scaled to mean 1 over the classes that occur; classes
    that never occur get weight 0 (they have no pixels to weigh)."""
    n = len(dataset)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(n, generator=g)[: min(n, max_maps)].tolist()
    counts = torch.zeros(dataset.num_classes, dtype=torch.float64)
    for i in idx:
        lab = torch.as_tensor(dataset.label_map(i)).long().reshape(-1)
        lab = lab[lab != dataset.ignore_index]
        counts += torch.bincount(lab, minlength=dataset.num_classes).double()
    present = counts > 0
    w = torch.zeros_like(counts)
    w[present] = (counts[present] / counts.sum()) ** -power
    w[present] /= w[present].mean()
    return w.float()


def train_segmenter(dataset: LayoutSet, config: SegmenterConfig | None = None, progress: bool = True,
                    device: str | torch.device = "cpu") -> SmallSegmenter:
    """Train a :class:`SmallSegmenter` on the REAL images of ``dataset``: cross-entropy (ignore 255) weighted by
    :func:`class_weights` (``config.balance``; small foreground classes would otherwise be swamped by sky and
    road), Adam, cosine-decayed lr. Batches are drawn with a generator seeded by ``config.seed``, so the result is
    deterministic for a given seed and thread count. Returns the model in eval mode."""
    cfg = config or SegmenterConfig()
    if len(dataset) == 0:
        raise _err("train_segmenter", "dataset", "is empty")
    torch.manual_seed(cfg.seed)
    model = SmallSegmenter(dataset.num_classes, cfg.width).to(device)
    weight = None
    if cfg.balance > 0:
        weight = class_weights(dataset, cfg.balance, cfg.balance_maps, cfg.seed).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.steps)
    g = torch.Generator().manual_seed(cfg.seed)
    model.train()
    bar = tqdm(range(cfg.steps), desc="segmenter", disable=not progress, leave=False)
    for _ in bar:
        idx = torch.randint(len(dataset), (min(cfg.batch_size, len(dataset)),), generator=g).tolist()
        batch = collate_layouts([dataset[i] for i in idx])
        logits = model(batch["image"].to(device))
        loss = F.cross_entropy(logits, batch["label"].to(device), weight=weight, ignore_index=dataset.ignore_index)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval()


@torch.no_grad()
def segmentation_scores(segmenter: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                        num_classes: int | None = None, ignore_index: int = IGNORE_INDEX,
                        batch_size: int = 64) -> dict[str, float | list[float]]:
    """Pixel accuracy and mIoU of ``segmenter``'s arg-max on ``images`` [N, 3, H, W] (in [-1, 1]) against
    ``labels`` [N, H, W] (ignore pixels skipped). Returns ``{pixel_acc, miou, iou}`` (see
    :func:`scores_from_confusion`)."""
    _check_images("segmentation_scores", images)
    if labels.shape != (images.shape[0], *images.shape[2:]):
        raise _err("segmentation_scores", "labels", f"must be [N, H, W] = {[images.shape[0], *images.shape[2:]]}, "
                                                    f"got {list(labels.shape)}")
    c = num_classes if num_classes is not None else getattr(segmenter, "num_classes", None)
    if c is None:
        raise _err("segmentation_scores", "num_classes", "is needed when the segmenter has no num_classes")
    was_training = segmenter.training
    segmenter.eval()
    dev = _device(segmenter)
    cm = torch.zeros(c, c, dtype=torch.int64)
    for s in range(0, images.shape[0], batch_size):
        pred = segmenter(images[s:s + batch_size].to(dev)).argmax(1).cpu()
        cm += confusion_matrix(pred, labels[s:s + batch_size], c, ignore_index)
    segmenter.train(was_training)
    return scores_from_confusion(cm)


# ----------------------------------------------------------------------------------------------------------
# FID
# ----------------------------------------------------------------------------------------------------------


def _sqrtm_psd(s: torch.Tensor) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh(s)
    return (vecs * vals.clamp_min(0).sqrt()) @ vecs.T


def frechet_distance(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), computed in float64:
    ``|mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2))``.

    Args: mu [D]; sigma [D, D] symmetric positive semi-definite (symmetrised; negative eigenvalues from rounding
    clamp to 0)."""
    mus, sigmas = (mu1, mu2), (sigma1, sigma2)
    for name, m in zip(("mu1", "mu2"), mus):
        if not isinstance(m, torch.Tensor) or m.dim() != 1:
            raise _err("frechet_distance", name, "must be a 1-d tensor [D]")
    d = mu1.shape[0]
    if mu2.shape[0] != d:
        raise _err("frechet_distance", "mu2", f"has D = {mu2.shape[0]}, mu1 has {d}")
    for name, s in zip(("sigma1", "sigma2"), sigmas):
        if not isinstance(s, torch.Tensor) or tuple(s.shape) != (d, d):
            got = list(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__
            raise _err("frechet_distance", name, f"must be [D, D] = [{d}, {d}], got {got}")
    m1, m2 = mu1.double(), mu2.double()
    s1, s2 = [(s.double() + s.double().T) / 2 for s in sigmas]
    r1 = _sqrtm_psd(s1)
    inner = r1 @ s2 @ r1
    tr_sqrt = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp_min(0).sqrt().sum()
    return float((m1 - m2).square().sum() + s1.trace() + s2.trace() - 2 * tr_sqrt)


def feature_statistics(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean [D], covariance [D, D] with the unbiased N - 1 normaliser) of features [N, D], in float64."""
    if features.dim() != 2 or features.shape[0] < 2:
        raise _err("feature_statistics", "features", f"must be [N, D] with N >= 2, got {list(features.shape)}")
    f = features.double()
    mu = f.mean(0)
    c = f - mu
    return mu, c.T @ c / (f.shape[0] - 1)


class FeatureNet:
    """A feature extractor for FID: ``net(images [N, 3, H, W] in [-1, 1]) -> [N, D]`` (or [N, D, 1, 1]), with the
    ``label`` every output must print beside the number."""

    def __init__(self, net: nn.Module, label: str, resize_to: Sequence[int] | None = None) -> None:
        self.net, self.label = net, label
        self.resize_to = None if resize_to is None else (int(resize_to[0]), int(resize_to[1]))

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        _check_images("FeatureNet", images)
        dev = _device(self.net)
        out = []
        for s in range(0, images.shape[0], batch_size):
            x = images[s:s + batch_size].to(dev).float()
            if self.resize_to is not None:
                x = F.interpolate(x, size=self.resize_to, mode="bilinear", align_corners=False)
            f = self.net(x)
            out.append(f.reshape(f.shape[0], -1).double().cpu())
        return torch.cat(out)


class _SegmenterFeatures(nn.Module):
    def __init__(self, segmenter: SmallSegmenter) -> None:
        super().__init__()
        self.segmenter = segmenter

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.segmenter.features(images)


def segmenter_feature_net(segmenter: SmallSegmenter) -> FeatureNet:
    """The default FID feature space: the pooled features of a segmenter trained on real images
    (labelled :data:`FASTVL_FID_LABEL`)."""
    return FeatureNet(_SegmenterFeatures(segmenter).eval(), FASTVL_FID_LABEL)


def load_feature_net(path: str | Path, resize_to: Sequence[int] | None = (299, 299)) -> FeatureNet:
    """A user-given feature network: an exported program (``torch.export.save``, ``.pt2``) or a TorchScript file
    (``torch.jit.save``) mapping images [N, 3, H, W] in [-1, 1] to [N, D] or [N, D, 1, 1] -- e.g. Inception-v3 up
    to its 2048-d pool3 output, exported from the user's weights. Inputs are resized to ``resize_to`` (None keeps
    them; an exported program needs the size it was exported with and a dynamic batch dimension). A plain
    state_dict is refused with a message: this package does not rebuild Inception-v3 from weights."""
    p = Path(path)
    if not p.is_file():
        raise _err("load_feature_net", "path", f"{p} is not a file")
    hint = ("a plain state_dict cannot be used: export the feature network (torch.export.export + torch.export.save, "
            "or torch.jit.script + save) and pass that file")
    if p.suffix == ".pt2":
        try:
            net = torch.export.load(str(p)).module()
        except Exception as e:  # noqa: BLE001 - any load failure is the user's file: say which and why
            raise _err("load_feature_net", "path", f"{p} is not a torch.export program ({hint}): {e}") from e
        return FeatureNet(net, f"FID (feature net: {p.name})", resize_to)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            net = torch.jit.load(str(p), map_location="cpu")
    except RuntimeError as e:
        raise _err("load_feature_net", "path", f"{p} is not a TorchScript module ({hint}): {e}") from e
    return FeatureNet(net.eval(), f"FID (feature net: {p.name})", resize_to)


def fid(feature_net: FeatureNet, real: torch.Tensor, fake: torch.Tensor, batch_size: int = 64) -> dict[str, object]:
    """FID between two image sets [N, 3, H, W] in [-1, 1]: ``{"label": feature_net.label, "fid": float,
    "n_real": N1, "n_fake": N2}``."""
    fr, ff = feature_net(real, batch_size), feature_net(fake, batch_size)
    return {"label": feature_net.label, "fid": frechet_distance(*feature_statistics(fr), *feature_statistics(ff)),
            "n_real": int(real.shape[0]), "n_fake": int(fake.shape[0])}
