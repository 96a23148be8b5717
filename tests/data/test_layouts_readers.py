"""Cityscapes and ADE20K layout readers on tiny files written in the public formats."""

import numpy as np
import pytest
import torch
from PIL import Image

from fastvl.data import DataError
from fastvl.data.layouts import (
    ADE20K_FOREGROUND,
    ADE20K_STUFF,
    ADE20KLayoutSet,
    CityscapesLayoutSet,
    boxes_to_mask,
    memory_bank_labels,
)


def _png(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _cityscapes(root, rng, split="train", city="aachen", n=2, h=40, w=60):
    """n frames; frame k: sky / road, car instances 26001 + 26002, a person crowd (bare id 24)."""
    for k in range(n):
        stem = f"{city}_{k:06d}_000019"
        lab = np.full((h, w), 23, dtype=np.uint8)
        lab[h // 2:] = 7
        inst = lab.astype(np.int32)
        inst[4:10, 6:16] = 26001
        inst[20:30, 10 + k:24] = 26002
        inst[30:36, 40:50] = 24
        lab[inst == 26001] = 26
        lab[inst == 26002] = 26
        lab[inst == 24] = 24
        lab[0, 0] = 255  # an ignore pixel
        gt = root / "gtFine" / split / city
        _png(gt / f"{stem}_gtFine_labelIds.png", lab)
        _png(gt / f"{stem}_gtFine_instanceIds.png", inst.astype(np.uint16))
        _png(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png",
             rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_cityscapes_reader(tmp_path, seed):
    rng = np.random.default_rng(seed)
    _cityscapes(tmp_path, rng)
    ds = CityscapesLayoutSet(tmp_path, "train", size=(40, 60), flip=False)
    assert len(ds) == 2 and ds.num_classes == 35 and ds.foreground_classes == list(range(24, 34))
    it = ds[0]
    assert it["image"].shape == (3, 40, 60) and it["label"].shape == (40, 60) and it["label"][0, 0] == 255
    assert it["boxes"].tolist() == [[24, 40, 30, 50, 36], [26, 6, 4, 16, 10], [26, 10, 20, 24, 30]]
    assert torch.equal(it["box_mask"], boxes_to_mask(it["boxes"], 35, (40, 60)))
    # the image is the file's, scaled to [-1, 1]
    stem = ds.files[0][0]
    raw = torch.from_numpy(np.array(Image.open(stem))).permute(2, 0, 1).float() / 127.5 - 1
    assert torch.allclose(it["image"], raw)


def test_cityscapes_resize_nearest(tmp_path, seed):
    _cityscapes(tmp_path, np.random.default_rng(seed))
    ds = CityscapesLayoutSet(tmp_path, "train", size=(20, 30), flip=False)
    it = ds[1]
    # halving with nearest reads the odd source pixels: source rows [a, b) -> rows i with a <= 2i+1 < b
    assert it["boxes"].tolist() == [[24, 20, 15, 25, 18], [26, 3, 2, 8, 5], [26, 5, 10, 12, 15]]
    full = CityscapesLayoutSet(tmp_path, "train", size=(40, 60), flip=False)[1]["label"]
    assert torch.equal(it["label"], full[1::2, 1::2])  # labels never interpolated
    assert it["image"].shape == (3, 20, 30)
    mem, idx = memory_bank_labels(ds, 1.0)
    assert mem.dtype == torch.uint8 and torch.equal(mem[1].long(), it["label"])


def test_cityscapes_flip(tmp_path, seed):
    _cityscapes(tmp_path, np.random.default_rng(seed), n=1)
    plain = CityscapesLayoutSet(tmp_path, "train", size=(40, 60), flip=False)[0]
    ds = CityscapesLayoutSet(tmp_path, "train", size=(40, 60), seed=seed)
    epochs = []
    for e in range(12):
        ds.set_epoch(e)
        it = ds[0]
        epochs.append(it["flipped"])
        ref = {k: plain[k].flip(-1) if it["flipped"] else plain[k] for k in ("image", "label", "box_mask")}
        for k, v in ref.items():
            assert torch.equal(it[k], v)
        assert torch.equal(it["box_mask"], boxes_to_mask(it["boxes"], 35, (40, 60)))
    assert any(epochs) and not all(epochs)


def test_cityscapes_errors(tmp_path, seed):
    with pytest.raises(DataError, match="no folder gtFine/train"):
        CityscapesLayoutSet(tmp_path, "train")
    rng = np.random.default_rng(seed)
    _cityscapes(tmp_path, rng)
    img = next((tmp_path / "leftImg8bit" / "train").rglob("*.png"))
    img.unlink()
    with pytest.raises(DataError, match="missing leftImg8bit/train/aachen/.*_leftImg8bit.png"):
        CityscapesLayoutSet(tmp_path, "train")
    _cityscapes(tmp_path, rng)
    lab_p = next((tmp_path / "gtFine" / "train").rglob("*_labelIds.png"))
    bad = np.array(Image.open(lab_p))
    bad[3, 3] = 40
    _png(lab_p, bad)
    ds = CityscapesLayoutSet(tmp_path, "train", size=(40, 60))
    with pytest.raises(DataError, match=r"class ids \[40\] outside \[0, 35\)") as e:
        ds[0]
    assert lab_p.name in str(e.value)
    with pytest.raises(ValueError, match="split"):
        CityscapesLayoutSet(tmp_path, "training")


def _ade(root, rng, split="training", tag="train", n=2, h=48, w=40):
    for k in range(1, n + 1):
        lab = np.zeros((h, w), dtype=np.uint8)  # 0 = unlabeled
        lab[:20] = 3  # sky (stuff)
        lab[20:] = 7  # road (stuff)
        lab[24:32, 2:12] = 21  # car region A: 10 x 8 -> (9)(7) = 63 kept
        lab[34:44, 20:28 + k] = 21  # car region B
        lab[44, 28 + k] = 21  # touches B diagonally: same region (8-connected)
        lab[5:9, 30:35] = 91  # airplane: 5 x 4 -> (4)(3) = 12 < 30 dropped
        lab[10:19, 25:33] = 13  # person: 8 x 9 -> (7)(8) = 56 kept
        name = f"ADE_{tag}_{k:08d}"
        _png(root / "annotations" / split / f"{name}.png", lab)
        jpg = root / "images" / split / f"{name}.jpg"
        jpg.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(jpg)


def test_ade20k_classes():
    assert len(ADE20K_FOREGROUND) == 115 and len(ADE20K_STUFF) == 35
    assert not set(ADE20K_FOREGROUND) & set(ADE20K_STUFF) and set(ADE20K_FOREGROUND) | set(ADE20K_STUFF) == set(
        range(1, 151))
    for fg in (13, 21, 77, 91):  # person, car, boat, airplane
        assert fg in ADE20K_FOREGROUND
    for stuff in (1, 3, 7, 10, 22):  # wall, sky, road, grass, water
        assert stuff in ADE20K_STUFF


def test_ade20k_reader(tmp_path, seed):
    _ade(tmp_path, np.random.default_rng(seed))
    _ade(tmp_path, np.random.default_rng(seed), "validation", "val", n=1)
    ds = ADE20KLayoutSet(tmp_path, "train", size=(48, 40), flip=False)
    assert len(ds) == 2 and ds.num_classes == 151 and ds.class_names[21] == "car"
    it = ds[1]
    assert it["label"].shape == (48, 40) and set(it["label"].unique().tolist()) == {3, 7, 13, 21, 91}
    assert it["boxes"].tolist() == [[13, 25, 10, 33, 19], [21, 2, 24, 12, 32], [21, 20, 34, 31, 45]]
    assert torch.equal(it["box_mask"], boxes_to_mask(it["boxes"], 151, (48, 40)))
    assert it["image"].shape == (3, 48, 40)
    val = ADE20KLayoutSet(tmp_path, "val", size=(24, 20))
    assert len(val) == 1 and not val.flip and val[0]["label"].shape == (24, 20)
    assert ADE20KLayoutSet(tmp_path, "train", size=(48, 40), min_box_area=10)[1]["boxes"].shape[0] == 4
    only_car = ADE20KLayoutSet(tmp_path, "train", size=(48, 40), foreground_classes=[21])[0]
    assert set(only_car["boxes"][:, 0].tolist()) == {21}


def test_ade20k_errors(tmp_path, seed):
    with pytest.raises(DataError, match="no folder annotations/training"):
        ADE20KLayoutSet(tmp_path, "train")
    _ade(tmp_path, np.random.default_rng(seed))
    (tmp_path / "images" / "training" / "ADE_train_00000002.jpg").unlink()
    with pytest.raises(DataError, match="missing images/training/ADE_train_00000002.jpg"):
        ADE20KLayoutSet(tmp_path, "train")
    with pytest.raises(ValueError, match="foreground_classes"):
        ADE20KLayoutSet(tmp_path, "train", foreground_classes=[0, 21])
