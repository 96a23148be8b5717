"""HERO downstream data: TVR (video moment retrieval), TVQA (video QA), VIOLIN and TVC (captioning), one example per
query (per video for TVC) as the official ``VcmrDataset`` / ``VideoQaDataset`` / ``ViolinDataset`` /
``TvcTrainDataset`` build them, batched by length into the official collate dicts.

Moments: ``ts`` [st, ed] seconds (TVQA: the string ``"st-ed"``) -> frames st = min(floor(st / interval), n - 1),
ed = min(max(ceil(ed / interval) - 1, st + 1), n - 1) (TVC: ed = min(max(round(ed / interval), st + 1), n), and
max index n). A moment that starts at or after the video's end, ends before it starts or ends more than one frame
past the video raises :class:`DataError` naming the query db and id (reason ``moment_outside_video``).

Evaluation batches (``train=False``) add the official eval keys: ``qids`` (tvr, videoqa, violin: one statement
per example) and ``vid_names`` / ``clip_ids`` / ``all_ts`` / ``gts`` for TVC (``TvcValDataset.collate``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from ..errors import BadExampleCounter, DataError
from ..pretrain_data import PretrainBatchSource
from .collate import VideoBatch, VideoInput, tvc_collate, vcmr_collate, video_collate, video_qa_collate, violin_collate
from .dataset import VideoSubData
from .pretrain import task_seed, video_sampler
from .query_db import CaptionDB, QueryDB, paired_statement_id
from .video_db import SubtitleDB, VideoFeatDB

__all__ = ["DOWNSTREAM_TASKS", "VideoTaskData", "build_video_task_data", "moment_frames", "tvc_eval_collate"]

DOWNSTREAM_TASKS = ("tvr", "videoqa", "violin", "tvc")


def moment_frames(ts: Sequence[float], interval: float, nframes: int, db: str, key: str, caption: bool = False
                  ) -> tuple[int, int]:
    """(st, ed) frame indices of the moment ``ts`` (seconds) as the official ``get_st_ed_label``; raises
    :class:`DataError` when the moment is outside the video of ``nframes`` frames."""
    st, ed = float(ts[0]), float(ts[1])
    if not (math.isfinite(st) and math.isfinite(ed)) or st < 0 or ed < st or st >= nframes * interval \
            or ed > (nframes + 1) * interval:
        raise DataError(db, key, f"moment [{st}, {ed}] s is outside the video ({nframes} frames x {interval} s = "
                        f"{nframes * interval} s)", "moment_outside_video")
    if caption:
        s = min(math.floor(st / interval), nframes)
        return s, min(max(round(ed / interval), s + 1), nframes)
    s = min(math.floor(st / interval), nframes - 1)
    return s, min(max(math.ceil(ed / interval) - 1, s + 1), nframes - 1)


def _append(video: VideoInput, ids: torch.Tensor) -> VideoInput:
    """The video with ``ids`` appended to every segment's text (and attention)."""
    ones = torch.ones(ids.size(0), dtype=torch.long)
    return video._replace(f_input_ids=[torch.cat([t, ids]) for t in video.f_input_ids],
                          f_attn_masks=[torch.cat([a, ones]) for a in video.f_attn_masks])


def tvc_eval_collate(inputs) -> VideoBatch:
    """Official ``TvcValDataset.collate``: cap_attn_mask, clip_ranges, ``video_collate`` keys, vid_names, clip_ids
    (int), all_ts, gts."""
    attn = torch.nn.utils.rnn.pad_sequence([a for _, _, masks, _ in inputs for a in masks], batch_first=True,
                                           padding_value=0)
    vb = video_collate([v for v, _, _, _ in inputs])
    batch = VideoBatch({"cap_attn_mask": attn, "clip_ranges": tuple(tuple(r) for _, r, _, _ in inputs), **vb})
    batch.num_tokens = vb.num_tokens
    vids, cids, all_ts, gts = [], [], [], []
    for _, _, _, (vid, clip_ids, tss, texts) in inputs:
        for cid, ts, gt in zip(clip_ids, tss, texts):
            vids.append(vid)
            cids.append(int(cid))
            all_ts.append(ts)
            gts.append(gt)
    batch.update({"vid_names": vids, "clip_ids": cids, "all_ts": all_ts, "gts": gts})
    return batch


