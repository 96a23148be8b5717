"""Official img_db / txt_db formats: bit-exact round trips, the nbb rule, and bad records named by db and key."""

import json

import lmdb
import lz4.frame
import numpy as np
import pytest

from fastvl.data import DataError, ImageDB, ImageDBWriter, TxtDB, TxtDBWriter, compute_nbb, position_features
from fastvl.data.lmdb_db import dumps_msgpack, img_db_name, loads_msgpack, loads_npz, nbb_file_name, release_db

META = {"CLS": 101, "SEP": 102, "MASK": 103, "UNK": 100, "v_range": [104, 300], "tokenizer": "test"}


def _image(rng, n, d=12, c=5, sort=True):
    conf = rng.uniform(0, 1, n).astype(np.float32)
    if sort:
        conf = np.sort(conf)[::-1].copy()
    bb = rng.uniform(0, 1, (n, 6)).astype(np.float32)
    return {"features": rng.normal(size=(n, d)).astype(np.float32), "norm_bb": bb, "conf": conf,
            "soft_labels": rng.dirichlet(np.ones(c), n).astype(np.float32)}


def _images(seed, count=7, d=12):
    rng = np.random.default_rng(seed)
    return {f"img_{i:03d}.npz": _image(rng, int(rng.integers(1, 15)), d) for i in range(count)}


def _put_raw(db_path, key: str, value: bytes) -> None:
    release_db(db_path)
    env = lmdb.open(str(db_path), map_size=1 << 26)
    with env.begin(write=True) as txn:
        txn.put(key.encode(), value)
    env.close()


def _raw_value(db_path, key: str) -> bytes:
    release_db(db_path)
    env = lmdb.open(str(db_path), readonly=True, lock=False)
    with env.begin() as txn:
        out = bytes(txn.get(key.encode()))
    env.close()
    return out


@pytest.mark.parametrize("compress", [False, True])
def test_img_db_round_trip_bit_exact(tmp_path, seed, compress):
    imgs = _images(seed)
    with ImageDBWriter(tmp_path, conf_th=0.3, max_bb=9, min_bb=2, compress=compress) as w:
        for name, dump in imgs.items():
            w.put(name, dump)
    assert (tmp_path / img_db_name(0.3, 9, 2, compress=compress) / "data.mdb").is_file()
    nbb_json = json.loads((tmp_path / nbb_file_name(0.3, 9, 2)).read_text())
    db = ImageDB(tmp_path, conf_th=0.3, max_bb=9, min_bb=2)
    assert db.keys == list(imgs) and db.img_dim == 12 and db.label_dim == 5
    for name, dump in imgs.items():
        nbb = compute_nbb(dump["conf"], 0.3, 2, 9)
        assert db.name2nbb[name] == nbb_json[name] == min(nbb, len(dump["conf"]))
        raw = db.get_raw(name)
        for k, arr in dump.items():  # float32 stored as fp16, the first nbb rows, bit for bit
            expect = arr.astype(np.float16)[:nbb]
            assert raw[k].dtype == np.float16 and np.array_equal(raw[k].view(np.uint16), expect.view(np.uint16))
        rec = db.get(name, soft_labels=True)
        assert rec.feat.dtype == np.float32
        np.testing.assert_array_equal(rec.feat, dump["features"].astype(np.float16)[:nbb].astype(np.float32))
        np.testing.assert_array_equal(rec.soft_labels, dump["soft_labels"].astype(np.float16)[:nbb].astype(np.float32))
        bb = dump["norm_bb"].astype(np.float16)[:nbb].astype(np.float32)
        np.testing.assert_array_equal(rec.pos, np.concatenate([bb, bb[:, 4:5] * bb[:, 5:6]], axis=1))


def test_value_encodings_are_the_official_ones(tmp_path, seed):
    """msgpack-numpy dict (plain) or np.savez_compressed bytes (compressed), readable with the official calls."""
    import io

    import msgpack
    import msgpack_numpy

    imgs = _images(seed, 2)
    for compress in (False, True):
        with ImageDBWriter(tmp_path / str(compress), conf_th=0.2, max_bb=100, min_bb=1, compress=compress) as w:
            for name, dump in imgs.items():
                w.put(name, dump)
        name = next(iter(imgs))
        value = _raw_value(tmp_path / str(compress) / img_db_name(0.2, 100, 1, compress=compress), name)
        if compress:
            got = dict(np.load(io.BytesIO(value), allow_pickle=True))
        else:
            got = msgpack.unpackb(value, object_hook=msgpack_numpy.decode, raw=False)
        assert got["features"].dtype == np.float16 and got["features"].shape[1] == 12
        keys = json.loads(_raw_value(tmp_path / str(compress) / img_db_name(0.2, 100, 1, compress=compress),
                                     "__keys__"))
        assert keys == list(imgs)


