"""The suite on annotations from the public formats: Flickr30k Entities phrases and Visual Genome relations go through
the same examples, views and probes as the synthetic corpus."""

import json

import numpy as np
import pytest
import torch
from test_probe_annotations import NORM_BB, SENTENCES, XML

from fastvl.data import WordPieceTokenizer, position_features, synthetic_corpus
from fastvl.data.probe_annotations import (
    GroundedCaption,
    Phrase,
    Relation,
    flickr30k_grounding,
    read_vg_relationships,
    vg_relations,
)
from fastvl.models.uniter import UniterForPretraining, UniterModel
from fastvl.models.uniter.testing import tiny_config
from fastvl.probe import (
    ProbeSettings,
    attention_maps,
    collect,
    hidden_states,
    make_example,
    official_batch,
    score,
)
from fastvl.probe.dataset import mask_stated_relations
from fastvl.probe.scoring import (
    box_pair_features,
    joint_blocks,
    phrase_region_features,
    region_pair_features,
    relation_slot_features,
)


def test_public_formats_through_the_suite(tmp_path, seed):
    (tmp_path / "42.txt").write_text(SENTENCES * 3)
    (tmp_path / "42.xml").write_text(XML)
    rels = [{"image_id": 42, "relationships": [
        {"relationship_id": 1, "predicate": "near", "subject": {"x": 10, "y": 10, "w": 50, "h": 80},
         "object": {"x": 150, "y": 10, "w": 30, "h": 30}},
        {"relationship_id": 2, "predicate": "wears", "subject": {"x": 10, "y": 10, "w": 50, "h": 80},
         "object": {"x": 20, "y": 30, "w": 30, "h": 30}}]}]
    (tmp_path / "rel.json").write_text(json.dumps(rels))
    relations = vg_relations(read_vg_relationships(tmp_path / "rel.json")["42"], NORM_BB, 200, 100)
    caps = flickr30k_grounding(tmp_path / "42.txt", tmp_path / "42.xml", NORM_BB, "42.jpg")
    corpus = synthetic_corpus()
    tok = WordPieceTokenizer(corpus.vocab_file)  # any WordPiece vocab: unknown words become [UNK]
    cfg = tiny_config(vocab_size=corpus.vocab_size, img_dim=12)
    model = UniterModel(cfg, cfg.img_dim).eval()
    feats = np.random.default_rng(seed).normal(size=(len(NORM_BB), cfg.img_dim)).astype(np.float32)
    examples = []
    for k, cap in enumerate(caps):
        cap.relations = list(relations)
        cap.img_fname = f"img{k}"  # one group per caption, so the probes have folds
        examples.append(make_example(cap, feats, NORM_BB, tok))
    s = ProbeSettings(batch_size=4, folds=2, negatives_per_phrase=0)
    c = collect(model, examples, s)
    # sentence 0 has 3 grounded phrases: entity 10 (regions 0, 1), 11 (region 1), 12 (region 2), each against all 4
    # regions; sentence 1 has entity 10 (regions 0, 1) and a boxless scene entity (no rows): 3 * (12 + 4) rows
    assert len(c.coref_y) == 3 * 16 and sum(c.coref_y) == 3 * 6
    # the first row: 'A young man' (words 0..2 -> tokens from 1) against region 0, from the joint map's blocks
    e = examples[0]
    span = e.phrase_tokens(0, 3)
    assert span[0] == 1
    att = attention_maps(model, official_batch([e])).numpy()[:, 0]
    tl = e.txt_len
    np.testing.assert_allclose(c.coref_x[0], phrase_region_features(att[:, :, :tl, tl:], att[:, :, tl:, :tl], span, 0),
                               rtol=1e-5, atol=1e-7)
    assert c.rel_predicates[:2] == [["near"], ["wears"]]
    np.testing.assert_allclose(c.rel_x[0], region_pair_features(att[:, :, tl:, tl:], 0, 2), rtol=1e-5, atol=1e-7)
    figures = score(c, s)
    assert figures["coreference"]["n"] == 48 and "accuracy" in figures["coreference"]
    assert figures["relations"]["predicate"]["classes"] == {"near": 6, "wears": 6}  # 6 captions, 2 relations each


