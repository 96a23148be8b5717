"""make_data: npz folder + captions jsonl -> official dbs, read back bit-exact; bad inputs named or skipped."""

import json

import numpy as np
import pytest

from fastvl.data import DataError, ImageDB, SyntheticConfig, TxtDB, WordPieceTokenizer, make_data
from fastvl.data.lmdb_db import compute_nbb
from fastvl.data.synthetic import write_synthetic_raw

CFG = SyntheticConfig(seed=11, n_train_images=10, n_val_images=4, captions_per_image=2, img_dim=8, n_classes=4)


@pytest.fixture
def raw(tmp_path):
    return write_synthetic_raw(tmp_path / "raw", CFG)


@pytest.mark.parametrize("compress", [True, False])
def test_round_trip_bit_exact(tmp_path, raw, compress):
    res = make_data(raw["npz_dir"], [raw["captions_train"], raw["captions_val"]], tmp_path / "out",
                    vocab_file=raw["vocab"], conf_th=0.2, max_bb=100, min_bb=2, compress=compress)
    assert res.n_images == 14 and res.n_texts == {"captions_train.db": 20, "captions_val.db": 8}
    assert res.img_dim == 8 and res.img_label_dim == 5 and res.skipped == {}
    img = ImageDB(res.img_db)
    assert img.db_path.name == "feat_th0.2_max100_min2" + ("_compressed" if compress else "")
    for path in sorted(raw["npz_dir"].glob("*.npz")):
        src = dict(np.load(path))
        nbb = min(compute_nbb(src["conf"], 0.2, 2, 100), len(src["conf"]))
        got = img.get_raw(path.name)
        assert img.name2nbb[path.name] == nbb and set(got) == set(src)
        for k, arr in src.items():
            want = arr.astype(np.float16)[:nbb]
            assert got[k].dtype == np.float16 and np.array_equal(got[k].view(np.uint16), want.view(np.uint16)), k
    tok = WordPieceTokenizer(raw["vocab"])
    for split, db_dir in zip(("train", "val"), res.txt_dbs):
        txt = TxtDB(db_dir, max_txt_len=-1)
        lines = [json.loads(line) for line in open(raw[f"captions_{split}"])]
        assert txt.ids == [r["id"] for r in lines]
        for r in lines:
            ex = txt[r["id"]]
            assert ex["input_ids"] == tok.encode(r["caption"]) and ex["img_fname"] == r["img_fname"]
            assert ex["sent"] == r["caption"] and txt.txt2img[r["id"]] == r["img_fname"]
        assert txt.meta["CLS"] == 101 and txt.meta["v_range"] == list(tok.v_range)


