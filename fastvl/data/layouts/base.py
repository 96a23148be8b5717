"""The layout dataset protocol: :class:`LayoutSet` items, the seeded flip, collate and the retrieval memory bank."""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .boxes import boxes_to_mask, flip_boxes

__all__ = ["IGNORE_INDEX", "LayoutSet", "collate_layouts", "exclude_positions", "label_dtype", "memory_bank_labels"]

IGNORE_INDEX = 255


def label_dtype(num_classes: int) -> torch.dtype:
    """The class-map dtype :func:`fastvl.ops.layout_retrieval` wants: uint8 while ids and 255 fit (C <= 255),
    int16 beyond."""
    return torch.uint8 if num_classes <= 255 else torch.int16


class LayoutSet(torch.utils.data.Dataset):
    """A split of images with class maps and foreground object boxes (BachGAN's input).

    Subclasses implement ``__len__`` and ``load(index) -> (image uint8 [H, W, 3], label int64 [H, W], boxes int64
    [n, 5])`` at ``size`` and unflipped; they may override ``label_map(index)`` with a faster path.

    Item (dict): ``image`` float32 [3, H, W] in [-1, 1]; ``label`` int64 [H, W] (255 = ignore); ``box_mask`` bool
    [C, H, W] (foreground channels only, one box per instance, boxes may overlap); ``boxes`` int64 [n, 5] (class,
    x0, y0, x1, y1; ends exclusive); ``index`` int (position in the split); ``flipped`` bool.

    With ``flip`` (default: on for the training split) an item is mirrored left-right, image, label and boxes
    together, when a draw seeded by (``seed``, epoch, index) says so; :meth:`set_epoch` changes the draw.

    Attributes: num_classes C, foreground_classes (sorted ids), class_names, size (H, W), ignore_index 255, split.
    """

    num_classes: int
    foreground_classes: list[int]
    class_names: list[str]
    size: tuple[int, int]
    split: str
    ignore_index: int = IGNORE_INDEX

    def __init__(self, split: str, size: tuple[int, int], flip: bool | None = None, seed: int = 0) -> None:
        self.split = split
        self.size = (int(size[0]), int(size[1]))
        self.flip = (split == "train") if flip is None else bool(flip)
        self.seed = int(seed)
        self.epoch = 0

    # -- protocol --------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        raise NotImplementedError

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(image uint8 [H, W, 3], label int64 [H, W], boxes int64 [n, 5]) of item ``index``, unflipped."""
        raise NotImplementedError

    def label_map(self, index: int) -> np.ndarray:
        """The unflipped class map [H, W] of item ``index`` (the memory bank reads these)."""
        return self.load(index)[1]

    # -- shared ----------------------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Change the seeded flip draws (call once per epoch for fresh flips, reproducibly)."""
        self.epoch = int(epoch)

    def flipped(self, index: int) -> bool:
        """Whether item ``index`` is mirrored in the current epoch."""
        if not self.flip:
            return False
        return bool(np.random.default_rng([self.seed, self.epoch, index, 0x5F11]).random() < 0.5)

    def _index(self, index: Any) -> int:
        if isinstance(index, bool) or not isinstance(index, numbers.Integral):
            raise TypeError(f"{type(self).__name__}: index must be an int, got {type(index).__name__}")
        n = len(self)
        i = int(index) + (n if index < 0 else 0)
        if not 0 <= i < n:
            raise IndexError(f"{type(self).__name__} ({self.split}): index {index} out of range for {n} items")
        return i

    def __getitem__(self, index: int) -> dict[str, Any]:
        i = self._index(index)
        image, label, boxes = self.load(i)
        image = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(127.5).sub_(1.0)
        label = torch.from_numpy(np.ascontiguousarray(label)).to(torch.int64)
        boxes = torch.from_numpy(np.ascontiguousarray(boxes)).to(torch.int64).reshape(-1, 5)
        flipped = self.flipped(i)
        if flipped:
            image, label = image.flip(-1), label.flip(-1)
            boxes = flip_boxes(boxes, self.size[1])
        return {"image": image.contiguous(), "label": label.contiguous(), "boxes": boxes,
                "box_mask": boxes_to_mask(boxes, self.num_classes, self.size), "index": i, "flipped": flipped}


