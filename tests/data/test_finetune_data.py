"""Fine-tuning data: the synthetic generator (deterministic, texts grounded in the regions), the official-format
readers (hand-written official records read back), bad input (clear errors naming db and key, or counted skips),
and the resumable batch source."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from fastvl.data import DataError, ImageDB, ImageDBWriter, TxtDB, TxtDBWriter
from fastvl.data.finetune_data import (
    FinetuneBatchSource,
    ITRDataset,
    NLVR2Dataset,
    REDataset,
    VCRDataset,
    VQADataset,
    load_ans2label,
)
from fastvl.data.finetune_synthetic import (
    FINETUNE_TASKS,
    FinetuneSynthConfig,
    finetune_synthetic,
    image_name,
    scene_objects,
)
from fastvl.data.synthetic import CLASSES, COLOURS, SIZES, synthetic_vocab
from fastvl.data.tokenizer import WordPieceTokenizer, write_vocab

CFG = FinetuneSynthConfig(n_train_images=16, n_val_images=6, questions_per_image=2)


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    return finetune_synthetic(tmp_path_factory.mktemp("ftcache"), CFG)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return WordPieceTokenizer(write_vocab(synthetic_vocab(), tmp_path_factory.mktemp("voc") / "vocab.txt"),
                              lowercase=False, name="fastvl-synthetic")


def _records(db) -> dict:
    txt = TxtDB(db, -1)
    return {i: txt[i] for i in txt.ids}


# ----------------------------------------------------------------------------------------------------------------
# synthetic data
# ----------------------------------------------------------------------------------------------------------------
def test_deterministic_and_cached(syn, tmp_path):
    again = finetune_synthetic(tmp_path, CFG)
    assert again.root.name == syn.root.name
    for task in FINETUNE_TASKS:
        for split in ("train", "val"):
            assert _records(again.txt_db(task, split)) == _records(syn.txt_db(task, split)), (task, split)
    assert json.loads(again.ans2label("vqa").read_text()) == json.loads(syn.ans2label("vqa").read_text())
    a, b = ImageDB(syn.img_db), ImageDB(again.img_db)
    name = image_name(1)
    np.testing.assert_array_equal(a.get(name).feat, b.get(name).feat)
    assert finetune_synthetic(tmp_path, CFG).root == again.root  # cached: same folder, not rewritten
    other = finetune_synthetic(tmp_path, FinetuneSynthConfig(n_train_images=16, n_val_images=6, seed=7))
    assert _records(other.txt_db("vqa", "train")) != _records(syn.txt_db("vqa", "train"))


def test_regions_are_the_scene_objects(syn):
    img = ImageDB(syn.img_db)
    for image_id, dump, objs in scene_objects(CFG, "val"):
        rec = img.get(image_name(image_id))
        assert rec.nbb == len(objs)
        np.testing.assert_allclose(rec.feat, dump["features"][:len(objs)].astype(np.float16).astype(np.float32))


def test_texts_follow_the_regions(syn):
    """Answers, labels and targets are facts of the objects of the image (so every task needs the regions)."""
    scenes = {image_name(i): objs for i, _, objs in scene_objects(CFG, "train")}
    label2ans = {v: k for k, v in load_ans2label(syn.ans2label("vqa")).items()}
    n_colour = 0
    for rec in _records(syn.txt_db("vqa", "train")).values():
        m = re.fullmatch(r"what colour is the (\w+) \?", rec["sent"])
        if m:
            obj = next(o for o in scenes[rec["img_fname"]] if CLASSES[o["cls"]] == m.group(1))
            best = rec["target"]["labels"][int(np.argmax(rec["target"]["scores"]))]
            assert label2ans[best] == COLOURS[obj["colour"]]
            n_colour += 1
    assert n_colour > 0
    for rec in _records(syn.txt_db("ve", "train")).values():
        m = re.fullmatch(r"the (\w+) is (\w+) \.", rec["sent"])
        if m and m.group(2) in COLOURS:
            objs = [o for o in scenes[rec["img_fname"]] if CLASSES[o["cls"]] == m.group(1)]
            label = ["contradiction", "entailment", "neutral"][rec["target"]["labels"][0]]
            want = "neutral" if not objs else ("entailment" if COLOURS[objs[0]["colour"]] == m.group(2)
                                               else "contradiction")
            assert label == want, rec["sent"]
    ds = REDataset(syn.txt_db("re", "train"), syn.img_db)
    for i in range(len(ds)):
        p, id_ = ds.items[i]
        rec = ds.pairs[p][0][id_]
        m = re.fullmatch(r"the (small|large) (\w+) (\w+)", rec["sent"])
        if m:
            o = scenes[rec["img_fname"]][ds.example(i).target]
            assert (SIZES[o["size"]], COLOURS[o["colour"]], CLASSES[o["cls"]]) == m.groups()
    for rec in _records(syn.txt_db("nlvr2", "train")).values():
        m = re.fullmatch(r"the (left|right) image has a (\w+) (\w+) \.", rec["sent"])
        if m:
            objs = scenes[rec["img_fname"][0 if m.group(1) == "left" else 1]]
            truth = any(COLOURS[o["colour"]] == m.group(2) and CLASSES[o["cls"]] == m.group(3) for o in objs)
            assert int(truth) == rec["target"]


def test_labels_are_balanced(syn):
    ve = [r["target"]["labels"][0] for r in _records(syn.txt_db("ve", "train")).values()]
    assert set(ve) == {0, 1, 2}
    nl = [r["target"] for r in _records(syn.txt_db("nlvr2", "train")).values()]
    assert 0.2 < np.mean(nl) < 0.8
    vcr = _records(syn.txt_db("vcr", "train"))
    assert all(len(r["input_ids_as"]) == 4 and len(r["input_ids_rs"]) == 4 for r in vcr.values())
    assert len({r["qa_target"] for r in vcr.values()}) > 1


# ----------------------------------------------------------------------------------------------------------------
# batches of every dataset
# ----------------------------------------------------------------------------------------------------------------
def test_batches_of_every_task(syn):
    vqa = VQADataset(syn.txt_db("vqa", "train"), syn.img_db)
    b = vqa.make_batch([0, 1, 2])
    assert b.targets.shape == (3, vqa.num_answers) and b.batch_size == 3
    assert b.input_ids[0] == vqa.cls and b.input_ids[b.txt_lens[0] - 1] == vqa.sep
    for variant, rows in (("paired", 2), ("triplet", 1)):
        nl = NLVR2Dataset(syn.txt_db("nlvr2", "train"), syn.img_db, variant=variant)
        b = nl.make_batch([0, 1])
        assert b.batch_size == 2 * rows and b.targets.shape == (2,)
        assert set(b.img_type_ids.tolist()) == {1, 2}
    itr = ITRDataset(syn.txt_db("itr", "train"), syn.img_db)
    b = itr.make_batch([0, 1, 2])
    assert len(b.img_fnames) == 3
    re_ = REDataset(syn.txt_db("re", "val"), syn.img_db)
    b = re_.make_batch([0, 1])
    assert b.boxes.shape == (sum(b.img_lens), 4) and b.gt_boxes.shape == (2, 4)
    for stage, ctype in (("qa", 2), ("qar", 3)):
        vcr = VCRDataset(syn.txt_db("vcr", "train"), syn.img_db, stage=stage)
        b = vcr.make_batch([0, 1])
        assert b.batch_size == 8 and int(b.targets.sum()) == 2
        assert ctype in b.txt_type_ids.tolist()


def test_batch_source_deterministic_and_resumable(syn):
    ds = VQADataset(syn.txt_db("vqa", "train"), syn.img_db)
    a = FinetuneBatchSource(ds, 200, seed=3)
    ids = [a.next_batch().ids for _ in range(5)]
    b = FinetuneBatchSource(ds, 200, seed=3)
    assert [b.next_batch().ids for _ in range(5)] == ids
    c = FinetuneBatchSource(ds, 200, seed=3)
    for _ in range(2):
        c.next_batch()
    state = c.state_dict()
    d = FinetuneBatchSource(ds, 200, seed=3)
    d.load_state_dict(state)
    assert [d.next_batch().ids for _ in range(3)] == ids[2:]
    epoch = [i for batch in FinetuneBatchSource(ds, 200, train=False).iter_epoch() for i in batch.ids]
    assert sorted(epoch) == sorted(ds.pairs[0][0].ids)  # evaluation sees every example once


# ----------------------------------------------------------------------------------------------------------------
# official formats, written by hand
# ----------------------------------------------------------------------------------------------------------------
def _img_db(path, names, gen, n=3, dim=64):
    feats = {}
    with ImageDBWriter(path, conf_th=0.2, max_bb=n, min_bb=1, compress=False) as w:
        for name in names:
            f = gen.standard_normal((n, dim)).astype(np.float32)
            x1 = gen.uniform(0, 0.5, n)
            y1 = gen.uniform(0, 0.5, n)
            bb = np.stack([x1, y1, x1 + 0.3, y1 + 0.4, np.full(n, 0.3), np.full(n, 0.4)], 1).astype(np.float32)
            w.put(name, {"features": f, "norm_bb": bb, "conf": np.full(n, 0.9, np.float32)})
            feats[name] = (f.astype(np.float16).astype(np.float32), bb.astype(np.float16).astype(np.float32))
    return feats


def _txt_db(path, tok, records):
    with TxtDBWriter(path, tok.meta()) as w:
        for id_, rec in records.items():
            w.put(id_, rec)


def test_official_vqa_round_trip(tmp_path, tok):
    g = np.random.default_rng(0)
    feats = _img_db(tmp_path / "img", ["a.npz", "b.npz"], g)
    q = tok.encode("what colour is the cup ?")
    _txt_db(tmp_path / "txt", tok, {
        "7": {"input_ids": q, "img_fname": "a.npz", "target": {"labels": [2, 0], "scores": [1.0, 0.3]}},
        "8": {"input_ids": q[:3], "img_fname": "b.npz", "target": {"labels": [], "scores": []}},
    })
    (tmp_path / "ans2label.json").write_text(json.dumps({"red": 0, "blue": 1, "green": 2}))
    ds = VQADataset(tmp_path / "txt", tmp_path / "img")  # ans2label.json found beside the txt_db
    b = ds.make_batch([0, 1])
    torch.testing.assert_close(b.targets, torch.tensor([[0.3, 0, 1.0], [0, 0, 0]]))
    assert b.input_ids[:len(q) + 2].tolist() == [tok.cls_id, *q, tok.sep_id]
    torch.testing.assert_close(b.img_feat[:3], torch.from_numpy(feats["a.npz"][0]))
    pos = feats["a.npz"][1]
    torch.testing.assert_close(b.img_pos[:3], torch.from_numpy(np.concatenate([pos, pos[:, 4:5] * pos[:, 5:]], 1)))


def test_official_nlvr2_and_vcr_round_trip(tmp_path, tok):
    g = np.random.default_rng(1)
    _img_db(tmp_path / "img", ["l.npz", "r.npz"], g, n=2)
    s = tok.encode("both images have a cup .")
    _txt_db(tmp_path / "nl", tok, {"p0": {"input_ids": s, "img_fname": ["l.npz", "r.npz"], "target": 1}})
    b = NLVR2Dataset(tmp_path / "nl", tmp_path / "img").make_batch([0])
    assert b.txt_lens == [len(s) + 2] * 2 and b.img_type_ids.tolist() == [1, 1, 2, 2]
    assert b.targets.tolist() == [1]
    b = NLVR2Dataset(tmp_path / "nl", tmp_path / "img", variant="triplet").make_batch([0])
    assert b.batch_size == 1 and b.img_lens == [4] and b.img_type_ids.tolist() == [1, 1, 2, 2]

    q, a, r = tok.encode("what is it ?"), [tok.encode(f"a {c}") for c in CLASSES[:4]], \
        [tok.encode(f"the {c} is red") for c in CLASSES[:4]]
    rec = {"input_ids": q, "input_ids_as": a, "input_ids_rs": r, "qa_target": 2, "qar_target": 1,
           "img_fname": ["l.npz", "r.npz"]}
    _txt_db(tmp_path / "vcr", tok, {"v0": rec})
    cls, sep = tok.cls_id, tok.sep_id
    b = VCRDataset(tmp_path / "vcr", tmp_path / "img", stage="qa").make_batch([0])  # one img_db: detected image
    rows = b.input_ids.split(b.txt_lens)
    types = b.txt_type_ids.split(b.txt_lens)
    assert rows[1].tolist() == [cls, *q, sep, *a[1], sep]
    assert types[1].tolist() == [0] * (len(q) + 1) + [2] * (len(a[1]) + 2)
    assert b.targets.tolist() == [0, 0, 1, 0] and b.img_lens == [2] * 4
    b = VCRDataset(tmp_path / "vcr", [tmp_path / "img", tmp_path / "img"], stage="qar").make_batch([0])
    rows = b.input_ids.split(b.txt_lens)
    types = b.txt_type_ids.split(b.txt_lens)
    assert rows[3].tolist() == [cls, *q, sep, *a[2], sep, *r[3], sep]
    assert types[3].tolist() == [0] * (len(q) + 1) + [2] * (len(a[2]) + 1) + [3] * (len(r[3]) + 2)
    assert b.targets.tolist() == [0, 1, 0, 0] and b.img_lens == [4] * 4  # gt + detected regions


def _re_db(tmp_path, tok, box=(10.0, 20.0, 100.0, 80.0)):
    """An official RefCOCO-style txt_db: records keyed by sentence id without img_fname (the image comes from
    image_id), no txt2img.json, side files refs / annotations / images / categories."""
    g = np.random.default_rng(2)
    _img_db(tmp_path / "img", ["visual_grounding_coco_gt_000000000005.npz"], g, n=3)
    db = tmp_path / "re"
    _txt_db(db, tok, {"51": {"input_ids": tok.encode("the red cup"), "img_fname": "-", "sent_id": 51, "ref_id": 9,
                             "ann_id": 502, "image_id": 5, "bbox": list(box)}})
    _rewrite(db, "51", lambda r: {k: v for k, v in r.items() if k != "img_fname"})
    (db / "txt2img.json").unlink()
    (db / "images.json").write_text(json.dumps([{"id": 5, "ann_ids": [500, 501, 502], "width": 640,
                                                 "height": 480, "file_name": "x.jpg"}]))
    (db / "annotations.json").write_text(json.dumps([{"id": 500 + k, "image_id": 5, "bbox": [10.0 * k, 5, 50, 50],
                                                      "category_id": 1} for k in range(3)]))
    (db / "refs.json").write_text(json.dumps([{"ref_id": 9, "ann_id": 502, "image_id": 5, "sent_ids": [51]}]))
    (db / "categories.json").write_text(json.dumps([{"id": 1, "name": "cup"}]))
    return db


def _rewrite(db, key, fn):
    """Rewrite one record of a txt_db in place (keeping its side files)."""
    import lmdb
    import lz4.frame

    from fastvl.data.lmdb_db import dumps_msgpack, loads_msgpack, release_db

    release_db(db)
    env = lmdb.open(str(db), map_size=1 << 26)
    with env.begin(write=True) as t:
        rec = loads_msgpack(lz4.frame.decompress(t.get(key.encode())))
        t.put(key.encode(), lz4.frame.compress(dumps_msgpack(fn(rec))))
    env.close()
    release_db(db)


def test_official_re_round_trip(tmp_path, tok):
    db = _re_db(tmp_path, tok)
    b = REDataset(db, tmp_path / "img").make_batch([0])
    assert b.targets.tolist() == [2]  # ann 502 is region 2 (ann_ids order = region order)
    torch.testing.assert_close(b.gt_boxes, torch.tensor([[10.0, 20.0, 110.0, 100.0]]))
    torch.testing.assert_close(b.image_sizes, torch.tensor([[640.0, 480.0]]))
    bb = ImageDB(tmp_path / "img").get("visual_grounding_coco_gt_000000000005.npz").norm_bb
    torch.testing.assert_close(b.boxes, torch.from_numpy(bb[:, :4] * np.array([640, 480, 640, 480],
                                                                                         np.float32)))


# ----------------------------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------------------------
def test_bad_answer_id(tmp_path, tok):
    _img_db(tmp_path / "img", ["a.npz"], np.random.default_rng(3))
    ok = {"input_ids": tok.encode("what ?"), "img_fname": "a.npz", "target": {"labels": [1], "scores": [1.0]}}
    _txt_db(tmp_path / "txt", tok, {"q1": ok, "q2": {**ok, "target": {"labels": [5], "scores": [1.0]}}})
    ans = {"yes": 0, "no": 1}
    ds = VQADataset(tmp_path / "txt", tmp_path / "img", ans2label=ans)
    with pytest.raises(DataError, match=r"txt.*key 'q2'.*answer id 5 is outside the answer vocabulary \[0, 2\)"):
        ds.make_batch([0, 1])
    ds = VQADataset(tmp_path / "txt", tmp_path / "img", ans2label=ans, skip_bad_examples=True)
    b = ds.make_batch([0, 1])
    assert b.ids == ["q1"] and ds.bad.as_dict() == {"bad_answer": 1}
    with pytest.raises(FileNotFoundError, match="ans2label"):
        VQADataset(tmp_path / "txt", tmp_path / "img")


def test_nlvr2_image_missing(tmp_path, tok):
    _img_db(tmp_path / "img", ["l.npz", "r.npz"], np.random.default_rng(4))
    s = tok.encode("both images have a cup .")
    _txt_db(tmp_path / "nl", tok, {"ok": {"input_ids": s, "img_fname": ["l.npz", "r.npz"], "target": 0},
                                   "bad": {"input_ids": s, "img_fname": ["l.npz", "gone.npz"], "target": 1}})
    with pytest.raises(DataError, match=r"key 'gone.npz'.*right image of NLVR2 example 'bad'.*not in the img_db"):
        NLVR2Dataset(tmp_path / "nl", tmp_path / "img")
    ds = NLVR2Dataset(tmp_path / "nl", tmp_path / "img", skip_bad_examples=True)
    assert len(ds) == 1 and ds.bad.as_dict() == {"missing_image": 1}


def test_re_box_outside_the_image(tmp_path, tok):
    db = _re_db(tmp_path, tok, box=(600.0, 20.0, 100.0, 80.0))  # x + w = 700 > width 640
    with pytest.raises(DataError, match=r"re, key '51'.*target box .*outside its image 5 of size 640 x 480"):
        REDataset(db, tmp_path / "img")
    with pytest.raises(DataError, match="no usable examples"):
        REDataset(db, tmp_path / "img", skip_bad_examples=True)


def test_vcr_wrong_number_of_choices(tmp_path, tok):
    _img_db(tmp_path / "img", ["a.npz"], np.random.default_rng(5))
    q = tok.encode("what ?")
    a = [tok.encode(f"a {c}") for c in CLASSES[:4]]
    good = {"input_ids": q, "input_ids_as": a, "input_ids_rs": a, "qa_target": 0, "qar_target": 1,
            "img_fname": ["a.npz", "a.npz"]}
    _txt_db(tmp_path / "vcr", tok, {"g": good, "b": {**good, "input_ids_as": a[:3]}})
    ds = VCRDataset(tmp_path / "vcr", tmp_path / "img")
    with pytest.raises(DataError, match=r"vcr, key 'b'.*'input_ids_as' has 3 choices; VCR needs exactly 4"):
        ds.make_batch([0, 1])
    ds = VCRDataset(tmp_path / "vcr", tmp_path / "img", skip_bad_examples=True)
    b = ds.make_batch([0, 1])
    assert b.batch_size == 4 and ds.bad.as_dict() == {"bad_choices": 1}