def test_nbb_rule_and_keep_all(tmp_path):
    conf = np.array([0.9, 0.5, 0.25, 0.2, 0.1], np.float32)
    assert compute_nbb(conf, 0.2, 1, 100) == 3  # strictly greater than the threshold
    assert compute_nbb(conf, 0.2, 4, 100) == 4 and compute_nbb(conf, 0.2, 1, 2) == 2
    rng = np.random.default_rng(0)
    dump = _image(rng, 5)
    dump["conf"] = conf
    with ImageDBWriter(tmp_path, keep_all=True, compress=False) as w:
        w.put("a.npz", dump)
    # an 'all' db keeps every row; nbb is computed from conf on reading with the asked rule
    db = ImageDB(tmp_path, conf_th=0.2, max_bb=100, min_bb=2)
    assert db.db_path.name == "all" and db.name2nbb["a.npz"] == 3 and db.get_raw("a.npz")["features"].shape[0] == 5
    assert db.get("a.npz").nbb == 3
    fixed = ImageDB(tmp_path, conf_th=-1, num_bb=4)
    assert fixed.get("a.npz").nbb == 4


def test_img_db_params_detected_from_folder_name(tmp_path, seed):
    imgs = _images(seed, 3)
    with ImageDBWriter(tmp_path, conf_th=0.25, max_bb=7, min_bb=3, compress=True) as w:
        for name, dump in imgs.items():
            w.put(name, dump)
    db = ImageDB(tmp_path)
    assert (db.conf_th, db.max_bb, db.min_bb) == (0.25, 7, 3)
    assert db.db_path.name == "feat_th0.25_max7_min3_compressed"
    with pytest.raises(DataError, match="looked for"):
        ImageDB(tmp_path, conf_th=0.5, max_bb=7, min_bb=3)


def test_txt_db_round_trip(tmp_path, seed):
    rng = np.random.default_rng(seed)
    examples = {f"t{i}": {"id": f"t{i}", "img_fname": f"img_{i % 3}.npz", "sent": "x " * (i + 1),
                          "input_ids": rng.integers(104, 300, int(rng.integers(1, 70))).tolist(), "extra": [1, "a"]}
                for i in range(9)}
    with TxtDBWriter(tmp_path / "t.db", META) as w:
        for k, ex in examples.items():
            w.put(k, ex)
    db = TxtDB(tmp_path / "t.db", max_txt_len=-1)
    assert db.ids == list(examples)
    for k, ex in examples.items():
        assert db[k] == ex
        assert db.input_ids(k) == ex["input_ids"]
    # the stored value is lz4.frame(msgpack(example))
    assert loads_msgpack(lz4.frame.decompress(_raw_value(tmp_path / "t.db", "t3"))) == examples["t3"]
    meta = json.loads((tmp_path / "t.db" / "meta.json").read_text())
    assert meta == META and (db.cls, db.sep, db.mask, db.v_range) == (101, 102, 103, (104, 300))
    id2len = json.loads((tmp_path / "t.db" / "id2len.json").read_text())
    assert id2len == {k: len(ex["input_ids"]) for k, ex in examples.items()}
    assert db.txt2img == {k: ex["img_fname"] for k, ex in examples.items()}
    assert db.img2txts == {f"img_{j}.npz": [f"t{i}" for i in range(9) if i % 3 == j] for j in range(3)}
    short = TxtDB(tmp_path / "t.db", max_txt_len=60)  # longer captions dropped, as official
    assert short.ids == [k for k, ex in examples.items() if len(ex["input_ids"]) <= 60]


def test_position_features():
    bb = np.array([[0.1, 0.2, 0.5, 0.6, 0.4, 0.4]], np.float32)
    np.testing.assert_allclose(position_features(bb), [[0.1, 0.2, 0.5, 0.6, 0.4, 0.4, 0.16]], rtol=1e-6)


# ------------------------------------------------------------------------------------------------ bad records
@pytest.fixture
def img_db_dir(tmp_path, seed):
    imgs = _images(seed, 4)
    with ImageDBWriter(tmp_path / "img", conf_th=0.2, max_bb=100, min_bb=1, compress=False) as w:
        for name, dump in imgs.items():
            w.put(name, dump)
    return tmp_path / "img", list(imgs)


