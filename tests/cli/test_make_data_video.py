"""``fastvl make-data --video``: npz frames + subtitle jsonl -> official HERO video db + subtitle db, read back;
bad input ends with one error line naming the file and the key (exit 2) or counted skips."""

import json

import numpy as np
import pytest

from fastvl import cli
from fastvl.data.video import SubtitleDB, VideoFeatDB, WordVocab, build_video_pretrain_data


def _run(argv, capsys):
    try:
        code = cli.main(argv)
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def _inputs(root, extra_rows=(), bad_dim=False):
    frames = root / "frames"
    frames.mkdir()
    rng = np.random.default_rng(0)
    for vid, n in (("v1", 4), ("v2", 1), ("v3", 7)):
        dim = 5 if bad_dim and vid == "v3" else 6
        np.savez(frames / f"{vid}.npz", features=rng.normal(size=(n, dim)).astype(np.float32), interval=np.float32(2))
    rows = [{"vid": "v1", "start": 0.5, "end": 3.9, "text": "A cup appears!"},  # frames 0-1
            {"vid": "v1", "start": 1.0, "end": 1.3, "text": "oh"},             # inside frame 0: no frame of its own
            {"vid": "v1", "start": 6.2, "end": 9.0, "text": "it moves"},       # frame 3 (video ends at 8 s)
            {"vid": "v2", "start": 0.0, "end": 2.0, "text": "one frame"}, *extra_rows]
    subs = root / "subs.jsonl"
    subs.write_text("".join(json.dumps(r) + "\n" for r in rows))  # v3 has no subtitle: pseudo-subtitles
    return frames, subs


def test_make_data_video_round_trip(tmp_path, capsys):
    frames, subs = _inputs(tmp_path)
    out = tmp_path / "out"
    code, stdout, err = _run(["make-data", "--video", "--frames", str(frames), "--subtitles", str(subs), "--out",
                              str(out)], capsys)
    assert code == 0, err
    assert "n_videos=3" in stdout and "n_pseudo=1" in stdout
    vdb = VideoFeatDB(out / "video_db")
    assert (out / "video_db" / "resnet_slowfast_2.0_compressed" / "data.mdb").is_file()
    assert vdb.frame_interval == 2.0 and vdb.name2nframe == {"v1": 4, "v2": 1, "v3": 7}
    with np.load(frames / "v3.npz") as z:
        np.testing.assert_array_equal(vdb.get("v3"), z["features"])
    sdb = SubtitleDB(out / "sub_db")
    vocab = WordVocab.from_file(out / "vocab.txt")
    ids, pairs, unmatched = sdb.read("v1")
    assert [vocab.decode(x) for x in ids] == ["a cup appears !", "oh", "it moves"]
    assert pairs == [(0, [0, 1]), (1, []), (2, [3])] and unmatched == [2]
    assert sdb.read("v2")[1:] == ([(0, [0])], [])
    assert sdb.read("v3") == ([[], []], [(0, [0, 1, 2, 3, 4]), (1, [5, 6])], [])
    assert sdb.meta["PAD"] == 1 and sdb.meta["CLS"] == 0 and sdb.meta["SEP"] == 2
    data = build_video_pretrain_data(out / "video_db", out / "sub_db", "mlm,vsm", max_frames=20)
    assert data.sources["mlm"].next_batch()["input_ids"][:, 0].eq(0).all()
    # refuses to overwrite without --overwrite
    code, _, err = _run(["make-data", "--video", "--frames", str(frames), "--subtitles", str(subs), "--out",
                         str(out)], capsys)
    assert code == 2 and "exists" in err


@pytest.mark.parametrize("case", ["past_end", "wrong_dim", "unknown_video", "bad_line"])
def test_make_data_video_bad_input(tmp_path, capsys, case):
    extra = {"past_end": [{"vid": "v2", "start": 2.5, "end": 3.0, "text": "late"}],
             "unknown_video": [{"vid": "v9", "start": 0.0, "end": 1.0, "text": "who"}],
             "bad_line": [{"vid": "v1", "start": "soon", "end": 1.0, "text": "x"}]}.get(case, [])
    frames, subs = _inputs(tmp_path, extra, bad_dim=case == "wrong_dim")
    argv = ["make-data", "--video", "--frames", str(frames), "--subtitles", str(subs), "--out", str(tmp_path / "o")]
    code, _, err = _run(argv, capsys)
    last = err.strip().splitlines()[-1]  # after the progress bar: one error line
    assert code == 2 and last.startswith("fastvl make-data: error:") and "Traceback" not in err
    want = {"past_end": ("subs.jsonl", "key 'v2 (line 5)'", "after the video's end"),
            "wrong_dim": ("frames", "key 'v3.npz'", "has dim 5 but earlier videos have 6"),
            "unknown_video": ("subs.jsonl", "key 'v9'", "no npz"),
            "bad_line": ("subs.jsonl", "key 'line 5'", "'start' and 'end'")}[case]
    for text in want:
        assert text in last, err
    code, stdout, err = _run(argv + ["--skip-bad-examples", "--overwrite"], capsys)
    assert code == 0, err
    reason = {"past_end": "frame_past_video", "wrong_dim": "wrong_dim", "unknown_video": "missing_video",
              "bad_line": "corrupt_record"}[case]
    assert f"skipped={{'{reason}': 1}}" in stdout
