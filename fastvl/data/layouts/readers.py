"""Cityscapes and ADE20K layout readers in their public folder layouts (images, class maps, object boxes).

Cityscapes (``root`` holds ``gtFine/`` and ``leftImg8bit/``)::

    gtFine/{train,val}/<city>/<stem>_gtFine_labelIds.png      class ids 0..33 (uint8)
    gtFine/{train,val}/<city>/<stem>_gtFine_instanceIds.png   class * 1000 + k per instance; the bare class id for
                                                              crowds and classes without instances (16-bit)
    leftImg8bit/{train,val}/<city>/<stem>_leftImg8bit.png     RGB

C = 35 channels (label ids 0..34, as SPADE / BachGAN's ``label_nc``); 255 in a label map is ignore; the foreground
is labelIds 24..33 (person, rider, car, truck, bus, caravan, trailer, train, motorcycle, bicycle), one box per
distinct instance id of a foreground class (a crowd region of a foreground class is one box).

ADE20K SceneParsing (``root`` holds ``images/`` and ``annotations/``)::

    images/{training,validation}/ADE_{train,val}_########.jpg
    annotations/{training,validation}/ADE_{train,val}_########.png   0 = unlabeled ("other objects"), 1..150

C = 151 (the raw ids: 0 unlabeled, c = objectInfo150 Idx c); the foreground is the 115 object classes of
:mod:`.ade20k_classes`; one box per 8-connected region of a foreground class, dropped when (w-1)(h-1) < 30 px²
(the official script's measure).

Both resize images with BICUBIC and class / instance maps with NEAREST to ``size`` and compute boxes on the
resized maps (as the official pipeline), so every box covers pixels of its class in ``label``. (The official ADE20K
training resizes to 286 and crops 256 at random; here the whole image is resized to ``size``.) Files are checked
on construction (missing partners named); bad ids in a map raise :class:`~fastvl.data.DataError` naming the file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import DataError
from .ade20k_classes import ADE20K_CLASS_NAMES, ADE20K_FOREGROUND
from .base import IGNORE_INDEX, LayoutSet
from .boxes import instance_boxes, region_boxes

__all__ = ["ADE20KLayoutSet", "CITYSCAPES_CLASS_NAMES", "CITYSCAPES_FOREGROUND", "CityscapesLayoutSet"]

CITYSCAPES_CLASS_NAMES = [
    "unlabeled", "ego vehicle", "rectification border", "out of roi", "static", "dynamic", "ground", "road",
    "sidewalk", "parking", "rail track", "building", "wall", "fence", "guard rail", "bridge", "tunnel", "pole",
    "polegroup", "traffic light", "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car", "truck",
    "bus", "caravan", "trailer", "train", "motorcycle", "bicycle", "license plate",
]
CITYSCAPES_FOREGROUND = list(range(24, 34))


def _pil():
    try:
        from PIL import Image
    except ImportError as e:  # pragma: no cover - PIL is present wherever the readers are used
        raise ImportError("the Cityscapes / ADE20K readers need Pillow: pip install pillow") from e
    return Image


def _read(path: Path, db: str, mode: str | None = None) -> np.ndarray:
    Image = _pil()
    try:
        with Image.open(path) as im:
            if mode is not None:
                im = im.convert(mode)
            return np.array(im)
    except (OSError, ValueError) as e:
        raise DataError(db, str(path), f"cannot read image: {e}", "bad_image") from e


def _resize(arr: np.ndarray, size: tuple[int, int], nearest: bool) -> np.ndarray:
    if arr.shape[:2] == tuple(size):
        return arr
    h, w = size
    if nearest:
        # index arithmetic for every id map (8- or 16-bit), so label and instance maps sample the same pixels:
        # output pixel i reads source floor((i + 0.5) * in / out)
        ys = np.minimum(((np.arange(h) + 0.5) * arr.shape[0] / h).astype(np.int64), arr.shape[0] - 1)
        xs = np.minimum(((np.arange(w) + 0.5) * arr.shape[1] / w).astype(np.int64), arr.shape[1] - 1)
        return arr[ys][:, xs]
    Image = _pil()
    return np.array(Image.fromarray(arr).resize((w, h), Image.BICUBIC))


def _check_ids(label: np.ndarray, num_classes: int, db: str, path: Path) -> np.ndarray:
    bad = (label >= num_classes) & (label != IGNORE_INDEX)
    if bad.any():
        vals = sorted(set(np.unique(label[bad]).tolist()))[:5]
        raise DataError(db, str(path), f"class ids {vals} outside [0, {num_classes}) (255 = ignore)", "bad_label")
    return label.astype(np.int64)


class CityscapesLayoutSet(LayoutSet):
    """Cityscapes gtFine (module docstring). ``size`` (H, W) defaults to BachGAN's 256 x 512."""

    num_classes = 35
    foreground_classes = list(CITYSCAPES_FOREGROUND)
    class_names = list(CITYSCAPES_CLASS_NAMES)

    def __init__(self, root: str | Path, split: str = "train", size: tuple[int, int] = (256, 512),
                 flip: bool | None = None, seed: int = 0) -> None:
        if split not in ("train", "val", "test"):
            raise ValueError(f"CityscapesLayoutSet: argument 'split' must be train, val or test, got {split!r}")
        super().__init__(split, size, flip=flip, seed=seed)
        self.root = Path(root)
        self.db = f"Cityscapes {self.root}"
        gt = self.root / "gtFine" / split
        if not gt.is_dir():
            raise DataError(self.db, None, f"no folder gtFine/{split} (expected gtFine/{split}/<city>/"
                                           "*_gtFine_labelIds.png)", "missing_folder")
        self.files: list[tuple[Path, Path, Path]] = []
        for lab in sorted(gt.glob("*/*_gtFine_labelIds.png")):
            stem = lab.name[: -len("_gtFine_labelIds.png")]
            inst = lab.with_name(f"{stem}_gtFine_instanceIds.png")
            img = self.root / "leftImg8bit" / split / lab.parent.name / f"{stem}_leftImg8bit.png"
            for p in (inst, img):
                if not p.is_file():
                    raise DataError(self.db, stem, f"missing {p.relative_to(self.root)}", "missing_file")
            self.files.append((img, lab, inst))
        if not self.files:
            raise DataError(self.db, None, f"no *_gtFine_labelIds.png under gtFine/{split}/<city>/", "empty")

    def __len__(self) -> int:
        return len(self.files)

    def _maps(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        _, lab_p, inst_p = self.files[index]
        label = _read(lab_p, self.db)
        inst = _read(inst_p, self.db)
        if label.ndim != 2 or inst.ndim != 2 or label.shape != inst.shape:
            raise DataError(self.db, str(lab_p), f"label map {label.shape} and instance map {inst.shape} must be "
                                                 "single-channel images of one size", "bad_label")
        label = _check_ids(_resize(label, self.size, nearest=True), self.num_classes, self.db, lab_p)
        return label, _resize(inst.astype(np.int64), self.size, nearest=True)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        img_p = self.files[index][0]
        label, inst = self._maps(index)
        image = _resize(_read(img_p, self.db, "RGB"), self.size, nearest=False)
        return image, label, instance_boxes(inst, self.foreground_classes)

    def label_map(self, index: int) -> np.ndarray:
        lab_p = self.files[index][1]
        label = _read(lab_p, self.db)
        return _check_ids(_resize(label, self.size, nearest=True), self.num_classes, self.db, lab_p)


class ADE20KLayoutSet(LayoutSet):
    """ADE20K SceneParsing (module docstring): ``split`` 'train' (``training``) or 'val' (``validation``).
    ``size`` defaults to 256 x 256; ``foreground_classes`` overrides the 115 object classes."""

    num_classes = 151
    class_names = list(ADE20K_CLASS_NAMES)

    def __init__(self, root: str | Path, split: str = "train", size: tuple[int, int] = (256, 256),
                 flip: bool | None = None, seed: int = 0, min_box_area: int = 30,
                 foreground_classes: list[int] | None = None) -> None:
        folders = {"train": ("training", "train"), "val": ("validation", "val")}
        if split not in folders:
            raise ValueError(f"ADE20KLayoutSet: argument 'split' must be 'train' or 'val', got {split!r}")
        super().__init__(split, size, flip=flip, seed=seed)
        self.root = Path(root)
        self.db = f"ADE20K {self.root}"
        self.min_box_area = int(min_box_area)
        fg = ADE20K_FOREGROUND if foreground_classes is None else foreground_classes
        if any(not 1 <= int(c) < self.num_classes for c in fg):
            raise ValueError(f"ADE20KLayoutSet: argument 'foreground_classes' must be ids in [1, 150], got {fg}")
        self.foreground_classes = sorted(int(c) for c in fg)
        folder, tag = folders[split]
        ann = self.root / "annotations" / folder
        if not ann.is_dir():
            raise DataError(self.db, None, f"no folder annotations/{folder} (expected annotations/{folder}/"
                                           f"ADE_{tag}_########.png)", "missing_folder")
        self.files: list[tuple[Path, Path]] = []
        for lab in sorted(ann.glob(f"ADE_{tag}_*.png")):
            img = self.root / "images" / folder / f"{lab.stem}.jpg"
            if not img.is_file():
                raise DataError(self.db, lab.stem, f"missing images/{folder}/{lab.stem}.jpg", "missing_file")
            self.files.append((img, lab))
        if not self.files:
            raise DataError(self.db, None, f"no ADE_{tag}_*.png under annotations/{folder}", "empty")

    def __len__(self) -> int:
        return len(self.files)

    def label_map(self, index: int) -> np.ndarray:
        lab_p = self.files[index][1]
        label = _read(lab_p, self.db)
        if label.ndim != 2:
            raise DataError(self.db, str(lab_p), f"annotation must be a single-channel map, got shape {label.shape}",
                            "bad_label")
        return _check_ids(_resize(label, self.size, nearest=True), self.num_classes, self.db, lab_p)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        label = self.label_map(index)
        image = _resize(_read(self.files[index][0], self.db, "RGB"), self.size, nearest=False)
        return image, label, region_boxes(label, self.foreground_classes, self.min_box_area)