def test_stated_relations_masked_and_probed(seed):
    """A stated relation's predicate becomes one [MASK] (the same text for every predicate); its rows carry the
    region-pair attention of the masked pass, the [MASK] slot <-> region attention, the caption-as-written pair
    attention and the input boxes, each equal to the blocks of attention_maps written out here."""
    corpus = synthetic_corpus()
    tok = WordPieceTokenizer(corpus.vocab_file)
    rng = np.random.default_rng(seed)
    norm_bb = np.array([[0.1, 0.4, 0.3, 0.6, 0.2, 0.2], [0.6, 0.3, 0.9, 0.7, 0.3, 0.4]], np.float32)
    feats = rng.normal(size=(2, 12)).astype(np.float32)
    examples = []
    for pred in ("left of", "above"):
        words = f"zzz a cup {pred} the ball .".split()  # 'zzz' -> 3 word pieces, so token spans differ from words
        k = len(pred.split())
        cap = GroundedCaption(f"c-{pred}", "img", words, [Phrase(1, 3, [0]), Phrase(3 + k, 5 + k, [1])],
                              [Relation(0, 1, "left of", "derived"), Relation(0, 1, pred, "caption", 3, 3 + k)])
        examples.append(make_example(cap, feats, norm_bb, tok))
    assert examples[0].word_tokens[:2] == [(1, 4), (4, 5)]
    masked = [mask_stated_relations(e) for e in examples]
    ids = [tok.cls_id, *tok.encode("zzz a cup"), tok.mask_id, *tok.encode("the ball ."), tok.sep_id]
    for m, slots in masked:
        assert m.input_ids.tolist() == ids and slots == [None, 6]  # the same text whatever the predicate
        assert m.caption.words == "zzz a cup [MASK] the ball .".split()
        assert [(p.start, p.end) for p in m.caption.phrases] == [(1, 3), (4, 6)]
        assert (m.caption.relations[1].start, m.caption.relations[1].end) == (3, 4)
        assert m.word_tokens[3] == (6, 7) and m.phrase_tokens(4, 6) == (7, 9)
    plain = mask_stated_relations(make_example(GroundedCaption("p", "img", ["cup"]), feats, norm_bb, tok))
    assert plain[1] == []  # nothing stated: the example itself
    cfg = tiny_config(vocab_size=corpus.vocab_size, img_dim=12)
    model = UniterModel(cfg, cfg.img_dim).eval()
    c = collect(model, examples, ProbeSettings(batch_size=2))
    assert [r["predicate"] for r in c.stated] == ["left of", "above"]
    for row, e, (m, _) in zip(c.stated, examples, masked):
        att = attention_maps(model, official_batch([m])).numpy()[:, 0]
        t2i, i2t, i2i = joint_blocks(att, m.txt_len)
        np.testing.assert_allclose(row["pair"], region_pair_features(i2i, 0, 1), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(row["slot"], relation_slot_features(t2i, i2t, 6, 0, 1), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(row["slot_pair"], np.r_[row["slot"], row["pair"]])
        np.testing.assert_allclose(row["slot_state"], hidden_states(model, official_batch([m]))[-1, 0, 6].numpy(),
                                   rtol=1e-5, atol=1e-6)
        plain_att = attention_maps(model, official_batch([e])).numpy()[:, 0]
        np.testing.assert_allclose(row["pair_caption"], region_pair_features(joint_blocks(plain_att, e.txt_len)[2],
                                                                             0, 1), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(row["boxes"], box_pair_features(position_features(norm_bb), 0, 1))
    # the all-pairs figure reads the derived relations only
    assert c.rel_predicates == [["left of"], ["left of"]]


def test_stated_fill_reads_the_mlm_head_on_the_slot(seed):
    """``stated_fill``: per stated relation, the model's own MLM head on the [MASK] slot's last state, argmax over the
    first word pieces of the stated predicates, written out here from hidden_states; a bare encoder has no figure."""
    corpus = synthetic_corpus()
    tok = WordPieceTokenizer(corpus.vocab_file)
    rng = np.random.default_rng(seed)
    norm_bb = np.array([[0.1, 0.4, 0.3, 0.6, 0.2, 0.2], [0.6, 0.3, 0.9, 0.7, 0.3, 0.4]], np.float32)
    preds = ["left of", "above", "right of", "below", "left of", "left of", "above"]
    examples = []
    for n, pred in enumerate(preds):
        words = f"a cup {pred} the ball .".split()
        k = len(pred.split())
        cap = GroundedCaption(f"c{n}", f"img{n}", words, [Phrase(0, 2, [0]), Phrase(2 + k, 4 + k, [1])],
                              [Relation(0, 1, pred, "caption", 2, 2 + k)])
        examples.append(make_example(cap, rng.normal(size=(2, 12)).astype(np.float32), norm_bb, tok))
    cfg = tiny_config(vocab_size=corpus.vocab_size, img_dim=12)
    model = UniterForPretraining(cfg, cfg.img_dim, 5).eval()
    s = ProbeSettings(batch_size=3, folds=2)
    c = collect(model, examples, s)
    words = sorted({tok.encode(p.split()[0])[0] for p in preds})
    assert len(words) == 4
    for row, e, pred in zip(c.stated, examples, preds):
        m, slots = mask_stated_relations(e)
        state = hidden_states(model, official_batch([m]))[-1, 0, slots[0]]
        with torch.no_grad():
            want = words[int(model.cls(state)[words].argmax())]
        assert row["word_id"] == tok.encode(pred.split()[0])[0] and row["fill_id"] == want
    fill = score(c, s)["relations"]["stated_fill"]
    assert fill["accuracy"] == pytest.approx(np.mean([r["fill_id"] == r["word_id"] for r in c.stated]))
    assert fill["majority"] == pytest.approx(3 / 7) and fill["n"] == 7
    # a head that always prefers 'left' fills exactly the 'left of' rows
    with torch.no_grad():
        model.cls.predictions.bias[tok.encode("left")[0]] += 1e4
    assert score(collect(model, examples, s), s)["relations"]["stated_fill"]["accuracy"] == pytest.approx(3 / 7)
    assert "stated_fill" not in score(collect(model.uniter, examples, s), s)["relations"]
