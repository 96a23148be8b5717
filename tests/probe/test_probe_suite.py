"""The suite on annotations from the public formats: Flickr30k Entities phrases and Visual Genome relations go through
the same examples, views and probes as the synthetic corpus."""

import json

import numpy as np
from test_probe_annotations import NORM_BB, SENTENCES, XML

from fastvl.data import WordPieceTokenizer, synthetic_corpus
from fastvl.data.probe_annotations import flickr30k_grounding, read_vg_relationships, vg_relations
from fastvl.models.uniter import UniterModel
from fastvl.models.uniter.testing import tiny_config
from fastvl.probe import ProbeSettings, attention_maps, collect, make_example, official_batch, score
from fastvl.probe.scoring import phrase_region_features, region_pair_features


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