class VideoTaskData:
    """Examples of one downstream ``task`` over ``data`` and its query / caption db, with one batch source
    (``sources[task]``; ``mix`` = {task: 1}) for ``fastvl.train.Trainer``.

    Args:
        max_frames: frame budget per batch and rank (every copy of a video counts: 5 per TVQA question, 2 per
            VIOLIN pair).
        train: training examples and collate (shuffled, drop last) or the official eval collate (one pass).
    """

    def __init__(self, task: str, data: VideoSubData, query_db: QueryDB | CaptionDB, max_frames: int = 400,
                 seed: int = 42, rank: int = 0, world_size: int = 1, train: bool = True, bucket_size: int = 8192,
                 size_multiple: int = 1, num_workers: int = 0):
        if task not in DOWNSTREAM_TASKS:
            raise ValueError(f"VideoTaskData: 'task' must be one of {DOWNSTREAM_TASKS}, got {task!r}")
        self.task, self.examples, self.db, self.train, self.seed = task, data, query_db, train, seed
        self.bad: BadExampleCounter = data.bad
        self.mix = {task: 1.0}
        self.interval = data.video_db.frame_interval
        vids = set(data.vids)
        copies = {"tvr": 1, "videoqa": 5, "violin": 2 if train else 1, "tvc": 1}[task]
        self.items: list[tuple[str, str]] = []  # (example id, vid)
        if task == "tvc":
            keys = query_db.vid2caps if train else query_db.vid2clips
            self.items = [(v, v) for v in keys if v in vids]
        else:
            for qid in query_db.ids:
                vid = query_db.query2video.get(qid)
                if vid in vids and (task != "violin" or not train or paired_statement_id(qid) in query_db.id2len):
                    self.items.append((qid, vid))
        if not self.items:
            raise DataError(query_db.name, None, f"no {task} example whose video is in {data.sub_db.name}",
                            "no_examples")
        lens = [data.video_db.nframes(v) * copies for _, v in self.items]
        self.dims = {"vfeat_dim": data.vfeat_dim, "vocab_size": data.sub_db.vocab_size,
                     "max_frm_seq_len": max(data.lens), "pad_id": data.sub_db.pad}
        sampler = video_sampler(lens, max_frames, bucket_size, size_multiple, train,
                                seed * 1_000_003 + task_seed(task), rank, world_size)
        self.sources = {task: PretrainBatchSource(self, task, sampler, num_workers)}

    def __len__(self) -> int:
        return len(self.items)

    def batches(self, epoch: int = 0) -> Iterator[VideoBatch]:
        return self.sources[self.task].iter_epoch(epoch)

    # ------------------------------------------------------------------------------------------ examples
    def _nframes(self, vid: str) -> tuple[int, int]:
        """(frames after the cut, stored frames)."""
        return self.examples.video_db.nframes(vid), self.examples.video_db.name2nframe[vid]

    def _span(self, ts, vid: str, key: str, caption: bool = False) -> tuple[int, int]:
        n, full = self._nframes(vid)
        st, ed = moment_frames(ts, self.interval, full, self.db.name, key, caption)
        top = n if caption else n - 1
        return min(st, top), min(ed, top)

    def make_example(self, qid: str, vid: str, rng: np.random.Generator) -> tuple[tuple, str]:
        """(the official dataset item of ``qid`` (of ``vid`` for TVC) for this task's collate, its id)."""
        d, db, task = self.examples, self.db, self.task
        video = d.video_input(vid)
        if task == "tvr":
            ex = db[qid]
            st, ed = self._span(ex.get("target") or ex.get("ts"), vid, qid)
            q = torch.tensor([db.cls_] + list(ex["input_ids"]), dtype=torch.long)
            return (video, vid, ((q, torch.ones(len(q), dtype=torch.long), vid, torch.tensor([st, ed])),)), qid
        if task == "videoqa":
            ex = db[qid]
            ids = ex["input_ids"]
            if len(ids) != 6:
                raise DataError(db.name, qid, f"tvqa record needs 6 token lists (q, a0..a4), got {len(ids)}",
                                "corrupt_record")
            target = ex.get("target")
            st, ed = -1, -1
            if ex.get("ts") is not None:
                try:
                    ts = [float(x) for x in str(ex["ts"]).split("-")]
                except ValueError:
                    ts = None
                if ts is not None and len(ts) == 2:
                    st, ed = self._span(ts, vid, qid)
            qas = [torch.tensor([db.sep] + list(ids[0]) + [db.sep] + list(a), dtype=torch.long) for a in ids[1:]]
            return ([_append(video, qa) for qa in qas], qas, [torch.ones(len(qa), dtype=torch.long) for qa in qas],
                    [vid], [torch.tensor([-1 if target is None else int(target)])], [torch.tensor([st, ed])]), qid
        if task == "violin":
            qids = [qid, paired_statement_id(qid)] if self.train else [qid]
            vids_, stmts, attn, targets = [], [], [], []
            for q in qids:
                ex = db[q]
                s = torch.tensor([db.sep] + list(ex["input_ids"]), dtype=torch.long)
                stmts.append(s)
                attn.append(torch.ones(len(s), dtype=torch.long))
                vids_.append(vid)
                targets.append(torch.tensor([1 if ex.get("target") else 0]))
            return ([_append(video, s) for s in stmts], stmts, attn, vids_, targets), qid
        # tvc
        ranges, caps = [], []
        if self.train:
            for cid in db.vid2caps[vid]:
                ex = db.caption(cid)
                st, ed = self._span(ex["ts"], vid, cid, caption=True)
                ranges.append((st, ed))
                caps.append((torch.tensor(ex["input_ids"], dtype=torch.long),
                             torch.tensor(ex["tgt_ids"], dtype=torch.long), torch.ones(ed - st, dtype=torch.long)))
            return (video, ranges, caps), vid
        clip_ids, tss, gts, masks = [], [], [], []
        for clip_id in db.vid2clips[vid]:
            ex = db.clip(clip_id)
            st, ed = self._span(ex["ts"], vid, clip_id, caption=True)
            ranges.append((st, ed))
            masks.append(torch.ones(ed - st, dtype=torch.long))
            clip_ids.append(clip_id)
            tss.append(ex["ts"])
            gts.append(ex["captions"][0]["text"] if ex.get("captions") else "")
        return (video, ranges, masks, (vid, clip_ids, tss, gts)), vid

    def make_batch(self, task: str, epoch: int, pos: int, indices: Sequence[int], rank: int = 0,
                   world_size: int = 1) -> VideoBatch | None:
        out, ids = [], []
        for i in indices:
            qid, vid = self.items[i]
            try:
                ex, key = self.make_example(qid, vid, np.random.default_rng([self.seed, epoch, pos, i]))
            except DataError as err:
                self.bad.skip_or_raise(err, self.examples.skip)
                continue
            out.append(ex)
            ids.append(key)
        if not out:
            return None
        if self.task == "tvr":
            batch = vcmr_collate(out)
        elif self.task == "videoqa":
            batch = video_qa_collate(out)
        elif self.task == "violin":
            batch = violin_collate(out)
        else:
            batch = tvc_collate(out) if self.train else tvc_eval_collate(out)
        if not self.train and self.task != "tvc":
            batch["qids"] = ids
        return batch


