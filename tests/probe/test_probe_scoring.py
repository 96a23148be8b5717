"""Each probe's scoring against a hand-computed small example."""

import math

import numpy as np
import pytest

from fastvl.probe.scoring import (
    bin_values,
    box_pair_features,
    cross_modal_flags,
    fusion_nmi,
    joint_blocks,
    linear_probe,
    modality_mass,
    nmi,
    phrase_region_features,
    region_pair_features,
    relation_slot_features,
)


def _entropy(p):
    return -sum(x * math.log(x) for x in p if x > 0)


def test_nmi_hand_computed():
    assert nmi([0, 0, 1, 1], [1, 1, 0, 0]) == pytest.approx(1.0)
    assert nmi([0, 0, 1, 1], [0, 1, 0, 1]) == pytest.approx(0.0, abs=1e-12)
    # a = [0,0,0,1], b = [0,0,1,1]: joint (0,0) 1/2, (0,1) 1/4, (1,1) 1/4
    mi = 0.5 * math.log(0.5 / (0.75 * 0.5)) + 0.25 * math.log(0.25 / (0.75 * 0.5)) + 0.25 * math.log(
        0.25 / (0.25 * 0.5))
    want = mi / ((_entropy([0.75, 0.25]) + _entropy([0.5, 0.5])) / 2)
    assert nmi([0, 0, 0, 1], [0, 0, 1, 1]) == pytest.approx(want, rel=1e-12)


def test_fusion_nmi_hand_computed(seed):
    rng = np.random.default_rng(seed)
    # separate modalities -> the two clusters are the modalities -> NMI 1
    text = rng.normal(0, 0.01, (5, 3))
    img = rng.normal(0, 0.01, (3, 3)) + 10.0
    modality = np.r_[np.zeros(5), np.ones(3)]
    assert fusion_nmi(np.r_[text, img], modality, seed) == pytest.approx(1.0)
    # clusters {t, t, t, i} and {i, i, i, t}... here: cluster A holds tokens 0,1,2 (text) + 5 (image),
    # cluster B holds 3 (text) + 4 (image): contingency [[3, 1], [1, 1]] / 6 (rows text/image, cols A/B)
    pts = np.array([[0, 0], [0, 0.01], [0.01, 0], [9, 9], [9, 9.01], [0.01, 0.01]])
    mod = np.array([0, 0, 0, 0, 1, 1])
    joint = np.array([[3, 1], [1, 1]]) / 6
    pa, pb = joint.sum(1), joint.sum(0)
    mi = sum(joint[i, j] * math.log(joint[i, j] / (pa[i] * pb[j])) for i in range(2) for j in range(2))
    want = mi / ((_entropy(pa) + _entropy(pb)) / 2)
    assert fusion_nmi(pts, mod, seed) == pytest.approx(want, rel=1e-9)
    with pytest.raises(ValueError, match="both modalities"):
        fusion_nmi(pts, np.zeros(6), seed)


def _attn():
    """1 layer, 2 heads, 2 text tokens ([CLS], w) + 2 regions; rows sum to 1."""
    a = np.zeros((1, 2, 4, 4))
    a[0, 0] = [[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25], [0.6, 0.1, 0.2, 0.1], [0.1, 0.1, 0.4, 0.4]]
    a[0, 1] = [[0.7, 0.2, 0.05, 0.05], [0.1, 0.1, 0.1, 0.7], [0.2, 0.2, 0.3, 0.3], [0.3, 0.1, 0.3, 0.3]]
    return a


def test_modality_mass_hand_computed():
    text, image = modality_mass(_attn(), txt_len=2)
    np.testing.assert_allclose(text, [[0.3, 0.9]])
    np.testing.assert_allclose(image, [[0.7, 0.1]])


def test_cross_modal_flags_hand_computed():
    i2t, t2i = cross_modal_flags(_attn(), txt_len=2, threshold=0.5)
    # head 0: region 2 puts 0.7 on text -> image->text; text rows put 0.7, 0.5 on regions -> 0.7 > 0.5
    # head 1: regions put 0.4, 0.4 on text -> no; text row 1 puts 0.8 on regions -> yes
    np.testing.assert_array_equal(i2t, [[True, False]])
    np.testing.assert_array_equal(t2i, [[True, True]])
    i2t, t2i = cross_modal_flags(_attn(), txt_len=2, threshold=0.75)
    np.testing.assert_array_equal(i2t, [[False, False]])
    np.testing.assert_array_equal(t2i, [[False, True]])


