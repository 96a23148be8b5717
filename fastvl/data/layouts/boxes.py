"""Object boxes of a layout: box masks, user-drawn boxes (JSON), boxes from instance maps and connected regions.

A box is one int64 row ``(class, x0, y0, x1, y1)`` in pixel coordinates with exclusive ends, so a box covers
``x0 <= x < x1`` and ``y0 <= y < y1`` and its area is ``(x1 - x0) * (y1 - y0)``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .. import errors

__all__ = ["boxes_to_mask", "check_boxes", "flip_boxes", "instance_boxes", "read_boxes_json", "region_boxes"]


def _err(fn: str, name: str, msg: str) -> ValueError:
    return ValueError(f"fastvl.data.layouts.{fn}: argument '{name}' {msg}")


def _as_boxes(boxes, fn: str) -> torch.Tensor:
    if isinstance(boxes, np.ndarray):
        boxes = torch.from_numpy(boxes)
    if not isinstance(boxes, torch.Tensor):
        boxes = torch.as_tensor(boxes, dtype=torch.int64) if len(boxes) else torch.zeros(0, 5, dtype=torch.int64)
    if boxes.dtype.is_floating_point or boxes.dtype == torch.bool:
        raise _err(fn, "boxes", f"must hold integers (class, x0, y0, x1, y1), got dtype {boxes.dtype}")
    if boxes.dim() != 2 or boxes.shape[1] != 5:
        raise _err(fn, "boxes", f"must be [n, 5] (class, x0, y0, x1, y1), got shape {list(boxes.shape)}")
    return boxes.to(torch.int64)


def check_boxes(boxes, num_classes: int, size: Sequence[int], foreground: Sequence[int] | None = None,
                fn: str = "check_boxes") -> torch.Tensor:
    """Validate boxes and return them as int64 [n, 5]: class ids in [0, C) (and in ``foreground`` when given),
    boxes inside the H x W image, non-empty (x0 < x1, y0 < y1). Errors name the box index and what was expected."""
    boxes = _as_boxes(boxes, fn)
    height, width = int(size[0]), int(size[1])
    fg = None if foreground is None else set(int(c) for c in foreground)
    for i, (c, x0, y0, x1, y1) in enumerate(boxes.tolist()):
        if not 0 <= c < num_classes:
            raise _err(fn, "boxes", f"box {i}: class id {c} is outside [0, {num_classes})")
        if fg is not None and c not in fg:
            raise _err(fn, "boxes", f"box {i}: class {c} is a background class; boxes are for the foreground "
                                    f"classes {sorted(fg)}")
        if not (x0 < x1 and y0 < y1):
            raise _err(fn, "boxes", f"box {i}: empty box (x0, y0, x1, y1) = {(x0, y0, x1, y1)}; need x0 < x1 and "
                                    "y0 < y1 (ends exclusive)")
        if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
            raise _err(fn, "boxes", f"box {i}: (x0, y0, x1, y1) = {(x0, y0, x1, y1)} is outside the image of "
                                    f"size (H, W) = {(height, width)}")
    return boxes


def boxes_to_mask(boxes, num_classes: int, size: Sequence[int]) -> torch.Tensor:
    """One binary box mask per class: bool [C, H, W], channel c = the union of the class-c boxes.

    Args:
        boxes: [n, 5] int (class, x0, y0, x1, y1), ends exclusive, inside the image, non-empty.
        num_classes: C. size: (H, W).
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise _err("boxes_to_mask", "num_classes", f"must be an int >= 1, got {num_classes!r}")
    if len(size) != 2 or min(int(s) for s in size) < 1:
        raise _err("boxes_to_mask", "size", f"must be (H, W) with H, W >= 1, got {tuple(size)}")
    boxes = check_boxes(boxes, num_classes, size, fn="boxes_to_mask")
    mask = torch.zeros(num_classes, int(size[0]), int(size[1]), dtype=torch.bool)
    for c, x0, y0, x1, y1 in boxes.tolist():
        mask[c, y0:y1, x0:x1] = True
    return mask


