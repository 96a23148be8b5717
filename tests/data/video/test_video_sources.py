"""Batch sources over the synthetic video corpus: determinism, resume, sharding; and the corpus's facts (moments
inside the videos, valid answers, paired statements, alignment rules, pseudo-subtitles)."""

import json

import numpy as np
import pytest
import torch

from fastvl.data.video import (
    VIDEO_TASKS,
    CaptionDB,
    QueryDB,
    SubtitleDB,
    VideoFeatDB,
    VideoSyntheticConfig,
    build_video_pretrain_data,
    build_video_task_data,
    moment_frames,
    paired_statement_id,
)


def _same(a: dict, b: dict) -> bool:
    if set(a) != set(b):
        return False
    return all(torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)


def _data(corpus, seed=3, **kw):
    return build_video_pretrain_data(corpus.video_db, corpus.sub_db, ",".join(VIDEO_TASKS), max_frames=60,
                                     seed=seed, vids=corpus.vids("train"), **kw)


def test_batches_deterministic_and_resumable(tiny_video_corpus):
    a, b, c = _data(tiny_video_corpus), _data(tiny_video_corpus), _data(tiny_video_corpus, seed=4)
    for task in VIDEO_TASKS:
        first = [a.sources[task].next_batch() for _ in range(3)]
        assert all(_same(x, b.sources[task].next_batch()) for x in first), task
        assert not _same(first[0], c.sources[task].next_batch()), task
        resumed = _data(tiny_video_corpus)
        state = json.loads(json.dumps(a.sources[task].state_dict()))
        resumed.sources[task].load_state_dict(state)
        assert _same(a.sources[task].next_batch(), resumed.sources[task].next_batch()), task


def test_sharding_splits_each_global_batch(tiny_video_corpus):
    one = _data(tiny_video_corpus, seed=9)
    two = [build_video_pretrain_data(tiny_video_corpus.video_db, tiny_video_corpus.sub_db, "vsm", max_frames=30,
                                     seed=9, vids=tiny_video_corpus.vids("train"), rank=r, world_size=2)
           for r in range(2)]
    for _ in range(3):
        whole = one.sources["vsm"].next_batch()["vids"]
        parts = [d.sources["vsm"].next_batch()["vids"] for d in two]
        assert sorted(whole) == sorted(parts[0] + parts[1]) and parts[0] and parts[1]


def test_validation_pass_covers_every_video(tiny_video_corpus):
    d = build_video_pretrain_data(tiny_video_corpus.video_db, tiny_video_corpus.sub_db, "fom", max_frames=60,
                                  vids=tiny_video_corpus.vids("val"), train=False)
    seen = [v for b in d.batches("fom") for v in b["vids"]]  # official fom_eval_collate key
    assert sorted(seen) == sorted(tiny_video_corpus.vids("val"))


def test_synthetic_corpus_facts(tiny_video_corpus):
    c = tiny_video_corpus
    info = c.info
    assert info["special_ids"] == {"BOS": 0, "EOS": 2, "SEP": 2, "CLS": 0, "PAD": 1, "MASK": 4, "UNK": 3}
    vdb, sdb = VideoFeatDB(c.video_db), SubtitleDB(c.sub_db)
    assert vdb.vfeat_dim == info["vfeat_dim"] == 16 and vdb.frame_interval == info["frame_interval"]
    assert set(c.vids("train")) | set(c.vids("val")) == set(vdb.vids) == set(sdb.vids)
    n_frames = {v: vdb.name2nframe[v] for v in vdb.vids}
    assert min(n_frames.values()) >= 1 and max(n_frames.values()) <= 12 and 1 in n_frames.values()
    pseudo = no_frame_subs = unmatched = 0
    for vid in sdb.vids:
        ids, pairs, um = sdb.read(vid, n_frames[vid])  # raises if a frame is past the video
        frames = sorted(f for _, fs in pairs for f in fs)
        assert sorted(frames + um) == list(range(n_frames[vid]))  # every frame: one subtitle or unmatched
        pseudo += all(not x for x in ids)
        no_frame_subs += sum(1 for _, fs in pairs if not fs)
        unmatched += len(um)
        assert max((t for x in ids for t in x), default=5) < info["vocab_size"]
        assert all(t >= 5 for x in ids for t in x)  # words only: no <unk> (3) nor other special ids
    assert pseudo >= 1 and no_frame_subs >= 1 and unmatched >= 1
    iv = info["frame_interval"]
    for split in ("train", "val"):
        tvr = QueryDB(c.query_db("tvr", split))
        for qid in tvr.ids:
            ex, n = tvr[qid], n_frames[tvr.query2video[qid]]
            st, ed = moment_frames(ex["target"], iv, n, tvr.name, qid)  # raises when outside the video
            assert 0 <= st <= ed < n and ex["target"][1] <= n * iv
            assert min(ex["input_ids"]) >= 5
        qa = QueryDB(c.query_db("tvqa", split))
        for qid in qa.ids:
            ex = qa[qid]
            assert min(t for x in ex["input_ids"] for t in x) >= 5
            answers = [tuple(a) for a in ex["input_ids"][1:]]
            assert 0 <= ex["target"] < 5 and len(set(answers)) == 5
            st, ed = (float(x) for x in ex["ts"].split("-"))
            assert 0 <= st < ed <= n_frames[qa.query2video[qid]] * iv
        vio = QueryDB(c.query_db("violin", split))
        for qid in vio.ids:
            other = vio[paired_statement_id(qid)]
            assert bool(vio[qid]["target"]) == qid.endswith("-1") and bool(other["target"]) != bool(vio[qid]["target"])
            assert other["input_ids"] != vio[qid]["input_ids"]
        cap = CaptionDB(c.query_db("tvc", split))
        for vid, cids in cap.vid2caps.items():
            for cid in cids:
                ts = cap.caption(cid)["ts"]
                assert 0 <= ts[0] < ts[1] <= n_frames[vid] * iv


