"""BachGAN layout data: the synthetic set's item contract, seeded flips, boxes, user boxes, the memory bank and the
retrieval signal of the synthetic backgrounds."""

import json

import numpy as np
import pytest
import torch

from fastvl.data import DataError
from fastvl.data.layouts import (
    LayoutSet,
    SyntheticLayoutConfig,
    SyntheticLayoutSet,
    boxes_to_mask,
    collate_layouts,
    connected_boxes,
    exclude_positions,
    flip_boxes,
    instance_boxes,
    memory_bank_labels,
    read_boxes_json,
    region_boxes,
)
from fastvl.data.layouts.synthetic import CLASS_NAMES, FOREGROUND_CLASSES


def _tiny(seed: int, size=(37, 53), n_train=40, n_val=12) -> SyntheticLayoutConfig:
    return SyntheticLayoutConfig(seed=seed, size=size, n_train=n_train, n_val=n_val)


def test_synthetic_item_contract(seed):
    ds = SyntheticLayoutSet("train", _tiny(seed), flip=False)
    assert ds.num_classes == len(CLASS_NAMES) and ds.foreground_classes == sorted(FOREGROUND_CLASSES)
    assert ds.ignore_index == 255 and ds.size == (37, 53) and len(ds) == 40
    for i in range(len(ds)):
        it = ds[i]
        assert it["image"].dtype == torch.float32 and it["image"].shape == (3, 37, 53)
        assert it["image"].min() >= -1 and it["image"].max() <= 1
        lab, boxes, mask = it["label"], it["boxes"], it["box_mask"]
        assert lab.dtype == torch.int64 and lab.shape == (37, 53) and 0 <= lab.min() and lab.max() < ds.num_classes
        assert it["index"] == i and boxes.dtype == torch.int64 and boxes.shape[1] == 5 and len(boxes) >= 1
        assert mask.dtype == torch.bool and torch.equal(mask, boxes_to_mask(boxes, ds.num_classes, ds.size))
        background = [c for c in range(ds.num_classes) if c not in ds.foreground_classes]
        assert not mask[background].any()
        for c, x0, y0, x1, y1 in boxes.tolist():
            assert c in ds.foreground_classes and 0 <= x0 < x1 <= 53 and 0 <= y0 < y1 <= 37
            inside = lab[y0:y1, x0:x1] == c
            # tight: every edge row / column of the box holds a pixel of its class
            assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()
        # every foreground pixel is inside a box of its class
        for c in ds.foreground_classes:
            assert not ((lab == c) & ~mask[c]).any()


def test_synthetic_deterministic_and_seeded(seed):
    a, b = SyntheticLayoutSet("val", _tiny(seed)), SyntheticLayoutSet("val", _tiny(seed), cache=False)
    c = SyntheticLayoutSet("val", _tiny(seed + 1))
    for i in (0, 5, 11):
        for k in ("image", "label", "boxes"):
            assert torch.equal(a[i][k], b[i][k])
        assert torch.equal(torch.from_numpy(a.label_map(i)).long(), b[i]["label"])
    assert any(not torch.equal(a[i]["label"], c[i]["label"]) for i in range(12))
    tr = SyntheticLayoutSet("train", _tiny(seed))
    assert not torch.equal(tr[0]["image"], a[0]["image"])  # the splits are different scenes


def test_flip_consistent_and_seeded(seed):
    cfg = _tiny(seed)
    plain, flipping = SyntheticLayoutSet("train", cfg, flip=False), SyntheticLayoutSet("train", cfg)
    assert flipping.flip and not SyntheticLayoutSet("val", cfg).flip
    draws = [flipping.flipped(i) for i in range(len(flipping))]
    assert 5 < sum(draws) < 35
    for i in range(len(flipping)):
        f, p = flipping[i], plain[i]
        assert f["flipped"] == draws[i]
        if not f["flipped"]:
            assert torch.equal(f["image"], p["image"]) and torch.equal(f["boxes"], p["boxes"])
            continue
        assert torch.equal(f["image"], p["image"].flip(-1))
        assert torch.equal(f["label"], p["label"].flip(-1))
        assert torch.equal(f["boxes"], flip_boxes(p["boxes"], 53))
        assert torch.equal(f["box_mask"], p["box_mask"].flip(-1))
    flipping.set_epoch(1)
    assert [flipping.flipped(i) for i in range(len(flipping))] != draws
    flipping.set_epoch(0)
    assert [flipping.flipped(i) for i in range(len(flipping))] == draws


