"""BachGAN layout data: images with class maps and foreground object boxes, the memory bank, user-drawn boxes.

Datasets (:class:`LayoutSet`, torch Datasets) -- the synthetic default (:class:`SyntheticLayoutSet`), Cityscapes
(:class:`CityscapesLayoutSet`) and ADE20K (:class:`ADE20KLayoutSet`) in their public folder layouts. Each item is a
dict:

- ``image`` float32 [3, H, W] in [-1, 1];
- ``label`` int64 [H, W] class map (255 = ignore);
- ``box_mask`` bool [C, H, W]: one channel per class, only FOREGROUND channels filled, one box per instance, boxes
  may overlap;
- ``boxes`` int64 [n, 5]: (class, x0, y0, x1, y1), pixel coordinates, ends exclusive;
- ``index`` int: the position in the split (retrieval's ``exclude``); ``flipped`` bool: whether it was mirrored.

Attributes: ``num_classes`` C, ``foreground_classes`` (sorted ids), ``class_names``, ``size`` (H, W),
``ignore_index`` 255, ``split``. Training splits flip left-right by default (image, label and boxes together; the
draw is seeded by (seed, epoch, index); ``set_epoch`` changes it). Label maps are always resized with NEAREST.

Functions:

- :func:`collate_layouts` -- stack items (``boxes`` stays a list);
- :func:`memory_bank_labels` -- a random fraction of a split's class maps (uint8, int16 when C > 255) and their
  indices: BachGAN's retrieval memory, ready for :func:`fastvl.ops.layout_retrieval` / ``LayoutMemory``;
- :func:`exclude_positions` -- each training query's position in that bank (or -1): retrieval's ``exclude``;
- :func:`boxes_to_mask` -- boxes -> bool [C, H, W];
- :func:`read_boxes_json` -- user-drawn boxes from ``{"size": [H, W], "boxes": [{"class": name-or-id, "box":
  [x0, y0, x1, y1]}, ...]}`` (errors name the file and the box);
- :func:`instance_boxes` / :func:`region_boxes` -- boxes from a Cityscapes instance map / from connected regions.

``LAYOUT_SETS`` maps the names ``synthetic``, ``cityscapes``, ``ade20k`` to the classes (the readers take ``root``
first; the synthetic set takes ``split`` and a :class:`SyntheticLayoutConfig`).
"""

from .ade20k_classes import ADE20K_CLASS_NAMES, ADE20K_FOREGROUND, ADE20K_STUFF
from .base import IGNORE_INDEX, LayoutSet, collate_layouts, exclude_positions, label_dtype, memory_bank_labels
from .boxes import (
           boxes_to_mask,
           check_boxes,
           connected_boxes,
           flip_boxes,
           instance_boxes,
           read_boxes_json,
           region_boxes,
)
from .readers import CITYSCAPES_CLASS_NAMES, CITYSCAPES_FOREGROUND, ADE20KLayoutSet, CityscapesLayoutSet
from .synthetic import SyntheticLayoutConfig, SyntheticLayoutSet, generate_scene

LAYOUT_SETS = {"synthetic": SyntheticLayoutSet, "cityscapes": CityscapesLayoutSet, "ade20k": ADE20KLayoutSet}

__all__ = [
    "ADE20KLayoutSet", "ADE20K_CLASS_NAMES", "ADE20K_FOREGROUND", "ADE20K_STUFF", "CITYSCAPES_CLASS_NAMES",
    "CITYSCAPES_FOREGROUND", "CityscapesLayoutSet", "IGNORE_INDEX", "LAYOUT_SETS", "LayoutSet",
    "SyntheticLayoutConfig", "SyntheticLayoutSet", "boxes_to_mask", "check_boxes", "collate_layouts",
    "connected_boxes", "exclude_positions", "flip_boxes", "generate_scene", "instance_boxes", "label_dtype",
    "memory_bank_labels", "read_boxes_json", "region_boxes",
]