def test_downstream_sources_run(tiny_video_corpus):
    c = tiny_video_corpus
    for task, db in (("tvr", "tvr"), ("videoqa", "tvqa"), ("violin", "violin"), ("tvc", "tvc")):
        d = build_video_task_data(task, c.video_db, c.sub_db, c.query_db(db, "train"), max_frames=60, seed=1)
        b = d.sources[task].next_batch()
        assert b["c_v_feats"].shape[-1] == 16 and np.isfinite(b["c_v_feats"].numpy()).all()
        if task == "tvr":
            n = b["c_attn_masks"].sum(1)[b["q_vidx"]]
            assert ((b["targets"][:, 0] <= b["targets"][:, 1]) & (b["targets"][:, 1] < n)).all()
        if task == "videoqa":
            assert b["qa_input_ids"].shape[0] == 5 * b["targets"].shape[0] and (b["targets"] < 5).all()
    with pytest.raises(ValueError, match=r"'max_frames' 20 .* 5 per TVQA question"):
        build_video_task_data("videoqa", c.video_db, c.sub_db, c.query_db("tvqa", "train"), max_frames=20)


def test_synthetic_qa_events():
    """qa_events=0: one TVQA question and one VIOLIN pair per event; the videos, subtitles, TVR and TVC rows and the
    first two events' TVQA / VIOLIN rows equal those of the default qa_events=2 (the version-4 corpus)."""
    from fastvl.data.video.synthetic import generate_videos

    base = dict(seed=7, n_train_videos=5, n_val_videos=2, vfeat_dim=16, max_frames=14)
    every = generate_videos(VideoSyntheticConfig(**base, qa_events=0), "train")
    two = generate_videos(VideoSyntheticConfig(**base), "train")
    one = generate_videos(VideoSyntheticConfig(**base, qa_events=1), "train")
    assert VideoSyntheticConfig(**base).key() != VideoSyntheticConfig(**base, qa_events=0).key()
    assert sum(len(v["events"]) for v in every) > sum(min(len(v["events"]), 2) for v in every)
    for a, b, c in zip(every, two, one):
        n = len(a["events"])
        assert np.array_equal(a["features"], b["features"]) and a["subs"] == b["subs"]
        for k in ("tvr", "tvc"):
            assert a["annotations"][k] == b["annotations"][k]
        qa, vio = a["annotations"]["tvqa"], a["annotations"]["violin"]
        assert len(qa) == n and len(vio) == 2 * n and len({r["qid"] for r in qa}) == n
        assert qa[:2] == b["annotations"]["tvqa"] and vio[:4] == b["annotations"]["violin"]
        assert len(b["annotations"]["tvqa"]) == min(n, 2) and len(c["annotations"]["tvqa"]) == min(n, 1)
        assert len(c["annotations"]["violin"]) == 2 * min(n, 1)
        asked = sorted(r["ts"] for r in qa)  # every event is asked about once (its moment)
        iv = VideoSyntheticConfig(**base).frame_interval
        assert asked == sorted(f"{round(e['t'] * iv + 0.01, 3)}-{round(min(e['t'] + 2, a['nframes']) * iv - 0.01, 3)}"
                               for e in a["events"])
    with pytest.raises(ValueError, match="qa_events"):
        VideoSyntheticConfig(**base, qa_events=-1)