def test_collate_layouts(seed):
    ds = SyntheticLayoutSet("val", _tiny(seed))
    b = collate_layouts([ds[i] for i in (3, 0, 7)])
    assert b["image"].shape == (3, 3, 37, 53) and b["label"].shape == (3, 37, 53)
    assert b["box_mask"].shape == (3, ds.num_classes, 37, 53) and b["index"].tolist() == [3, 0, 7]
    assert isinstance(b["boxes"], list) and torch.equal(b["boxes"][1], ds[0]["boxes"])
    with pytest.raises(ValueError, match="items"):
        collate_layouts([])


def test_boxes_to_mask_hand_example():
    boxes = torch.tensor([[1, 0, 0, 2, 3], [2, 1, 1, 4, 2], [1, 3, 2, 4, 3]])
    m = boxes_to_mask(boxes, 3, (3, 4))
    expect = torch.zeros(3, 3, 4, dtype=torch.bool)
    expect[1, 0:3, 0:2] = True
    expect[2, 1, 1:4] = True
    expect[1, 2, 3] = True
    assert torch.equal(m, expect)
    assert boxes_to_mask(torch.zeros(0, 5, dtype=torch.int64), 3, (3, 4)).sum() == 0


@pytest.mark.parametrize("boxes, match", [
    ([[1, 0, 0, 5, 2]], "outside the image"),
    ([[1, -1, 0, 2, 2]], "outside the image"),
    ([[1, 2, 0, 2, 2]], "empty box"),
    ([[1, 0, 2, 3, 1]], "empty box"),
    ([[3, 0, 0, 1, 1]], r"class id 3 is outside \[0, 3\)"),
    ([[1, 0, 0, 1]], r"\[n, 5\]"),
    ([[1.0, 0, 0, 1, 1]], "integers"),
])
def test_boxes_to_mask_errors(boxes, match):
    t = torch.tensor(boxes)
    with pytest.raises(ValueError, match=match):
        boxes_to_mask(t, 3, (3, 4))


def _write(tmp_path, doc, name="boxes.json"):
    p = tmp_path / name
    p.write_text(json.dumps(doc))
    return p


def test_read_boxes_json(tmp_path):
    p = _write(tmp_path, {"size": [64, 64], "boxes": [{"class": "car", "box": [3, 40, 20, 52]},
                                                      {"class": 10, "box": [30, 5, 50, 12]}]})
    boxes, size = read_boxes_json(p, CLASS_NAMES, FOREGROUND_CLASSES, size=(64, 64))
    assert size == (64, 64)
    assert boxes.tolist() == [[6, 3, 40, 20, 52], [10, 30, 5, 50, 12]]
    assert boxes_to_mask(boxes, 12, size)[6, 40:52, 3:20].all()


@pytest.mark.parametrize("doc, key, match", [
    ({"size": [64, 64], "boxes": [{"class": "unicorn", "box": [0, 0, 4, 4]}]}, "boxes[0]", "unknown class 'unicorn'"),
    ({"size": [64, 64], "boxes": [{"class": 99, "box": [0, 0, 4, 4]}]}, "boxes[0]", "unknown class id 99"),
    ({"size": [64, 64], "boxes": [{"class": "car", "box": [0, 0, 4, 4]}, {"class": "road", "box": [0, 0, 4, 4]}]},
     "boxes[1]", "'road' .* background class"),
    ({"size": [64, 64], "boxes": [{"class": "car", "box": [50, 50, 70, 60]}]}, "boxes[0]", "outside the image"),
    ({"size": [64, 64], "boxes": [{"class": "car", "box": [5, 5, 5, 9]}]}, "boxes[0]", "empty box"),
    ({"size": [64, 64], "boxes": [{"class": "car", "box": [5, 5, 9]}]}, "boxes[0]", "4 integers"),
    ({"size": [32, 64], "boxes": [{"class": "car", "box": [0, 0, 4, 4]}]}, "size", r"model works at"),
    ({"size": [64, 64], "boxes": []}, "boxes", "non-empty"),
    ({"boxes": []}, None, "expected an object"),
])
def test_read_boxes_json_errors(tmp_path, doc, key, match):
    p = _write(tmp_path, doc)
    with pytest.raises(DataError, match=match) as e:
        read_boxes_json(p, CLASS_NAMES, FOREGROUND_CLASSES, size=(64, 64))
    assert str(p) in str(e.value) and e.value.key == key


