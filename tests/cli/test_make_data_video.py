"""``fastvl make-data --video``: npz frames + subtitle jsonl -> official HERO video db + subtitle db, read back;
bad input ends with one error line naming the file and the key (exit 2) or counted skips."""

import json

import numpy as np
import pytest
from cli_run import run_cli

from fastvl.data.video import SubtitleDB, VideoFeatDB, WordVocab, build_video_pretrain_data


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
    code, stdout, err = run_cli(["make-data", "--video", "--frames", str(frames), "--subtitles", str(subs), "--out",
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
    code, _, err = run_cli(["make-data", "--video", "--frames", str(frames), "--subtitles", str(subs), "--out",
                            str(out)], capsys)
    assert code == 2 and "exists" in err


@pytest.mark.parametrize("case", ["past_end", "wrong_dim", "unknown_video", "bad_line"])
def test_make_data_video_bad_input(tmp_path, capsys, case):
    extra = {"past_end": [{"vid": "v2", "start": 2.5, "end": 3.0, "text": "late"}],
             "unknown_video": [{"vid": "v9", "start": 0.0, "end": 1.0, "text": "who"}],
             "bad_line": [{"vid": "v1", "start": "soon", "end": 1.0, "text": "x"}]}.get(case, [])
    frames, subs = _inputs(tmp_path, extra, bad_dim=case == "wrong_dim")
    argv = ["make-data", "--video", "--frames", str(frames), "--subtitles", str(subs), "--out", str(tmp_path / "o")]
    code, _, err = run_cli(argv, capsys)
    last = err.strip().splitlines()[-1]  # after the progress bar: one error line
    assert code == 2 and last.startswith("fastvl make-data: error:") and "Traceback" not in err
    want = {"past_end": ("subs.jsonl", "key 'v2 (line 5)'", "after the video's end"),
            "wrong_dim": ("frames", "key 'v3.npz'", "has dim 5 but earlier videos have 6"),
            "unknown_video": ("subs.jsonl", "key 'v9'", "no npz"),
            "bad_line": ("subs.jsonl", "key 'line 5'", "'start' and 'end'")}[case]
    for text in want:
        assert text in last, err
    code, stdout, err = run_cli(argv + ["--skip-bad-examples", "--overwrite"], capsys)
    assert code == 0, err
    reason = {"past_end": "frame_past_video", "wrong_dim": "wrong_dim", "unknown_video": "missing_video",
              "bad_line": "corrupt_record"}[case]
    assert f"skipped={{'{reason}': 1}}" in stdout


QUERY_ROWS = {
    "tvr": [{"desc_id": 1, "desc": "the cup appears", "vid_name": "v1", "ts": [0.5, 3.9]},
            {"desc_id": 2, "desc": "late query", "vid_name": "v2", "ts": [5.0, 6.0]}],  # v2 lasts 2 s
    "tvqa": [{"qid": 7, "q": "what appears ?", "a0": "a cup", "a1": "a hat", "a2": "a ball", "a3": "a lamp",
              "a4": "a box", "answer_idx": 0, "vid_name": "v1", "ts": "0.5-3.9"},
             {"qid": 8, "q": "what moves ?", "a0": "x", "a1": "y", "a2": "z", "a3": "w", "a4": "v", "answer_idx": 1,
              "vid_name": "v2", "ts": "4.5-6.0"}],
    "violin": [{"id": "s1", "label": 1, "statement": "a cup appears", "vid_name": "v1"},
               {"id": "s1", "label": 0, "statement": "a hat appears", "vid_name": "v1"},
               {"qid": "s2-1", "statement": "late", "vid_name": "v9"},  # unknown video: its pair goes too
               {"qid": "s2-0", "statement": "later", "vid_name": "v2"}],
    "tvc": [{"clip_id": 3, "vid_name": "v3", "ts": [2.0, 8.0], "descs": [{"desc": "nothing happens"}]},
            {"clip_id": 4, "vid_name": "v2", "ts": [3.0, 4.0], "descs": [{"desc": "too late"}]}],
}


@pytest.mark.parametrize("task", ["tvr", "tvqa", "violin", "tvc"])
def test_make_data_video_queries(tmp_path, capsys, task):
    from fastvl.data.video import build_video_task_data

    frames, subs = _inputs(tmp_path)
    queries = tmp_path / f"{task}.jsonl"
    queries.write_text("".join(json.dumps(r) + "\n" for r in QUERY_ROWS[task]))
    out = tmp_path / "out"
    argv = ["make-data", "--video", "--frames", str(frames), "--subtitles", str(subs), "--out", str(out),
            "--queries", str(queries), "--query-task", task]
    code, _, err = run_cli(argv, capsys)
    assert code == 2 and f"{task}.jsonl, key '" in err.strip().splitlines()[-1]
    code, stdout, err = run_cli(argv + ["--skip-bad-examples", "--overwrite"], capsys)
    assert code == 0, err
    kind = "missing_video" if task == "violin" else "moment_outside_video"
    assert f"skipped={{'{kind}': 1}}" in stdout and f"query_db=PosixPath('{out}/{task}_db')" in stdout
    data = build_video_task_data("videoqa" if task == "tvqa" else task, out / "video_db", out / "sub_db",
                                 out / f"{task}_db", train=False, max_frames=40)
    batch = next(iter(data.batches()))
    vocab = WordVocab.from_file(out / "vocab.txt")
    if task == "tvr":
        assert batch["qids"] == ["1"] and batch["targets"].tolist() == [[0, 1]]
        assert vocab.decode(batch["query_input_ids"][0, 1:].tolist()) == "the cup appears"
    elif task == "tvqa":
        assert batch["targets"].tolist() == [[0]] and batch["ts_targets"].tolist() == [[0, 1]]
        assert vocab.decode(batch["qa_input_ids"][1].tolist()) == "</s> what appears ? </s> a hat"
    elif task == "violin":
        assert len(data) == 2 and batch["qids"] == ["s1-1", "s1-0"] and batch["targets"].tolist() == [[1], [0]]
    else:
        assert batch["clip_ranges"] == (((1, 4),),) and batch["gts"] == ["nothing happens"]