def flip_boxes(boxes: torch.Tensor, width: int) -> torch.Tensor:
    """Boxes of the horizontally flipped image: x0' = W - x1, x1' = W - x0."""
    out = boxes.clone()
    out[:, 1] = width - boxes[:, 3]
    out[:, 3] = width - boxes[:, 1]
    return out


def read_boxes_json(path: str | Path, class_names: Sequence[str], foreground_classes: Sequence[int],
                    size: Sequence[int] | None = None) -> tuple[torch.Tensor, tuple[int, int]]:
    """Read user-drawn boxes.

    The file is ``{"size": [H, W], "boxes": [{"class": name-or-id, "box": [x0, y0, x1, y1]}, ...]}``: pixel
    coordinates, ends exclusive, one entry per object; a class is its name in ``class_names`` or its integer id.

    Args:
        path: the JSON file. class_names: names of the C classes. foreground_classes: the class ids boxes may use.
        size: (H, W) the layout must have (e.g. the model's); None accepts the file's size.
    Returns:
        (boxes int64 [n, 5], (H, W)).
    Raises:
        DataError naming the file and the box for: unreadable JSON, a missing key, an unknown class name or id, a
        background class, an empty box, a box outside the image, a size that differs from ``size``, no boxes.
    """
    path = Path(path)
    db = f"boxes file {path}"
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise errors.DataError(db, None, f"cannot read JSON: {e}", "bad_json") from e
    if not isinstance(doc, dict) or "size" not in doc or "boxes" not in doc:
        raise errors.DataError(db, None, 'expected an object {"size": [H, W], "boxes": [{"class": ..., "box": [x0, '
                                         'y0, x1, y1]}, ...]}', "bad_json")
    hw = doc["size"]
    if not (isinstance(hw, list) and len(hw) == 2 and all(isinstance(v, int) and v >= 1 for v in hw)):
        raise errors.DataError(db, "size", f"must be [H, W] with positive integers, got {hw!r}", "bad_json")
    hw = (int(hw[0]), int(hw[1]))
    if size is not None and tuple(int(s) for s in size) != hw:
        raise errors.DataError(db, "size", f"is {list(hw)} but the model works at (H, W) = {tuple(size)}",
                               "bad_size")
    entries = doc["boxes"]
    if not isinstance(entries, list) or not entries:
        raise errors.DataError(db, "boxes", "must be a non-empty list of boxes", "bad_json")
    by_name = {name: i for i, name in enumerate(class_names)}
    fg = sorted(int(c) for c in foreground_classes)
    rows = []
    for i, entry in enumerate(entries):
        key = f"boxes[{i}]"
        if not isinstance(entry, dict) or "class" not in entry or "box" not in entry:
            raise errors.DataError(db, key, 'must be {"class": name-or-id, "box": [x0, y0, x1, y1]}', "bad_json")
        cls = entry["class"]
        if isinstance(cls, str):
            if cls not in by_name:
                raise errors.DataError(db, key, f"unknown class {cls!r}; foreground classes are "
                                                f"{[class_names[c] for c in fg]}", "unknown_class")
            cls = by_name[cls]
        elif isinstance(cls, bool) or not isinstance(cls, int) or not 0 <= cls < len(class_names):
            raise errors.DataError(db, key, f"unknown class id {cls!r}; ids are 0..{len(class_names) - 1}",
                                   "unknown_class")
        if cls not in fg:
            raise errors.DataError(db, key, f"class {class_names[cls]!r} ({cls}) is a background class; boxes are "
                                            f"for the foreground classes {[class_names[c] for c in fg]}",
                                   "background_class")
        box = entry["box"]
        if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, int) and not isinstance(v, bool)
                                                                 for v in box)):
            raise errors.DataError(db, key, f"'box' must be 4 integers [x0, y0, x1, y1], got {box!r}", "bad_json")
        x0, y0, x1, y1 = box
        if not (x0 < x1 and y0 < y1):
            raise errors.DataError(db, key, f"empty box {box}: need x0 < x1 and y0 < y1 (ends exclusive)",
                                   "empty_box")
        if x0 < 0 or y0 < 0 or x1 > hw[1] or y1 > hw[0]:
            raise errors.DataError(db, key, f"box {box} is outside the image of size [H, W] = {list(hw)}",
                                   "box_outside")
        rows.append([cls, x0, y0, x1, y1])
    return torch.tensor(rows, dtype=torch.int64), hw