def test_read_boxes_json_bad_file(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text("{not json")
    with pytest.raises(DataError, match="cannot read JSON"):
        read_boxes_json(p, CLASS_NAMES, FOREGROUND_CLASSES)


def test_memory_bank_labels(seed):
    ds = SyntheticLayoutSet("train", _tiny(seed))
    labels, idx = memory_bank_labels(ds, 0.25, seed=seed)
    assert labels.dtype == torch.uint8 and labels.shape == (10, 37, 53)
    assert idx.dtype == torch.int64 and idx.tolist() == sorted(set(idx.tolist())) and len(idx) == 10
    for j, i in enumerate(idx.tolist()):
        assert torch.equal(labels[j].long(), ds[i]["label"] if not ds[i]["flipped"] else ds[i]["label"].flip(-1))
    again, idx2 = memory_bank_labels(ds, 0.25, seed=seed)
    assert torch.equal(idx, idx2) and torch.equal(labels, again)
    other = [memory_bank_labels(ds, 0.25, seed=seed + k)[1] for k in range(1, 4)]
    assert any(not torch.equal(idx, o) for o in other)
    assert len(memory_bank_labels(ds, 1.0)[1]) == 40
    queries = torch.tensor([idx[3].item(), 39 if 39 not in idx else -5, idx[0].item(), idx[-1].item()])
    expect = [3, -1, 0, len(idx) - 1]
    assert exclude_positions(idx, queries).tolist() == expect
    for bad in (0, -0.1, 1.5, True):
        with pytest.raises(ValueError, match="fraction"):
            memory_bank_labels(ds, bad)


class _ManyClasses(LayoutSet):
    num_classes, foreground_classes, class_names = 300, [299], [str(i) for i in range(300)]

    def __init__(self):
        super().__init__("train", (4, 5))

    def __len__(self):
        return 3

    def load(self, index):
        lab = np.full((4, 5), 280 + index, dtype=np.int64)
        lab[0, 0] = 255
        return np.zeros((4, 5, 3), np.uint8), lab, np.array([[299, 0, 0, 1, 1]])


def test_memory_bank_int16_beyond_255_classes():
    labels, idx = memory_bank_labels(_ManyClasses(), 1.0)
    assert labels.dtype == torch.int16 and labels[2, 1, 1] == 282 and labels[0, 0, 0] == 255


def test_instance_boxes_hand_example():
    ids = np.zeros((6, 8), dtype=np.int64)
    ids[:] = 7  # road (no instances)
    ids[1:3, 2:5] = 26001  # car 1
    ids[2:5, 4:6] = 26002  # car 2, overlapping rows
    ids[5, 6:8] = 24  # a crowd of persons: the bare class id
    ids[0, 7] = 11000 + 3  # an instance of a background class
    boxes = instance_boxes(ids, range(24, 34))
    assert boxes.tolist() == [[24, 6, 5, 8, 6], [26, 2, 1, 5, 3], [26, 4, 2, 6, 5]]


def test_connected_boxes_match_scipy(seed):
    ndimage = pytest.importorskip("scipy.ndimage")
    rng = np.random.default_rng(seed)
    for h, w, p in [(1, 1, 0.9), (7, 13, 0.3), (23, 17, 0.45), (40, 31, 0.55)]:
        mask = rng.random((h, w)) < p
        lab, n = ndimage.label(mask, structure=np.ones((3, 3)))
        expect = sorted((sl[1].start, sl[0].start, sl[1].stop, sl[0].stop) for sl in ndimage.find_objects(lab))
        got = sorted(map(tuple, connected_boxes(mask).tolist()))
        assert got == expect and len(got) == n


def test_region_boxes_area_rule():
    lab = np.zeros((20, 30), dtype=np.int64)
    lab[2:9, 3:10] = 21  # 7 x 7: (7-1)(7-1) = 36 >= 30 kept
    lab[12:18, 20:26] = 21  # 6 x 6: 25 < 30 dropped
    lab[9, 10] = 21  # diagonal neighbour of the first region: 8-connected, grows it to 8 x 8
    lab[0:20, 28:30] = 3  # stuff: never boxed
    boxes = region_boxes(lab, [21, 77], min_area=30)
    assert boxes.tolist() == [[21, 3, 2, 11, 10]]
    assert len(region_boxes(lab, [21], min_area=20)) == 2


@pytest.mark.slow
def test_synthetic_backgrounds_follow_boxes(seed):
    """The retrieval premise: the class map retrieved for a validation layout's boxes (fastvl.ops.layout_retrieval
    over a memory bank of training maps) agrees with the true background far more often than a random map."""
    from fastvl.ops import layout_retrieval

    cfg = SyntheticLayoutConfig(seed=seed, n_train=400, n_val=64)
    mem, _ = memory_bank_labels(SyntheticLayoutSet("train", cfg), 0.5, seed=seed)
    val = SyntheticLayoutSet("val", cfg)
    b = collate_layouts([val[i] for i in range(len(val))])
    _, index = layout_retrieval(b["box_mask"], mem, k=1)
    background = ~b["box_mask"].any(1)
    agree = ((mem[index[:, 0]].long() == b["label"]) & background).sum() / background.sum()
    g = torch.Generator().manual_seed(seed)
    rand = mem[torch.randint(len(mem), (len(val),), generator=g)].long()
    chance = ((rand == b["label"]) & background).sum() / background.sum()
    assert agree > chance + 0.15, (agree, chance)
