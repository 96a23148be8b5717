"""HERO dbs: write -> read round trips in every official encoding, the temporal-IoU subtitle alignment, and the
errors for bad records (naming the db and the key) or their counted skips."""

import json

import lmdb
import numpy as np
import pytest
from hero_dbs import INTERVAL, NFRAMES, VOCAB, frame_features, write_hand_dbs

from fastvl.data import DataError
from fastvl.data.lmdb_db import dumps_msgpack
from fastvl.data.video import (
    CaptionDB,
    QueryDB,
    SubtitleDB,
    SubtitleDBWriter,
    VideoFeatDB,
    VideoFeatDBWriter,
    VideoSubData,
    align_subtitles,
    build_video_pretrain_data,
    build_video_task_data,
    paired_statement_id,
    temporal_iou,
)
from fastvl.data.video.store import release


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("fp16", [False, True])
def test_video_db_round_trip(tmp_path, compress, fp16):
    paths = write_hand_dbs(tmp_path, compress=compress, fp16=fp16)
    name = "toy_1.5" + ("_compressed" if compress else "")
    assert (paths["video_db"] / name / "data.mdb").is_file()
    assert json.loads((paths["video_db"] / "id2nframe.json").read_text()) == NFRAMES
    db = VideoFeatDB(paths["video_db"])
    assert (db.feat_version, db.frame_interval, db.vfeat_dim) == ("toy", INTERVAL, 2)
    raw = db.get_raw("C")["features"]
    assert raw.dtype == (np.float16 if fp16 else np.float32)
    for vid in "ABC":
        got = db.get(vid)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, frame_features(vid).astype(np.float16 if fp16 else np.float32))
    cut = VideoFeatDB(paths["video_db"], "toy", 1.5, max_clip_len=4)
    assert cut.get("C").shape == (4, 2) and cut.nframes("A") == 3


def test_subtitle_and_query_dbs_round_trip(hand_dbs):
    sub = SubtitleDB(hand_dbs["sub_db"])
    assert sub.meta["PAD"] == 1 and sub.cls_ == 0 and sub.sep == 2 and sub.mask == 4
    assert sub.vid2len == NFRAMES
    assert json.loads((hand_dbs["sub_db"] / "vid2max_frame_sub_len.json").read_text()) == {"A": 4, "B": 4, "C": 5}
    ids, pairs, unmatched = sub.read("A")
    assert ids == [[7, 8], [9]] and pairs == [(0, [0, 1]), (1, [])] and unmatched == [2]
    assert sub.read("C") == ([[], []], [(0, [0, 1, 2, 3, 4]), (1, [5])], [])
    rec = sub["A"]
    assert rec["unique_sub2frames"] == [[0, [0, 1]], [1, []]] and rec["unmatched_frames"] == [2]
    cut = SubtitleDB(hand_dbs["sub_db"], max_clip_len=3)  # frames past 3 cut; reading stops after the cut one
    assert cut.read("C")[1] == [(0, [0, 1, 2])]

    tvr = QueryDB(hand_dbs["tvr_db"])
    assert tvr.id2len == {"qa": 2, "qb": 1} and tvr.query2video == {"qa": "A", "qb": "B"}
    assert tvr["qa"]["input_ids"] == [13, 14] and tvr["qa"]["target"] == [0.1, 2.9]
    assert tvr.video2query == {"A": ["qa"], "B": ["qb"]}
    assert set(tvr.query_data) == {"qa", "qb"} and tvr.query_data["qb"]["vid_name"] == "B"
    tvqa = QueryDB(hand_dbs["tvqa_db"])
    assert tvqa.id2len == {"q1": [1, 1, 1, 2, 1, 1]} and tvqa["q1"]["ts"] == "1.5-4.4"
    assert QueryDB(hand_dbs["tvqa_db"], max_txt_len=2).id2len == {}  # question + longest answer = 3 > 2
    violin = QueryDB(hand_dbs["violin_db"])
    assert violin["A_0-0"]["target"] is False and paired_statement_id("A_0-0") == "A_0-1"
    cap = CaptionDB(hand_dbs["tvc_db"])
    c = cap.caption("1_0")
    assert c["input_ids"] == [0, 20, 21] and c["tgt_ids"] == [20, 21, 2] and c["ts"] == [1.6, 6.1]
    assert cap.vid2caps == {"C": ["1_0"]} and cap.vid2clips == {"C": ["1"]}
    assert cap.clip("1")["captions"] == [{"text": "w15 w16"}]


