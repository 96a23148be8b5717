"""Grounding annotations: the synthetic corpus's ground truth, and Flickr30k Entities / Visual Genome files in their
public formats (tiny files written here), with clear errors for annotations naming things that do not exist."""

import json

import numpy as np
import pytest

from fastvl.data import DataError, SyntheticConfig, synthetic_corpus
from fastvl.data.probe_annotations import (
    GroundedCaption,
    Phrase,
    Relation,
    box_iou,
    check_grounding,
    flickr30k_grounding,
    read_flickr30k_sentences,
    read_vg_relationships,
    synthetic_grounding,
    vg_relations,
)
from fastvl.data.synthetic import CLASSES, COLOURS, SIZES

SENTENCES = (
    "[/EN#10/people A young man] in [/EN#11/clothing/other a red shirt] throws [/EN#12/other a ball] .\n"
    "[/EN#10/people Someone] plays near [/EN#0/notvisual the water] and [/EN#13/scene a park] .\n"
)

XML = """<annotation><filename>42.jpg</filename><size><width>200</width><height>100</height><depth>3</depth></size>
<object><name>10</name><bndbox><xmin>10</xmin><ymin>10</ymin><xmax>60</xmax><ymax>90</ymax></bndbox></object>
<object><name>11</name><name>10</name><bndbox><xmin>20</xmin><ymin>30</ymin><xmax>50</xmax><ymax>60</ymax></bndbox>
</object>
<object><name>12</name><bndbox><xmin>150</xmin><ymin>10</ymin><xmax>180</xmax><ymax>40</ymax></bndbox></object>
<object><name>13</name><scene>1</scene></object>
</annotation>"""

# detector regions, normalised x1 y1 x2 y2 w h: 0 ~ entity 10's big box, 1 ~ entity 11, 2 ~ entity 12, 3 elsewhere
NORM_BB = np.array([[0.05, 0.1, 0.3, 0.9, 0.25, 0.8], [0.1, 0.3, 0.25, 0.6, 0.15, 0.3],
                    [0.75, 0.1, 0.9, 0.4, 0.15, 0.3], [0.4, 0.5, 0.6, 0.9, 0.2, 0.4]], np.float32)


def test_flickr30k_sentences_and_boxes(tmp_path):
    (tmp_path / "42.txt").write_text(SENTENCES)
    (tmp_path / "42.xml").write_text(XML)
    sents = read_flickr30k_sentences(tmp_path / "42.txt")
    assert sents[0]["words"] == "A young man in a red shirt throws a ball .".split()
    assert sents[0]["phrases"][1] == {"start": 4, "end": 7, "entity": "11", "types": ["clothing", "other"]}
    caps = flickr30k_grounding(tmp_path / "42.txt", tmp_path / "42.xml", NORM_BB, "42.jpg")
    p = caps[0].phrases
    # entity 10 has two boxes (its own and the one shared with 11): regions 0 and 1; 11 -> 1; 12 -> 2
    assert [(x.start, x.end, x.regions, x.type) for x in p] == [(0, 3, [0, 1], "people"), (4, 7, [1], "clothing"),
                                                                (8, 10, [2], "other")]
    # 'the water' (entity 0, notvisual) is not grounded; the scene entity has no box -> no regions
    assert [(x.entity, x.regions) for x in caps[1].phrases] == [("10", [0, 1]), ("13", [])]
    assert caps[1].properties == {"length": "9"}  # Someone plays near the water and a park .


def test_flickr30k_errors(tmp_path):
    (tmp_path / "42.xml").write_text(XML)
    (tmp_path / "bad.txt").write_text("[/EN#99/people A man] waves .\n")
    with pytest.raises(DataError, match=r"bad.txt.*line 1.*'A man' names entity 99 which 42.xml does not list"):
        flickr30k_grounding(tmp_path / "bad.txt", tmp_path / "42.xml", NORM_BB, "42.jpg")
    (tmp_path / "broken.txt").write_text("[/EN#10/people A man waves .\n")
    with pytest.raises(DataError, match="line 1.*malformed entity markup"):
        read_flickr30k_sentences(tmp_path / "broken.txt")
    (tmp_path / "out.xml").write_text(XML.replace("<xmax>180</xmax>", "<xmax>380</xmax>"))
    with pytest.raises(DataError, match="outside the 200x100 image"):
        flickr30k_grounding(tmp_path / "bad.txt", tmp_path / "out.xml", NORM_BB, "42.jpg")
    with pytest.raises(DataError, match="does not exist"):
        read_flickr30k_sentences(tmp_path / "missing.txt")


def test_vg_relationships(tmp_path):
    rels = [{"image_id": 7, "relationships": [
        {"relationship_id": 1, "predicate": "Holding", "subject": {"object_id": 5, "x": 10, "y": 10, "w": 50, "h": 80,
                                                                   "names": ["man"]},
         "object": {"object_id": 6, "x": 150, "y": 10, "w": 30, "h": 30, "name": "ball"}},
        {"relationship_id": 2, "predicate": "near", "subject": {"object_id": 6, "x": 150, "y": 10, "w": 30, "h": 30},
         "object": {"object_id": 8, "x": 0, "y": 0, "w": 5, "h": 5}}]}]
    (tmp_path / "relationships.json").write_text(json.dumps(rels))
    got = read_vg_relationships(tmp_path / "relationships.json")
    assert got["7"][0]["predicate"] == "holding" and got["7"][0]["subject_name"] == "man"
    assert got["7"][0]["object"] == [150.0, 10.0, 180.0, 40.0]
    # the second relationship's object overlaps no region -> left out
    assert vg_relations(got["7"], NORM_BB, 200, 100) == [Relation(0, 2, "holding")]
    rels[0]["relationships"][1]["object"] = {"object_id": 8, "names": ["tree"]}
    (tmp_path / "bad.json").write_text(json.dumps(rels))
    with pytest.raises(DataError, match="image 7 relationship 2.*object has no box"):
        read_vg_relationships(tmp_path / "bad.json")
    with pytest.raises(DataError, match="image 7 relationship 1.*outside the 100x50 image"):
        vg_relations(got["7"], NORM_BB, 100, 50, image_id="7")


