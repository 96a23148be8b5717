"""The official HERO collate dicts, written out by hand for the hand-built videos of conftest.py (a one-frame video,
a subtitle with no frame, a frame of no subtitle, empty pseudo-subtitles), and the masking rules of each task."""

import numpy as np
import pytest
import torch
from hero_dbs import frame_features

from fastvl.data.video import (
    QueryDB,
    SubtitleDB,
    VideoFeatDB,
    VideoSubData,
    build_video_task_data,
    fom_collate,
    mfm_collate,
    mlm_collate,
    video_collate,
    vsm_collate,
)
from fastvl.data.video.dataset import bert_mask, mask_frames, random_reorder

T = torch.tensor


@pytest.fixture(scope="module")
def data(hand_dbs):
    return VideoSubData(VideoFeatDB(hand_dbs["video_db"]), SubtitleDB(hand_dbs["sub_db"]))


def _feats(vid, frames):
    return torch.from_numpy(frame_features(vid)[frames])


def test_video_collate_written_out(data):
    b = video_collate([data.video_input(v) for v in "ABC"])
    # segments: A0 [</s> 7 8] + frames 0,1 | A1 [</s> 9] + zero frame (attn 0) | B0 [</s> 10 11 12] + frame 0
    #           C0 [</s>] + frames 0-4 (pseudo) | C1 [</s>] + frame 5 (pseudo)
    assert torch.equal(b["f_sub_input_ids"], T([[2, 7, 8, 1], [2, 9, 1, 1], [2, 10, 11, 12], [2, 1, 1, 1],
                                                [2, 1, 1, 1]]))
    assert torch.equal(b["f_sub_pos_ids"], T([[0, 1, 2, 3]])) and torch.equal(b["f_v_pos_ids"], T([[0, 1, 2, 3, 4]]))
    assert torch.equal(b["f_attn_masks"], T([[1, 1, 1, 1, 1, 0], [0, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0],
                                             [1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]]))
    assert torch.equal(b["f_gather_index"], T([[0, 1, 5, 6, 7, 5], [0, 5, 6, 3, 4, 5], [0, 5, 6, 7, 8, 5],
                                               [0, 1, 2, 3, 4, 5], [0, 5, 2, 3, 4, 5]]))
    assert torch.equal(b["f_sub_input_attn_masks"], T([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0],
                                                       [1, 0, 0, 0]]))
    f = torch.zeros(5, 5, 2)
    f[0, :2], f[2, :1], f[3, :5], f[4, :1] = _feats("A", [0, 1]), _feats("B", [0]), _feats("C", [0, 1, 2, 3, 4]), \
        _feats("C", [5])
    assert torch.equal(b["f_v_feats"], f)
    c = torch.zeros(3, 6, 2)
    c[0, :3], c[1, :1], c[2] = _feats("A", [0, 1, 2]), _feats("B", [0]), _feats("C", list(range(6)))
    assert torch.equal(b["c_v_feats"], c)
    assert torch.equal(b["c_attn_masks"], T([[1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0], [1] * 6]))
    assert torch.equal(b["c_pos_ids"], torch.arange(6).repeat(3, 1))
    assert b["num_subs"] == [2, 1, 2]
    assert b["sub_idx2frame_idx"] == [[(0, [0, 1]), (1, [])], [(0, [0])], [(0, [0, 1, 2, 3, 4]), (1, [5])]]
    for k in ("f_sub_input_ids", "f_attn_masks", "f_gather_index", "c_pos_ids", "c_attn_masks"):
        assert b[k].dtype == torch.long
    assert b["f_v_feats"].dtype == b["c_v_feats"].dtype == torch.float32
    moved = b.to("cpu")
    assert set(moved) == set(b) and moved.num_tokens == b.num_tokens > 0


def test_mlm_collate_written_out(data):
    rng = np.random.default_rng(0)
    # mask_prob 1: every token is a target (80/10/10 decides what the input shows); the pseudo-subtitles of C have
    # no text and are skipped
    segs = [data.mlm_example(v, rng, mask_prob=1.0) for v in "ABC"]
    assert [len(s) for s in segs] == [2, 1, 0]
    b = mlm_collate(segs)
    assert set(b) == {"input_ids", "position_ids", "v_feat", "attn_masks", "gather_index", "txt_mask_tgt",
                      "txt_labels"}
    assert b["input_ids"].shape == (3, 4) and b["input_ids"][:, 0].tolist() == [0, 0, 0]  # [<s>] first
    assert b["input_ids"][0, 3] == 1 and b["input_ids"][1, 2:].tolist() == [1, 1]  # pad 1
    assert torch.equal(b["position_ids"], T([[0, 1, 2, 3]]))
    assert torch.equal(b["attn_masks"], T([[1, 1, 1, 1, 1], [0, 1, 1, 0, 0], [1, 1, 1, 1, 1]]))
    assert torch.equal(b["gather_index"], T([[0, 1, 2, 3, 4], [0, 2, 3, 3, 4], [0, 2, 3, 4, 5]]))
    f = torch.zeros(3, 2, 2)
    f[0], f[2, :1] = _feats("A", [0, 1]), _feats("B", [0])
    assert torch.equal(b["v_feat"], f)
    assert torch.equal(b["txt_mask_tgt"], T([[0, 0, 0, 1, 1], [0, 0, 1, 0, 0], [0, 0, 1, 1, 1]]).bool())
    assert torch.equal(b["txt_labels"], T([7, 8, 9, 10, 11, 12]))
    for row, orig in zip(b["input_ids"].tolist(), ([7, 8], [9], [10, 11, 12])):  # <mask>, a word id, or kept
        assert all(t == 4 or 5 <= t < 25 for t in row[1:1 + len(orig)])