def test_official_roberta_meta(tmp_path):
    """An official subtitle db's meta.json (RoBERTa ids, no vocab_size): the model vocabulary is <mask> + 1."""
    meta = {"BOS": 0, "EOS": 2, "SEP": 2, "CLS": 0, "PAD": 1, "MASK": 50264, "UNK": 3, "v_range": [4, 50257],
            "toker": "roberta-base"}
    with SubtitleDBWriter(tmp_path / "sub", meta) as w:
        w.put("v", [[50263, 4]], [(0, [0])], [], 1)
    db = SubtitleDB(tmp_path / "sub")
    assert db.vocab_size == 50265 and db.read("v")[0] == [[50263, 4]]


def test_alignment_by_temporal_iou():
    assert temporal_iou((0, 1), (1, 2)) == 0 and temporal_iou((0, 2), (1, 3)) == pytest.approx(1 / 3)
    # interval 1 s, 8 frames. sub0 [0.2, 2.5]: frames 0-2; sub1 [2.3, 2.4] inside sub0's frame 2 (IoU 0.1 vs 0.5):
    # no frame; frames 3-4 nobody; sub2 [5.0, 6.6]: frames 5-6; sub3 starts after the end: no frame.
    unique, unmatched, spans = align_subtitles([(0.2, 2.5), (2.3, 2.4), (5.0, 6.6), (9.0, 9.5)], 8, 1.0)
    assert unique == [(0, [0, 1, 2]), (1, []), (2, [5, 6]), (3, [])]
    assert unmatched == [3, 4, 7]
    assert spans[1] == (1, [2]) and spans[3] == (3, [])
    # two subtitles sharing frame 1: it goes to the one covering more of it
    assert align_subtitles([(0.0, 1.2), (1.1, 3.0)], 3, 1.0)[0] == [(0, [0]), (1, [1, 2])]
    with pytest.raises(ValueError, match="sorted"):
        align_subtitles([(2.0, 3.0), (0.0, 1.0)], 4, 1.0)


def test_writers_refuse_bad_input(tmp_path):
    with VideoFeatDBWriter(tmp_path / "v", "x", 1.0) as w:
        w.put("a", np.zeros((2, 3), np.float32))
        with pytest.raises(ValueError, match="feature dim 4"):
            w.put("b", np.zeros((2, 4), np.float32))
        with pytest.raises(ValueError, match="duplicate key 'a'"):
            w.put("a", np.zeros((2, 3), np.float32))
    with pytest.raises(FileExistsError):
        VideoFeatDBWriter(tmp_path / "v", "x", 1.0)
    with SubtitleDBWriter(tmp_path / "s", VOCAB.meta()) as w:
        with pytest.raises(ValueError, match="frame 3 but the video has 3 frames"):
            w.put("a", [[5]], [(0, [1, 3])], [], 3)


def _corrupt(db_path, key: str, value: bytes) -> None:
    release(db_path)  # this process's read handle (LMDB refuses a second open)
    env = lmdb.open(str(db_path), map_size=1 << 24)
    with env.begin(write=True) as txn:
        txn.put(key.encode(), value)
    env.close()


def test_bad_records_name_db_and_key(tmp_path):
    paths = write_hand_dbs(tmp_path)
    vdb_path = paths["video_db"] / "toy_1.5"
    _corrupt(vdb_path, "B", b"\x93garbage")
    vdb = VideoFeatDB(paths["video_db"])
    with pytest.raises(DataError, match=r"toy_1\.5, key 'B': corrupt or truncated record") as e:
        vdb.get("B")
    assert e.value.reason == "corrupt_record"
    # frame features of the wrong dimension
    _corrupt(vdb_path, "C", dumps_msgpack({"features": np.zeros((6, 5), np.float32)}))
    with pytest.raises(DataError, match=r"key 'C': features must be \[n, 2\] \(vfeat_dim\), got \[6, 5\]"):
        vdb.get("C")
    _corrupt(paths["sub_db"], "A", b"not lz4")
    with pytest.raises(DataError, match=r"sub_db, key 'A': corrupt or truncated record"):
        SubtitleDB(paths["sub_db"])["A"]
    _corrupt(paths["tvr_db"], "qa", b"not lz4")
    with pytest.raises(DataError, match=r"tvr_db, key 'qa': corrupt"):
        QueryDB(paths["tvr_db"])["qa"]
    # the data layer: raise, or skip and count with skip_bad_examples
    with pytest.raises(DataError, match="key '[ABC]'"):
        list(build_video_pretrain_data(paths["video_db"], paths["sub_db"], "mfm-nce", train=False).batches("mfm-nce"))
    lenient = build_video_pretrain_data(paths["video_db"], paths["sub_db"], "mfm-nce", train=False,
                                        skip_bad_examples=True)
    assert list(lenient.batches("mfm-nce")) == []
    assert lenient.bad.as_dict() == {"corrupt_record": 2, "wrong_dim": 1}