def test_pair_features_hand_computed():
    t2i, i2t, i2i = joint_blocks(_attn(), 2)
    assert t2i.shape == (1, 2, 2, 2) and i2t.shape == (1, 2, 2, 2) and i2i.shape == (1, 2, 2, 2)
    # phrase = text token 1 only, region 1 (joint index 3): p->r = a[.., 1, 3]; r->p = a[.., 3, 1]
    np.testing.assert_allclose(phrase_region_features(t2i, i2t, (1, 2), 1), [0.25, 0.7, 0.1, 0.1])
    # phrase = tokens 0..1, region 0 (joint 2): mean of a[.., 0:2, 2], sum of a[.., 2, 0:2]
    np.testing.assert_allclose(phrase_region_features(t2i, i2t, (0, 2), 0), [0.275, 0.075, 0.7, 0.4])
    # subject region 0 (joint 2) -> object region 1 (joint 3), then back
    np.testing.assert_allclose(region_pair_features(i2i, 0, 1), [0.1, 0.3, 0.4, 0.3])


def test_relation_features_hand_computed():
    t2i, i2t, _ = joint_blocks(_attn(), 2)
    # the relation's [MASK] slot = text token 1; subject region 1 (joint 3), object region 0 (joint 2); per head:
    # slot -> subject a[.., 1, 3], slot -> object a[.., 1, 2], subject -> slot a[.., 3, 1], object -> slot a[.., 2, 1]
    np.testing.assert_allclose(relation_slot_features(t2i, i2t, 1, 1, 0),
                               [0.25, 0.7, 0.25, 0.1, 0.1, 0.1, 0.1, 0.2])
    # the floor: input position features (x1, y1, x2, y2, w, h, area) of the subject, then of the object
    pos = np.arange(21.0).reshape(3, 7)
    np.testing.assert_array_equal(box_pair_features(pos, 2, 0), [14, 15, 16, 17, 18, 19, 20, 0, 1, 2, 3, 4, 5, 6])


def test_relation_probe_reads_heads_that_select_by_direction(seed):
    """The relation probe is not blind to geometry: heads whose attention picks a region by where it is (one head
    prefers the leftmost region, one the topmost: softmax over keys of -4 x and of -4 y) decode the stated predicate
    (by the dominant axis of the centre offset, as the synthetic captions state it) almost perfectly, while
    attention that ignores the boxes (uniform) gives a constant prediction: the majority class, or one tied with it
    in a training fold (so up to a row or two per fold better or worse)."""
    rng = np.random.default_rng(seed)
    rows, labels = [], []
    for _ in range(240):
        centres = rng.uniform(0, 1, (2, 2))  # [regions, (x, y)]: subject 0, object 1
        dx, dy = centres[0] - centres[1]
        if abs(dx) >= abs(dy):
            labels.append("left of" if dx < 0 else "right of")
        else:
            labels.append("above" if dy < 0 else "below")
        logits = -4.0 * centres.T  # [heads (x, y), keys]
        att = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
        i2i = np.broadcast_to(att[None, :, None, :], (1, 2, 2, 2))  # [layers, heads, queries, keys]
        rows.append(region_pair_features(i2i, 0, 1))
    assert linear_probe(np.stack(rows), labels, seed=seed)["accuracy"] >= 0.85
    flat = linear_probe(np.full((len(rows), 4), 0.5), labels, seed=seed)  # uniform attention: every feature 0.5
    assert flat["accuracy"] <= flat["majority"] + 0.05


def test_linear_probe_hand_computed(seed):
    rng = np.random.default_rng(seed)
    # separable along one feature -> every fold perfect
    y = ["a"] * 60 + ["b"] * 40
    x = np.c_[np.r_[np.zeros(60), np.ones(40)] * 4 + rng.normal(0, 0.1, 100), rng.normal(0, 0.1, 100)]
    r = linear_probe(x, y, seed=seed, folds=2)
    assert r["accuracy"] == 1.0 and r["folds"] == 2 and r["classes"] == {"a": 60, "b": 40}
    # constant features -> the probe predicts the training majority 'a': 3 of 5 in each stratified fold
    y = ["a"] * 6 + ["b"] * 4
    r = linear_probe(np.ones((10, 3)), y, seed=seed, folds=2)
    assert r["accuracy"] == pytest.approx(0.6) and r["majority"] == pytest.approx(0.6)
    # groups: 5 images of 2 rows each (labels a b a b a per image) -> folds limited by the 4 'b' rows
    g = [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    r = linear_probe(np.ones((10, 2)), ["a", "a", "b", "b", "a", "a", "b", "b", "a", "a"], groups=g, seed=seed,
                     folds=5)
    assert r["folds"] == 4
    x = x[:10]
    assert linear_probe(x, ["a"] * 10)["skipped"] == "one class only"
    assert "too few" in linear_probe(x, ["a"] * 9 + ["b"])["skipped"]
    with pytest.raises(ValueError, match="features"):
        linear_probe(np.ones(10), y)


def test_bin_values():
    assert bin_values(["yes", "no"]) == ["yes", "no"]
    assert bin_values(["1", "2", "1"]) == ["1", "2", "1"]
    vals = [str(v) for v in range(1, 13)]
    bins = bin_values(vals)
    assert bins == ["q0"] * 4 + ["q1"] * 4 + ["q2"] * 4
