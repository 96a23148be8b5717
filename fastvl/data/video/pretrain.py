"""HERO pre-training data: per-task batch sources over one (video db, subtitle db) pair.

Tasks: ``mlm``, ``mfm-nce`` and ``mffr`` (both the MFM collate), ``fom``, ``vsm``; official mix 2:2:1:2
(mlm : mfm-nce : fom : vsm). Batches hold whole videos, grouped by length (``TokenBucketSampler`` over the frame
count with a frame budget per batch). Each source is a :class:`fastvl.data.PretrainBatchSource` (``next_batch()``,
``state_dict()``, ``load_state_dict()``) that yields the official collate dict of its task as a
:class:`~fastvl.data.video.collate.VideoBatch`.

Determinism: every random choice of an example comes from ``(seed, task, epoch, batch position, slot in the global
batch)``, so batches do not depend on the number of processes, DataLoader workers, or where a run resumed.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from ..errors import BadExampleCounter, DataError
from ..pretrain_data import PretrainBatchSource, parse_task_mix
from ..sampler import TokenBucketSampler
from .collate import VideoBatch, fom_collate, mfm_collate, mlm_collate, vsm_collate
from .dataset import VideoSubData
from .video_db import SubtitleDB, VideoFeatDB

__all__ = ["VIDEO_TASKS", "DEFAULT_VIDEO_MIX", "VideoPretrainData", "build_video_pretrain_data", "parse_video_tasks",
           "task_seed", "video_sampler"]

VIDEO_TASKS = ("mlm", "mfm-nce", "mffr", "fom", "vsm")
DEFAULT_VIDEO_MIX = "mlm:2,mfm-nce:2,fom:1,vsm:2"


def parse_video_tasks(tasks: str | Sequence[str] | dict[str, float]) -> dict[str, float]:
    """``"mlm:2,mfm-nce:2,fom:1,vsm:2"``, a list (ratio 1 each) or a dict -> {task: ratio} (see
    :func:`fastvl.data.pretrain_data.parse_task_mix`)."""
    return parse_task_mix(tasks, VIDEO_TASKS, "parse_video_tasks")


def video_sampler(lens: Sequence[int], max_frames: int, bucket_size: int, size_multiple: int, train: bool, seed: int,
                  rank: int, world_size: int) -> TokenBucketSampler:
    """Length-bucketed batches of videos under a frame budget; in training each bucket's last batch is dropped
    unless that would leave no batch at all (small datasets)."""
    longest = max(lens, default=0)
    if longest * min(size_multiple, max(len(lens), 1)) > max_frames * world_size:
        raise ValueError(f"'max_frames' {max_frames} (x world_size {world_size}) cannot hold {size_multiple} "
                         f"example(s) of the longest, {longest} frames (every copy of a video counts: 5 per TVQA "
                         f"question, 2 per VIOLIN pair); raise max_frames to at least "
                         f"{-(-longest * size_multiple // world_size)}")

    def make(drop_last: bool) -> TokenBucketSampler:
        return TokenBucketSampler(lens, max_frames, bucket_size, size_multiple, drop_last=drop_last, shuffle=train,
                                  seed=seed, rank=rank, world_size=world_size)

    sampler = make(train)
    return make(False) if train and sampler.num_batches(0) == 0 else sampler


def task_seed(task: str) -> int:
    return zlib.crc32(task.encode()) & 0x7FFFFFFF


class VideoPretrainData:
    """Per-task batch sources over ``data`` (``sources`` and ``mix`` plug into ``fastvl.train.Trainer``).

    Args:
        data: the videos.
        tasks: {task: ratio}.
        max_frames: frame budget per rank and batch (padded: longest video x videos).
        seed: fixes the order and every masking choice. rank, world_size: this process's shard.
        train: shuffled, drop last (False: one deterministic pass in length order).
        mask_prob: MLM token / MFM frame probability; reorder_prob: FOM; query_per_video: VSM.
    """

    def __init__(self, data: VideoSubData, tasks: dict[str, float], max_frames: int = 400, seed: int = 42,
                 rank: int = 0, world_size: int = 1, train: bool = True, mask_prob: float = 0.15,
                 reorder_prob: float = 0.15, query_per_video: int = 5, bucket_size: int = 8192,
                 size_multiple: int = 1, num_workers: int = 0):
        for name, p in (("mask_prob", mask_prob), ("reorder_prob", reorder_prob)):
            if not 0.0 < p <= 1.0:
                raise ValueError(f"VideoPretrainData: '{name}' must be in (0, 1], got {p}")
        if query_per_video < 1:
            raise ValueError(f"VideoPretrainData: 'query_per_video' must be >= 1, got {query_per_video}")
        self.examples, self.mix, self.seed, self.train = data, dict(tasks), seed, train
        self.mask_prob, self.reorder_prob, self.query_per_video = mask_prob, reorder_prob, query_per_video
        self.bad: BadExampleCounter = data.bad
        self.dims = {"vfeat_dim": data.vfeat_dim, "vocab_size": data.sub_db.vocab_size,
                     "max_frm_seq_len": max(data.lens), "pad_id": data.sub_db.pad, "cls_id": data.cls_,
                     "sep_id": data.sep, "mask_id": data.mask}
        self.task_items: dict[str, list[int]] = {}
        self.sources: dict[str, PretrainBatchSource] = {}
        for task in tasks:
            items = [i for i in range(len(data)) if task not in ("vsm", "mlm") or self._usable(task, i)]
            if not items:
                raise DataError(data.sub_db.name, None, f"no video usable for task {task}", "no_examples")
            self.task_items[task] = items
            sampler = video_sampler([data.lens[i] for i in items], max_frames, bucket_size, size_multiple, train,
                                    seed * 1_000_003 + task_seed(task), rank, world_size)
            self.sources[task] = PretrainBatchSource(self, task, sampler, num_workers)

    def _usable(self, task: str, i: int) -> bool:
        """VSM needs a subtitle with frames, MLM a subtitle with text (empty pseudo-subtitles have none)."""
        vid = self.examples.vids[i]
        try:
            ids, pairs = self.examples.subtitles(vid)
            if task == "vsm":
                return any(frames for _, frames in pairs)
            return any(ids[k] for k, _ in pairs)
        except DataError as e:
            self.bad.skip_or_raise(e, self.examples.skip)
            return False

    def batches(self, task: str, epoch: int = 0) -> Iterator[VideoBatch]:
        """One pass over the data for ``task`` (validation)."""
        return self.sources[task].iter_epoch(epoch)

    def make_example(self, task: str, vid: str, rng: np.random.Generator) -> Any:
        """The official dataset item of ``vid`` for ``task`` (None: MLM on a video without text)."""
        d = self.examples
        if task == "mlm":
            segs = d.mlm_example(vid, rng, self.mask_prob)
            return segs or None
        if task in ("mfm-nce", "mffr"):
            return d.mfm_example(vid, rng, self.mask_prob)
        if task == "fom":
            return d.fom_example(vid, rng, self.reorder_prob)
        return d.vsm_example(vid, rng, self.query_per_video)

    def make_batch(self, task: str, epoch: int, pos: int, indices: Sequence[int], rank: int = 0,
                   world_size: int = 1) -> VideoBatch | None:
        """The batch of global batch ``pos`` of ``epoch`` holding ``indices`` (this rank's share); None when every
        video was skipped as bad."""
        items = self.task_items[task]
        code = task_seed(task)
        out, vids = [], []
        for k, i in enumerate(indices):
            rng = np.random.default_rng([self.seed, code, epoch, pos, rank + k * world_size])
            try:
                vid = self.examples.vids[items[i]]
                ex = self.make_example(task, vid, rng)
            except DataError as err:
                self.bad.skip_or_raise(err, self.examples.skip)
                continue
            if ex is not None:
                out.append(ex)
                vids.append(vid)
        if not out:
            return None
        collate = {"mlm": mlm_collate, "mfm-nce": mfm_collate, "mffr": mfm_collate, "fom": fom_collate,
                   "vsm": vsm_collate}[task]
        batch = collate(out)
        if task == "fom" and not self.train:
            batch["vids"] = vids  # official fom_eval_collate
        return batch


def build_video_pretrain_data(video_db: str | os.PathLike, sub_db: str | os.PathLike,
                              tasks: str | Sequence[str] | dict[str, float] = DEFAULT_VIDEO_MIX,
                              max_frames: int = 400, seed: int = 42, rank: int = 0, world_size: int = 1,
                              train: bool = True, max_clip_len: int = 100, max_txt_len: int = 60,
                              vids: Sequence[str] | None = None, skip_bad_examples: bool = False,
                              **kwargs) -> VideoPretrainData:
    """Pre-training data over an official (video db, subtitle db) pair.

    Args:
        video_db, sub_db: the folders. vids: the videos to use (default every video of the subtitle db).
        tasks: {task: ratio} (see :func:`parse_video_tasks`). max_frames: frame budget per batch and rank.
        max_clip_len: frames kept per video (official 100). max_txt_len: subtitle tokens in MLM / VSM (60).
        skip_bad_examples: count and skip bad videos instead of raising.
        kwargs: :class:`VideoPretrainData` options (mask_prob, reorder_prob, query_per_video, ...).
    """
    vdb = VideoFeatDB(video_db, max_clip_len=max_clip_len)
    sdb = SubtitleDB(sub_db, max_clip_len=max_clip_len)
    data = VideoSubData(vdb, sdb, max_txt_len=max_txt_len, skip_bad_examples=skip_bad_examples, vids=vids)
    return VideoPretrainData(data, parse_video_tasks(tasks), max_frames, seed, rank, world_size, train, **kwargs)