def test_subtitle_past_the_video_and_moment_outside(tmp_path):
    paths = write_hand_dbs(tmp_path)
    # a subtitle db written for a longer video B (frames 0-2) than the video db holds (1 frame)
    with SubtitleDBWriter(tmp_path / "sub_long", VOCAB.meta()) as w:
        w.put("B", [[10]], [(0, [0, 1, 2])], [], 3)
    data = VideoSubData(VideoFeatDB(paths["video_db"]), SubtitleDB(tmp_path / "sub_long"))
    with pytest.raises(DataError, match=r"sub_long, key 'B': subtitle 0 is aligned to frame 1 but the video has 1 "
                       r"frames") as e:
        data.video_input("B")
    assert e.value.reason == "frame_past_video"
    # a TVR moment after the end of video B (1 frame = 1.5 s)
    from fastvl.data.video import QueryDBWriter
    with QueryDBWriter(tmp_path / "tvr_bad", VOCAB.meta(), "tvr") as w:
        w.put("late", {"vid_name": "B", "input_ids": [13], "target": [3.0, 4.0]})
        w.put("ok", {"vid_name": "A", "input_ids": [13], "target": [0.0, 1.0]})
    strict = build_video_task_data("tvr", paths["video_db"], paths["sub_db"], tmp_path / "tvr_bad", train=False)
    with pytest.raises(DataError, match=r"tvr_bad, key 'late': moment \[3.0, 4.0\] s is outside the video \(1 "
                       r"frames"):
        list(strict.batches())
    lenient = build_video_task_data("tvr", paths["video_db"], paths["sub_db"], tmp_path / "tvr_bad", train=False,
                                    skip_bad_examples=True)
    batches = list(lenient.batches())
    assert [b["qids"] for b in batches] == [["ok"]]
    assert lenient.bad.as_dict() == {"moment_outside_video": 1}


def test_reads_dbs_encoded_as_the_official_scripts_write_them(tmp_path):
    """Values encoded as the official converters do (msgpack-numpy features; savez_compressed with the stray
    ``allow_pickle`` member; lz4(msgpack) subtitle records with tuples) and the official side-file names."""
    import io

    import lz4.frame
    import msgpack
    import msgpack_numpy

    feats = {"v0": np.arange(6, dtype=np.float16).reshape(3, 2), "v1": np.ones((1, 2), np.float32)}
    for compress in (False, True):
        folder = tmp_path / f"vdb{compress}"
        folder.mkdir()
        env = lmdb.open(str(folder / ("slowfast_2" + ("_compressed" if compress else ""))), map_size=1 << 24)
        with env.begin(write=True) as txn:
            for vid, f in feats.items():
                if compress:
                    with io.BytesIO() as buf:
                        np.savez_compressed(buf, features=f, allow_pickle=True)
                        value = buf.getvalue()
                else:
                    value = msgpack.dumps({"features": f}, default=msgpack_numpy.encode, use_bin_type=True)
                txn.put(vid.encode(), value)
        env.close()
        (folder / "id2nframe.json").write_text(json.dumps({"v0": 3, "v1": 1}))
        db = VideoFeatDB(folder, "slowfast", 2)
        assert db.frame_interval == 2.0
        for vid, f in feats.items():
            got = db.get(vid)
            assert got.dtype == np.float32 and np.array_equal(got, f.astype(np.float32))
    sub = tmp_path / "sub"
    env = lmdb.open(str(sub), map_size=1 << 24)
    example = {"vid_name": "v0", "sub": [{"text": "hi", "start": 0.1, "end": 2.5}], "input_ids": [[20, 21], [22]],
               "unique_sub2frames": [(0, [0, 1]), (1, [])], "sub2frames": [(0, [0, 1]), (1, [1])],
               "unmatched_frames": [2], "v_id": "v0", "duration": 3, "max_mtached_sub_len": 4}
    with env.begin(write=True) as txn:
        txn.put(b"v0", lz4.frame.compress(msgpack.dumps(example, use_bin_type=True)))
    env.close()
    meta = {"annotation": "x.jsonl", "BOS": 0, "EOS": 2, "SEP": 2, "CLS": 0, "PAD": 1, "MASK": 50264, "UNK": 3,
            "v_range": [4, 50265]}
    (sub / "meta.json").write_text(json.dumps(meta))
    (sub / "vid2len.json").write_text(json.dumps({"v0": 3}))
    (sub / "vid2max_frame_sub_len.json").write_text(json.dumps({"v0": 4}))
    ids, pairs, unmatched = SubtitleDB(sub).read("v0", 3)
    assert ids == [[20, 21], [22]] and pairs == [(0, [0, 1]), (1, [])] and unmatched == [2]
