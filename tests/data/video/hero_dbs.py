"""Hand-built HERO dbs for the data tests.

Videos (frame interval 1.5 s, 2-d features, feature of frame f of video v = [v * 100 + f, -f]):

- ``A``: 3 frames; subtitle 0 = ids [7, 8] on frames 0-1, subtitle 1 = [9] with NO frame; frame 2 matched to no
  subtitle (``unmatched_frames`` [2]).
- ``B``: ONE frame; subtitle 0 = [10, 11, 12] on frame 0.
- ``C``: 6 frames, no subtitles: EMPTY pseudo-subtitles on frames 0-4 and 5.
"""

import numpy as np

from fastvl.data.video import (
    CaptionDBWriter,
    QueryDBWriter,
    SubtitleDBWriter,
    VideoFeatDBWriter,
    WordVocab,
)

INTERVAL = 1.5
NFRAMES = {"A": 3, "B": 1, "C": 6}
VOCAB = WordVocab([f"w{i}" for i in range(20)])  # ids 5..24


def frame_features(vid: str) -> np.ndarray:
    v = "ABC".index(vid) + 1
    n = NFRAMES[vid]
    return np.stack([np.full(n, v * 100.0) + np.arange(n), -np.arange(n, dtype=np.float64)], 1).astype(np.float32)


def write_hand_dbs(root, compress: bool = False, fp16: bool = False) -> dict:
    meta = VOCAB.meta()
    with VideoFeatDBWriter(root / "video_db", "toy", INTERVAL, compress=compress, fp16=fp16) as w:
        for vid in "ABC":
            w.put(vid, frame_features(vid))
    with SubtitleDBWriter(root / "sub_db", meta) as w:
        w.put("A", [[7, 8], [9]], [(0, [0, 1]), (1, [])], [2], 3)
        w.put("B", [[10, 11, 12]], [(0, [0])], [], 1)
        w.put_pseudo("C", 6)
    with QueryDBWriter(root / "tvr_db", meta, "tvr") as w:
        w.put("qa", {"desc_id": "qa", "vid_name": "A", "input_ids": [13, 14], "ts": [0.1, 2.9], "target": [0.1, 2.9]})
        w.put("qb", {"desc_id": "qb", "vid_name": "B", "input_ids": [15], "ts": [0.0, 1.4], "target": [0.0, 1.4]})
    with QueryDBWriter(root / "tvqa_db", meta, "tvqa") as w:
        w.put("q1", {"qid": "q1", "vid_name": "A", "input_ids": [[13], [5], [6], [7, 8], [9], [10]], "target": 3,
                     "ts": "1.5-4.4"})
    with QueryDBWriter(root / "violin_db", meta, "violin") as w:
        w.put("A_0-1", {"vid_name": "A", "input_ids": [16, 17], "target": True})
        w.put("A_0-0", {"vid_name": "A", "input_ids": [16, 18, 19], "target": False})
    with CaptionDBWriter(root / "tvc_db", meta) as w:
        w.put_caption("1_0", "C", [1.6, 6.1], [20, 21], "w15 w16", "1")
        w.put_clip("1", "C", [1.6, 6.1], ["w15 w16"])
    return {k: root / k for k in ("video_db", "sub_db", "tvr_db", "tvqa_db", "violin_db", "tvc_db")}