def test_check_grounding_errors():
    cap = GroundedCaption("c1", "img.npz", "a red cup".split(), [Phrase(0, 3, [0])], [Relation(0, 1, "left of")])
    check_grounding(cap, 2)
    with pytest.raises(DataError, match="c1.*relation 0 .*object region 1 but image img.npz has 1 regions"):
        check_grounding(cap, 1)
    cap.phrases = [Phrase(1, 5, [0])]
    with pytest.raises(DataError, match="phrase 0 spans words \\[1, 5\\) but the caption has 3 words"):
        check_grounding(cap, 2)
    cap.phrases = [Phrase(0, 3, [4])]
    with pytest.raises(DataError, match="phrase 0 \\('a red cup'\\) names region 4 but image img.npz has 2"):
        check_grounding(cap, 2)


def test_box_iou():
    a = np.array([[0, 0, 2, 2]])
    b = np.array([[1, 1, 3, 3], [0, 0, 2, 2], [5, 5, 6, 6]])
    np.testing.assert_allclose(box_iou(a, b), [[1 / 7, 1.0, 0.0]])


def test_synthetic_ground_truth(tmp_path):
    cfg = SyntheticConfig(n_train_images=4, n_val_images=30, seed=3)
    corpus = synthetic_corpus(tmp_path, cfg)
    n = stated = 0
    for cap, rec in synthetic_grounding(corpus.txt_val, corpus.img_db, cfg.n_classes):
        n += 1
        classes = rec.soft_labels[:, 1:].argmax(1)
        named = [w for w in cap.words if w in CLASSES[:cfg.n_classes]]
        assert len(cap.phrases) == len({w for w in named})  # every object mentioned once as a phrase
        for p in cap.phrases:
            words = cap.words[p.start:p.end]
            assert words[0] in ("a", "an") and words[1] in SIZES and words[2] in COLOURS
            assert CLASSES[int(classes[p.regions[0]])] == words[3]
        cx = (rec.norm_bb[:, 0] + rec.norm_bb[:, 2]) / 2
        cy = (rec.norm_bb[:, 1] + rec.norm_bb[:, 3]) / 2
        for r in cap.relations:
            if r.source == "caption":  # "<subject phrase> left of the <object class>", stated by words start..end-1
                stated += 1
                assert cap.words[r.start:r.end] == r.predicate.split() and cap.words[r.end] == "the"
                assert [p for p in cap.phrases if p.end == r.start][0].regions == [r.subject]
                assert CLASSES[int(classes[r.object])] == cap.words[r.end + 1]
                assert r.predicate in [d.predicate for d in cap.relations if d.source == "derived"
                                       and (d.subject, d.object) == (r.subject, r.object)]  # true of the boxes here
                continue
            assert r.source == "derived"
            dx, dy = cx[r.subject] - cx[r.object], cy[r.subject] - cy[r.object]
            if r.predicate in ("left of", "right of"):
                assert abs(dx) >= abs(dy) and (dx < 0) == (r.predicate == "left of")
            elif r.predicate in ("above", "below"):
                assert abs(dy) > abs(dx) and (dy < 0) == (r.predicate == "above")
            else:
                assert r.predicate == "bigger than"
                area = (rec.norm_bb[:, 2] - rec.norm_bb[:, 0]) * (rec.norm_bb[:, 3] - rec.norm_bb[:, 1])
                assert area[r.subject] > area[r.object]
        assert cap.properties["length"] == str(len(cap.words))
        assert cap.properties["objects"] == str(len(cap.phrases))
        assert cap.properties["opening"] == ("yes" if " ".join(cap.words).startswith(
            ("there is", "we see", "here is", "the image has")) else "no")
    assert n == 60 and stated > 0
    # every stated relation is found: one per relation clause
    assert stated == sum(" ".join(c.words).count(f" {w} the ") for c, _ in synthetic_grounding(
        corpus.txt_val, corpus.img_db, cfg.n_classes) for w in ("left of", "right of", "above", "below"))


def test_stated_relation_errors():
    cap = GroundedCaption("c1", "img.npz", "a cup left of the ball".split(), [Phrase(0, 2, [0]), Phrase(4, 6, [1])],
                          [Relation(0, 1, "left of", "caption", 2, 7)])
    with pytest.raises(DataError, match=r"c1.*relation 0 \('left of'\) is stated by words \[2, 7\) but the "
                                        r"caption has 6 words"):
        check_grounding(cap, 2)
    cap.relations = [Relation(0, 1, "left of", "heard")]
    with pytest.raises(DataError, match="relation 0 .* source 'heard'; expected 'annotation', 'caption' or"):
        check_grounding(cap, 2)
