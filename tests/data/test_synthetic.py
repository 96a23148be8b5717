"""The synthetic corpus: deterministic, cached atomically, official formats, and grounded (captions <-> regions)."""

import json
import re

import numpy as np
import pytest

from fastvl.data import ImageDB, SyntheticConfig, TxtDB, WordPieceTokenizer, synthetic_corpus
from fastvl.data.synthetic import CLASSES, COLOURS, SIZES, _World, generate_scenes


def test_deterministic_from_seed(seed):
    cfg = SyntheticConfig(seed=seed % 1000, n_train_images=6, n_val_images=2, img_dim=8, n_classes=4)
    a, b = generate_scenes(cfg, "train"), generate_scenes(cfg, "train")
    for (na, da, ca), (nb, db, cb) in zip(a, b):
        assert na == nb and ca == cb
        assert all(np.array_equal(da[k], db[k]) for k in da)
    other = generate_scenes(SyntheticConfig(seed=seed % 1000 + 1, n_train_images=6, img_dim=8, n_classes=4), "train")
    assert [c for *_, c in other] != [c for *_, c in a]
    val = generate_scenes(cfg, "val")
    assert {n for n, *_ in val}.isdisjoint({n for n, *_ in a})


def test_written_in_official_formats(tiny_corpus, tiny_config):
    c, TINY = tiny_corpus, tiny_config
    info = json.loads((c.root / "corpus.json").read_text())
    assert info["img_dim"] == TINY.img_dim and info["img_label_dim"] == TINY.n_classes + 1
    img = ImageDB(c.img_db)
    assert (img.conf_th, img.max_bb, img.min_bb) == (0.2, TINY.max_objects, TINY.min_objects)
    assert len(img) == TINY.n_train_images + TINY.n_val_images
    train, val = TxtDB(c.txt_train, -1), TxtDB(c.txt_val, -1)
    assert len(train) == TINY.n_train_images * TINY.captions_per_image
    assert len(val) == TINY.n_val_images * TINY.captions_per_image
    assert set(train.txt2img.values()).isdisjoint(val.txt2img.values())  # held-out images
    assert (train.cls, train.sep, train.mask, train.unk) == (101, 102, 103, 100)
    assert train.vocab_size == c.vocab_size == WordPieceTokenizer(c.vocab_file).vocab_size
    tok = WordPieceTokenizer(c.vocab_file)
    for id_ in train.ids[:10]:
        ex = train[id_]
        assert ex["input_ids"] == tok.encode(ex["sent"]) and 100 not in ex["input_ids"]
        assert ex["img_fname"] in img


def test_cache_is_reused_and_atomic(tmp_path):
    cfg = SyntheticConfig(seed=1, n_train_images=4, n_val_images=2, img_dim=8, n_classes=4)
    a = synthetic_corpus(tmp_path, cfg)
    stamp = (a.root / "corpus.json").stat().st_mtime_ns
    b = synthetic_corpus(tmp_path, cfg)
    assert b.root == a.root and (b.root / "corpus.json").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [a.root.name]  # no temp folders left behind
    other = synthetic_corpus(tmp_path, SyntheticConfig(seed=2, n_train_images=4, n_val_images=2, img_dim=8,
                                                       n_classes=4))
    assert other.root != a.root
    # a half-written folder (no corpus.json) is replaced, not trusted
    (a.root / "corpus.json").unlink()
    c = synthetic_corpus(tmp_path, cfg)
    assert (c.root / "corpus.json").is_file() and TxtDB(c.txt_train, -1).ids


def test_regions_carry_the_scene():
    """Soft labels peak on the true class, clutter falls under the confidence threshold, features sit nearest
    their class prototype, and captions mention every object with its attributes."""
    cfg = SyntheticConfig(seed=5, n_train_images=60, n_val_images=1, img_dim=32, n_classes=8)
    world = _World(cfg)
    n_obj = n_right = 0
    for _, dump, caps in generate_scenes(cfg, "train"):
        keep = dump["conf"] > cfg.conf_th
        assert keep.sum() >= cfg.min_objects and np.all(np.diff(dump["conf"]) <= 0)  # sorted by confidence
        soft = dump["soft_labels"]
        np.testing.assert_allclose(soft.sum(1), 1.0, rtol=1e-5)
        assert np.all(soft[~keep].argmax(1) == 0)  # clutter: background
        cls = soft[keep, 1:].argmax(1)
        assert len(set(cls)) == len(cls)  # distinct classes per scene
        # nearest prototype (after removing the best attribute directions) recovers the class
        feats = dump["features"][keep]
        for f, k in zip(feats, cls):
            resid = [min(np.linalg.norm(f - p - cd - sd) for cd in world.colour_dir for sd in world.size_dir)
                     for p in world.proto]
            n_right += int(np.argmin(resid) == k)
            n_obj += 1
        bb = dump["norm_bb"]
        np.testing.assert_allclose(bb[:, 4], bb[:, 2] - bb[:, 0], atol=1e-6)
        np.testing.assert_allclose(bb[:, 5], bb[:, 3] - bb[:, 1], atol=1e-6)
        for cap in caps:
            words = cap.split()
            assert sum(w in CLASSES for w in words if w not in ("the",)) >= len(cls)
            for k in cls:
                m = re.search(rf"\b(\w+) (\w+) {CLASSES[k]}\b", cap)
                assert m and m.group(1) in SIZES and m.group(2) in COLOURS, cap
    assert n_right == n_obj


def test_config_validation():
    with pytest.raises(ValueError, match="n_classes"):
        SyntheticConfig(n_classes=99)
    with pytest.raises(ValueError, match="max_objects"):
        SyntheticConfig(min_objects=3, max_objects=2)
    with pytest.raises(ValueError, match="img_dim"):
        SyntheticConfig(img_dim=2)