def test_bert_mask_rates(seed):
    rng = np.random.default_rng(seed)
    ids = list(range(5, 25)) * 1000
    out, labels = bert_mask(ids, rng, 0.15, 4, (5, 25))
    chosen = np.array(labels) != -1
    assert abs(chosen.mean() - 0.15) < 0.015
    out, ids_a = np.array(out)[chosen], np.array(ids)[chosen]
    assert abs((out == 4).mean() - 0.8) < 0.04
    assert (np.array(labels)[chosen] == ids_a).all() and (np.array(out) != 4).sum() > 0
    # at least one: a one-token subtitle that the draw left alone gets its first token masked
    assert bert_mask([9], np.random.default_rng(seed), 1e-9, 4, (5, 25)) == ([4], [9])


def test_mfm_collate_masks(data, seed):
    rng = np.random.default_rng(seed)
    exs = [data.mfm_example(v, rng) for v in "ABC"]
    b = mfm_collate(exs)
    c_masks = b["c_v_masks"]
    assert c_masks.dtype == torch.bool and c_masks.shape == (3, 6)
    assert [int(c_masks[i].sum()) >= 1 for i in range(3)] == [True] * 3  # >= 1 masked frame per video
    assert not c_masks[0, 3:].any() and not c_masks[1, 1:].any()  # padding never masked
    orig = video_collate([data.video_input(v) for v in "ABC"])
    assert torch.equal(b["feat_targets"], orig["c_v_feats"][c_masks])
    assert torch.equal(b["c_v_feats"], orig["c_v_feats"].masked_fill(c_masks[..., None], 0))
    # a segment's frame mask = the masks of its frames; the zero frame of A1 never masked
    want = torch.zeros(5, 5, dtype=torch.bool)
    want[0, :2], want[2, :1], want[3, :5], want[4, :1] = c_masks[0, :2], c_masks[1, :1], c_masks[2, :5], \
        c_masks[2, 5:6]
    assert torch.equal(b["f_v_masks"], want)
    assert torch.equal(b["f_v_feats"], orig["f_v_feats"].masked_fill(want[..., None], 0))
    m = mask_frames(1000, np.random.default_rng(seed), 0.15)
    assert abs(m.mean() - 0.15) < 0.04 and mask_frames(1, np.random.default_rng(seed), 1e-9).tolist() == [True]


def test_fom_collate_pairs(data):
    video = data.video_input("C")
    # hand-made shuffle of video C (6 frames): positions 1 and 4 swapped
    order, target = T([0, 4, 2, 3, 1, 5]), T([-1, 4, -1, -1, 1, -1])
    b = fom_collate([(data.video_input("B"), T([0]), T([-1])), (video, order, target)])
    assert torch.equal(b["shuffled_orders"], T([[0, 1, 2, 3, 4, 5], [0, 4, 2, 3, 1, 5]]))
    assert torch.equal(b["targets"], T([[-1] * 6, [-1, 4, -1, -1, 1, -1]]))
    # pair (1, 4) of video 1 (rows 6 + i): target 4 > 1 -> 0, then the swapped pair -> 1
    assert torch.equal(b["reordered_frame_idx"], T([7, 10, 10, 7])) and torch.equal(b["binary_targets"], T([0, 1]))


def test_random_reorder_rule(seed):
    rng = np.random.default_rng(seed)
    order, target = random_reorder(200, rng, 0.15)
    chosen = [i for i in range(200) if order[i] != i or target[order[i]] != -1]
    assert sorted(order) == list(range(200))  # a permutation
    assert all(target[order[p]] == p for p in chosen)  # the target of a shuffled frame is its original position
    assert all(order[p] == p for p in range(200) if p not in chosen)
    assert 10 <= sum(t != -1 for t in target) <= 55