def instance_boxes(instance_ids: np.ndarray, foreground_classes: Sequence[int]) -> np.ndarray:
    """Cityscapes boxes: one box per instance id of a foreground class.

    ``instance_ids`` [H, W] holds class * 1000 + k for an instance and the bare class id for a crowd region or a
    class without instances; every distinct value whose class is in ``foreground_classes`` gives one box (so a crowd
    region of a foreground class is one box). Returns int64 [n, 5], ordered by instance id.
    """
    ids = np.asarray(instance_ids).astype(np.int64)
    fg = np.asarray(sorted(foreground_classes), dtype=np.int64)
    rows = []
    for v in np.unique(ids):
        cls = v // 1000 if v >= 1000 else v
        if not np.isin(cls, fg):
            continue
        ys, xs = np.nonzero(ids == v)
        rows.append([cls, xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    return np.asarray(rows, dtype=np.int64).reshape(-1, 5)


def _runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Horizontal runs of True pixels: (row, start, end exclusive), in row-major order."""
    padded = np.zeros((mask.shape[0], mask.shape[1] + 2), dtype=np.int8)
    padded[:, 1:-1] = mask
    d = np.diff(padded, axis=1)
    starts, ends = np.nonzero(d == 1), np.nonzero(d == -1)
    return starts[0], starts[1], ends[1]


def connected_boxes(mask: np.ndarray) -> np.ndarray:
    """Bounding boxes (x0, y0, x1, y1; ends exclusive) of the 8-connected regions of a bool [H, W] mask."""
    rows, starts, ends = _runs(np.asarray(mask, dtype=bool))
    n = len(rows)
    if n == 0:
        return np.zeros((0, 4), dtype=np.int64)
    parent = np.arange(n)

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    row_first = np.searchsorted(rows, np.arange(rows.max() + 2))
    for r in range(rows.max()):
        a, a_end, b, b_end = row_first[r], row_first[r + 1], row_first[r + 1], row_first[r + 2]
        i, j = a, b
        while i < a_end and j < b_end:
            # 8-connected: [s_i, e_i) and [s_j, e_j) touch when s_i <= e_j and s_j <= e_i (diagonal included)
            if starts[i] <= ends[j] and starts[j] <= ends[i]:
                ri, rj = find(i), find(j)
                if ri != rj:
                    parent[max(ri, rj)] = min(ri, rj)
            if ends[i] < ends[j]:
                i += 1
            else:
                j += 1
    roots = np.array([find(i) for i in range(n)])
    uniq, label = np.unique(roots, return_inverse=True)
    k = len(uniq)
    x0 = np.full(k, np.iinfo(np.int64).max)
    y0 = np.full(k, np.iinfo(np.int64).max)
    x1 = np.zeros(k, dtype=np.int64)
    y1 = np.zeros(k, dtype=np.int64)
    np.minimum.at(x0, label, starts)
    np.minimum.at(y0, label, rows)
    np.maximum.at(x1, label, ends)
    np.maximum.at(y1, label, rows + 1)
    order = np.lexsort((x0, y0))
    return np.stack([x0, y0, x1, y1], axis=1)[order].astype(np.int64)


def region_boxes(label: np.ndarray, foreground_classes: Sequence[int], min_area: int = 30) -> np.ndarray:
    """ADE20K boxes: one box per 8-connected region of each foreground class present in ``label`` [H, W].

    A box is dropped when ``(w - 1) * (h - 1) < min_area`` (w, h = the end-exclusive extents), the measure of the
    official script (max - min of the pixel coordinates). Returns int64 [n, 5] ordered by class, then position.
    """
    label = np.asarray(label)
    rows = []
    present = np.unique(label)
    for c in sorted(int(c) for c in foreground_classes):
        if c not in present:
            continue
        for x0, y0, x1, y1 in connected_boxes(label == c).tolist():
            if (x1 - x0 - 1) * (y1 - y0 - 1) < min_area:
                continue
            rows.append([c, x0, y0, x1, y1])
    return np.asarray(rows, dtype=np.int64).reshape(-1, 5)