@pytest.mark.parametrize("how", ["truncated", "garbage", "truncated_npz"])
def test_corrupt_image_record_names_db_and_key(img_db_dir, how):
    img_dir, names = img_db_dir
    db_path = img_dir / img_db_name(0.2, 100, 1, compress=False)
    value = _raw_value(db_path, names[1])
    bad = {"truncated": value[: len(value) // 2], "garbage": b"\xc1\x00\xff" * 5,
           "truncated_npz": (b"PK\x03\x04" + value)[:40]}[how]
    _put_raw(db_path, names[1], bad)
    db = ImageDB(img_dir)
    db.get(names[0])
    with pytest.raises(DataError, match=rf"{db_path.name}.*{names[1]}.*corrupt") as e:
        db.get(names[1])
    assert e.value.key == names[1] and e.value.reason == "corrupt_record"


def test_missing_image_names_db_and_key(img_db_dir):
    db = ImageDB(img_db_dir[0])
    with pytest.raises(DataError, match="nope.npz.*not in the img_db"):
        db.get("nope.npz")


def test_wrong_dim_and_nan_features(img_db_dir, seed):
    img_dir, names = img_db_dir
    db_path = img_dir / img_db_name(0.2, 100, 1, compress=False)
    rng = np.random.default_rng(seed)
    wrong = _image(rng, 3, d=13)
    wrong["features"] = wrong["features"].astype(np.float16)
    nan = _image(rng, 3)
    nan["features"][0, 4] = np.nan  # row 0: inside every nbb
    nan["features"] = nan["features"].astype(np.float16)
    _put_raw(db_path, names[2], dumps_msgpack(wrong))
    _put_raw(db_path, names[3], dumps_msgpack(nan))
    db = ImageDB(img_dir)
    with pytest.raises(DataError, match=rf"{names[2]}.*\[n, 12\].*\[3, 13\]") as e:
        db.get(names[2])
    assert e.value.reason == "wrong_dim"
    with pytest.raises(DataError, match=rf"{names[3]}.*NaN") as e:
        db.get(names[3])
    assert e.value.reason == "nonfinite_feature"


def test_corrupt_text_record_and_empty_caption(tmp_path):
    with TxtDBWriter(tmp_path / "t.db", META) as w:
        w.put("ok", {"img_fname": "a.npz", "input_ids": [200, 201]})
        w.put("empty", {"img_fname": "a.npz", "input_ids": []})
        w.put("cut", {"img_fname": "a.npz", "input_ids": [200] * 50})
        w.put("range", {"img_fname": "a.npz", "input_ids": [200, 5000]})
    value = _raw_value(tmp_path / "t.db", "cut")
    _put_raw(tmp_path / "t.db", "cut", value[: len(value) - 7])
    db = TxtDB(tmp_path / "t.db")
    assert db.input_ids("ok") == [200, 201]
    with pytest.raises(DataError, match="'empty'.*empty caption") as e:
        db.input_ids("empty")
    assert e.value.reason == "empty_caption"
    with pytest.raises(DataError, match="'cut'.*corrupt or truncated"):
        db.input_ids("cut")
    with pytest.raises(DataError, match="'range'.*out of range"):
        db.input_ids("range")
    with pytest.raises(DataError, match="'missing'.*not in the txt_db"):
        db["missing"]


def test_missing_or_broken_db_files(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        TxtDB(tmp_path / "nowhere")
    (tmp_path / "t.db").mkdir()
    with pytest.raises(DataError, match="missing side file meta.json"):
        TxtDB(tmp_path / "t.db")
    (tmp_path / "t.db" / "meta.json").write_text("{not json")
    with pytest.raises(DataError, match="meta.json.*not valid JSON"):
        TxtDB(tmp_path / "t.db")
    (tmp_path / "img").mkdir()
    with pytest.raises(DataError, match="no img_db LMDB"):
        ImageDB(tmp_path / "img")
    (tmp_path / "img" / "data.mdb").write_bytes(b"\x00" * 100)
    with pytest.raises(DataError, match="cannot open img_db LMDB"):
        ImageDB(tmp_path / "img")


def test_writers_refuse_duplicates_and_overwrites(tmp_path, seed):
    rng = np.random.default_rng(seed)
    with ImageDBWriter(tmp_path, conf_th=0.2, max_bb=10, min_bb=1) as w:
        w.put("a.npz", _image(rng, 3))
        with pytest.raises(ValueError, match="duplicate"):
            w.put("a.npz", _image(rng, 3))
        with pytest.raises(ValueError, match="lacks array 'conf'"):
            w.put("b.npz", {"features": np.zeros((2, 12), np.float32), "norm_bb": np.zeros((2, 6), np.float32)})
    with pytest.raises(FileExistsError):
        ImageDBWriter(tmp_path, conf_th=0.2, max_bb=10, min_bb=1)
    with pytest.raises(ValueError, match="lacks keys"):
        TxtDBWriter(tmp_path / "t.db", {"CLS": 101})


def test_loads_npz_rejects_truncation():
    import io

    buf = io.BytesIO()
    np.savez_compressed(buf, features=np.ones((4, 8), np.float16))
    with pytest.raises(Exception):  # noqa: B017  (zip / zlib raise different types; ImageDB wraps them)
        loads_npz(buf.getvalue()[:50])