def collate_layouts(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack layout items: image [B, 3, H, W], label [B, H, W], box_mask [B, C, H, W], index [B] int64,
    flipped [B] bool; ``boxes`` stays a list of B [n_i, 5] tensors."""
    if not items:
        raise ValueError("fastvl.data.layouts.collate_layouts: argument 'items' is empty")
    shapes = {tuple(it["image"].shape) for it in items}
    if len(shapes) != 1:
        raise ValueError(f"fastvl.data.layouts.collate_layouts: items have different image shapes {sorted(shapes)}")
    return {
        "image": torch.stack([it["image"] for it in items]),
        "label": torch.stack([it["label"] for it in items]),
        "box_mask": torch.stack([it["box_mask"] for it in items]),
        "boxes": [it["boxes"] for it in items],
        "index": torch.tensor([it["index"] for it in items], dtype=torch.int64),
        "flipped": torch.tensor([bool(it.get("flipped", False)) for it in items], dtype=torch.bool),
    }


def memory_bank_labels(dataset: LayoutSet, fraction: float = 0.25, seed: int = 0,
                       progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """BachGAN's memory bank: the class maps of a random ``fraction`` of a (training) split.

    Args:
        dataset: a :class:`LayoutSet`. fraction: in (0, 1]; M = max(1, round(fraction * len)). seed: the draw.
        progress: show a tqdm bar while reading the maps.
    Returns:
        (labels [M, H, W] uint8 (int16 when C > 255), ignore pixels = 255; indices [M] int64, ascending: the
        dataset positions, so a training query ``i`` can be excluded from its own retrieval).
    """
    if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real) or not 0.0 < fraction <= 1.0:
        raise ValueError(f"fastvl.data.layouts.memory_bank_labels: argument 'fraction' must be in (0, 1], got "
                         f"{fraction!r}")
    n = len(dataset)
    if n == 0:
        raise ValueError("fastvl.data.layouts.memory_bank_labels: argument 'dataset' is empty")
    m = max(1, min(n, int(round(fraction * n))))
    g = torch.Generator().manual_seed(int(seed))
    indices = torch.randperm(n, generator=g)[:m].sort().values
    dtype = label_dtype(dataset.num_classes)
    out = torch.empty(m, *dataset.size, dtype=dtype)
    for j, i in enumerate(tqdm(indices.tolist(), desc="memory bank", disable=not progress, leave=False)):
        lab = np.asarray(dataset.label_map(i))
        if lab.shape != tuple(dataset.size):
            raise ValueError(f"fastvl.data.layouts.memory_bank_labels: item {i} has a label map of shape "
                             f"{lab.shape}, expected {dataset.size}")
        out[j] = torch.from_numpy(lab.astype(np.int64)).to(dtype)
    return out, indices


def exclude_positions(bank_indices: torch.Tensor, query_indices: torch.Tensor) -> torch.Tensor:
    """``exclude`` for :func:`fastvl.ops.layout_retrieval`: for each query's dataset index, its position in the
    memory bank (``bank_indices`` from :func:`memory_bank_labels`, ascending), or -1 when it is not in the bank
    (a map never retrieves itself). Returns int64 [Q]."""
    bank = bank_indices.to(torch.int64)
    q = query_indices.to(torch.int64).reshape(-1)
    if bank.numel() == 0:
        return torch.full_like(q, -1)
    pos = torch.searchsorted(bank, q).clamp_max(bank.numel() - 1)
    return torch.where(bank[pos] == q, pos, torch.full_like(q, -1))