def test_vsm_queries_written_out(data):
    rng = np.random.default_rng(1)
    exs = [data.vsm_example(v, rng) for v in "ABC"]
    b = vsm_collate(exs)
    # A: the one subtitle with frames (A0) is the query, its text removed from its segment; B: one frame
    # (st 0, ed min(max(1, 0), 0) = 0); C: both pseudo-subtitles are queries with no words
    assert torch.equal(b["f_sub_input_ids"], T([[2, 1], [2, 9], [2, 1], [2, 1], [2, 1]]))
    assert torch.equal(b["q_vidx"], T([0] * 5 + [1] * 5 + [2] * 5))
    qs = b["query_input_ids"]
    assert qs.shape == (15, 4) and qs[:5].tolist() == [[0, 7, 8, 1]] * 5 and qs[5].tolist() == [0, 10, 11, 12]
    assert qs[10:].tolist() == [[0, 1, 1, 1]] * 5 and b["query_attn_masks"][10:].tolist() == [[1, 0, 0, 0]] * 5
    assert b["targets"].tolist() == [[0, 1]] * 5 + [[0, 0]] * 5 + [[0, 4], [5, 5], [5, 5], [5, 5], [5, 5]]
    assert torch.equal(b["query_pos_ids"], T([[0, 1, 2, 3]])) and b["vids"] == ["A", "B", "C"]


def test_downstream_collates_written_out(hand_dbs):
    tvr = build_video_task_data("tvr", hand_dbs["video_db"], hand_dbs["sub_db"], hand_dbs["tvr_db"], train=False)
    b = next(iter(tvr.batches()))
    assert b["qids"] == ["qa", "qb"] and b["vids"] == ["A", "B"]
    assert torch.equal(b["query_input_ids"], T([[0, 13, 14], [0, 15, 1]]))
    assert torch.equal(b["targets"], T([[0, 1], [0, 0]]))  # ts [0.1, 2.9] s and [0, 1.4] s at 1.5 s per frame
    assert torch.equal(b["q_vidx"], T([0, 1])) and b["c_v_feats"].shape == (2, 3, 2)

    qa = build_video_task_data("videoqa", hand_dbs["video_db"], hand_dbs["sub_db"], hand_dbs["tvqa_db"], train=True)
    b = qa.make_batch("videoqa", 0, 0, [0])
    # 5 copies of video A, [</s>] q [</s>] a appended to each of its 2 segments
    assert b["f_sub_input_ids"].shape[0] == 10 and b["num_subs"] == [2] * 5
    assert b["f_sub_input_ids"][4].tolist() == [2, 7, 8, 2, 13, 2, 7, 8]  # answer 2 = [7, 8], segment A0
    assert b["f_sub_input_ids"][1].tolist() == [2, 9, 2, 13, 2, 5, 1, 1]  # answer 0, segment A1
    assert b["f_attn_masks"][1].tolist() == [0, 1, 1, 1, 1, 1, 1, 0, 0, 0]
    assert torch.equal(b["qa_input_ids"], T([[2, 13, 2, 5, 1], [2, 13, 2, 6, 1], [2, 13, 2, 7, 8],
                                             [2, 13, 2, 9, 1], [2, 13, 2, 10, 1]]))
    assert torch.equal(b["targets"], T([[3]])) and torch.equal(b["ts_targets"], T([[1, 2]]))
    assert torch.equal(b["qa_pos_ids"], T([[0, 1, 2, 3, 4]])) and b["qa_attn_masks"].sum() == 21

    vio = build_video_task_data("violin", hand_dbs["video_db"], hand_dbs["sub_db"], hand_dbs["violin_db"])
    b = vio.make_batch("violin", 0, 0, [vio.items.index(("A_0-1", "A"))])
    assert torch.equal(b["targets"], T([[1], [0]]))  # the statement and its paired one
    assert torch.equal(b["q_input_ids"], T([[2, 16, 17, 1], [2, 16, 18, 19]]))
    # sub_ctx_len 2 (official VIOLIN): segment A1 holds the text of A0 and A1
    assert b["f_sub_input_ids"][1].tolist()[:7] == [2, 7, 8, 9, 2, 16, 17]
    assert QueryDB(hand_dbs["violin_db"])["A_0-1"]["target"] is True

    tvc = build_video_task_data("tvc", hand_dbs["video_db"], hand_dbs["sub_db"], hand_dbs["tvc_db"])
    b = tvc.make_batch("tvc", 0, 0, [0])
    assert torch.equal(b["cap_input_ids"], T([[0, 20, 21]])) and torch.equal(b["cap_tgt_ids"], T([[20, 21, 2]]))
    assert b["clip_ranges"] == (((1, 4),),) and torch.equal(b["cap_attn_mask"], T([[1, 1, 1]]))
    ev = build_video_task_data("tvc", hand_dbs["video_db"], hand_dbs["sub_db"], hand_dbs["tvc_db"], train=False)
    b = next(iter(ev.batches()))
    assert b["vid_names"] == ["C"] and b["clip_ids"] == [1] and b["gts"] == ["w15 w16"] and "cap_input_ids" not in b