def _captions(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def bad_inputs(tmp_path):
    npz = tmp_path / "npz"
    npz.mkdir()
    rng = np.random.default_rng(0)

    def arrays(n=3, d=6):
        return {"features": rng.normal(size=(n, d)).astype(np.float32), "norm_bb": rng.uniform(size=(n, 6)),
                "conf": np.full(n, 0.9, np.float32)}

    np.savez(npz / "good.npz", **arrays())
    np.savez(npz / "good2.npz", **arrays())
    nan = arrays()
    nan["features"][0, 0] = np.nan
    np.savez(npz / "nan.npz", **nan)
    np.savez(npz / "wide.npz", **arrays(d=7))
    (npz / "broken.npz").write_bytes(b"PK\x03\x04 not really a zip")
    caps = _captions(tmp_path / "caps.jsonl", [
        {"id": "a", "img_fname": "good.npz", "caption": "a red cup"},
        {"id": "b", "image": "good2", "sent": "a blue ball"},
        {"id": "c", "img_fname": "ghost.npz", "caption": "a lamp"},
        {"id": "d", "img_fname": "good.npz", "caption": "   "},
        {"id": "e", "img_fname": "nan.npz", "caption": "a cup"},
    ])
    return npz, caps


def test_bad_inputs_raise_naming_the_file(tmp_path, bad_inputs):
    npz, caps = bad_inputs
    with pytest.raises(DataError, match=r"broken.npz.*cannot read npz") as e:
        make_data(npz, caps, tmp_path / "out")
    assert e.value.reason == "corrupt_record"


@pytest.mark.parametrize("bad", ["nan", "wide", "ghost", "empty", "json"])
def test_each_bad_input_raises(tmp_path, bad_inputs, bad):
    npz, caps = bad_inputs
    (npz / "broken.npz").unlink()
    keep = {"nan": ["good", "good2", "nan"], "wide": ["good", "good2", "wide"]}.get(bad, ["good", "good2"])
    for p in npz.glob("*.npz"):
        if p.stem not in keep:
            p.unlink()
    rows = [json.loads(line) for line in open(caps)][:2]
    extra = {"ghost": {"id": "c", "img_fname": "ghost.npz", "caption": "a lamp"},
             "empty": {"id": "d", "img_fname": "good.npz", "caption": "   "}}.get(bad)
    _captions(caps, rows + ([extra] if extra else []))
    if bad == "json":
        caps.write_text(caps.read_text() + "{broken\n")
    expect = {"nan": r"nan.npz.*NaN", "wide": r"wide.npz.*dim 7", "ghost": r"ghost.npz.*caption 'c'",
              "empty": r"'d'.*empty caption", "json": r"caps.jsonl.*line 3.*invalid JSON"}[bad]
    with pytest.raises(DataError, match=expect):
        make_data(npz, caps, tmp_path / "out")


def test_skip_bad_examples_counts(tmp_path, bad_inputs):
    npz, caps = bad_inputs
    res = make_data(npz, caps, tmp_path / "out", skip_bad_examples=True, min_bb=1)
    assert res.n_images == 2 and res.n_texts == {"caps.db": 2}
    assert res.skipped == {"corrupt_record": 1, "nonfinite_feature": 1, "wrong_dim": 1, "missing_image": 2,
                           "empty_caption": 1}
    txt = TxtDB(res.txt_dbs[0])
    assert txt.ids == ["a", "b"] and txt["b"]["img_fname"] == "good2.npz"
    # the default vocab (none given) was written beside the dbs and recorded
    assert (tmp_path / "out" / "vocab.txt").is_file() and txt.meta["CLS"] == 101


def test_refuses_to_overwrite(tmp_path, raw):
    make_data(raw["npz_dir"], raw["captions_val"], tmp_path / "out", vocab_file=raw["vocab"], min_bb=1)
    with pytest.raises(FileExistsError, match="overwrite"):
        make_data(raw["npz_dir"], raw["captions_val"], tmp_path / "out", vocab_file=raw["vocab"], min_bb=1)
    res = make_data(raw["npz_dir"], raw["captions_val"], tmp_path / "out", vocab_file=raw["vocab"], min_bb=1,
                    overwrite=True)
    assert len(TxtDB(res.txt_dbs[0])) == 8
    with pytest.raises(FileNotFoundError, match="npz_dir"):
        make_data(tmp_path / "none", raw["captions_val"], tmp_path / "o2")


def test_find_dbs_pairs_and_splits(tmp_path, raw, tiny_corpus):
    from fastvl.data import find_dbs

    res = make_data(raw["npz_dir"], [raw["captions_train"], raw["captions_val"]], tmp_path / "out",
                    vocab_file=raw["vocab"], min_bb=1)
    lay = find_dbs(tmp_path / "out")
    assert lay.train_txt == [res.txt_dbs[0]] and lay.val_txt == [res.txt_dbs[1]]
    assert lay.train_img == lay.val_img == [res.img_db]
    syn = find_dbs(tiny_corpus.root)
    assert syn.train_txt == [tiny_corpus.txt_train] and syn.val_txt == [tiny_corpus.txt_val]
    assert syn.train_img == [tiny_corpus.img_db] and syn.info["img_dim"] == tiny_corpus.img_dim
    with pytest.raises(FileNotFoundError, match="no corpus.json"):
        find_dbs(raw["npz_dir"])