def build_video_task_data(task: str, video_db: str | os.PathLike, sub_db: str | os.PathLike,
                          query_db: str | os.PathLike, max_frames: int = 400, seed: int = 42, rank: int = 0,
                          world_size: int = 1, train: bool = True, max_clip_len: int = 100, max_txt_len: int = 60,
                          sub_ctx_len: int | None = None, skip_bad_examples: bool = False,
                          **kwargs) -> VideoTaskData:
    """Downstream data of ``task`` (tvr / videoqa / violin / tvc) over official dbs; ``query_db`` is the query db
    (tvr, videoqa: a tvqa db, violin) or the caption db (tvc). ``sub_ctx_len`` default: 2 for violin, else 0."""
    if task not in DOWNSTREAM_TASKS:
        raise ValueError(f"build_video_task_data: 'task' must be one of {DOWNSTREAM_TASKS}, got {task!r}")
    vdb = VideoFeatDB(video_db, max_clip_len=max_clip_len)
    sdb = SubtitleDB(sub_db, max_clip_len=max_clip_len)
    ctx = (2 if task == "violin" else 0) if sub_ctx_len is None else sub_ctx_len
    qdb = CaptionDB(query_db) if task == "tvc" else QueryDB(query_db)
    data = VideoSubData(vdb, sdb, max_txt_len=max_txt_len, sub_ctx_len=ctx, skip_bad_examples=skip_bad_examples)
    return VideoTaskData(task, data, qdb, max_frames, seed, rank, world_size, train, **kwargs)
