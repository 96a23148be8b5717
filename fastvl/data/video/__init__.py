"""HERO video data: the official video / subtitle / query / caption dbs (read and written), the official collate
dicts of every HERO task, per-task batch sources and the synthetic video corpus (the embedded default).

API summary:

- ``video_synthetic_corpus(cache_dir=None, config=VideoSyntheticConfig())`` -> :class:`VideoCorpus` with
  ``video_db``, ``sub_db``, ``vids(split)``, ``query_db(task, split)`` (task tvr / tvqa / violin / tvc),
  ``info`` (``vfeat_dim``, ``vocab_size``, ``special_ids`` {BOS/CLS 0, PAD 1, EOS/SEP 2, UNK 3, MASK 4},
  ``frame_interval``, ``max_frames``, ``word_ids``).
- ``build_video_pretrain_data(video_db, sub_db, tasks="mlm:2,mfm-nce:2,fom:1,vsm:2", max_frames=400, seed=42,
  vids=None, train=True)`` -> :class:`VideoPretrainData`: ``sources[task].next_batch()`` gives the official
  ``mlm_collate`` / ``mfm_collate`` (for ``mfm-nce`` and ``mffr``) / ``fom_collate`` / ``vsm_collate`` dict as a
  :class:`VideoBatch` (a dict with ``.to(device)``); ``mix`` the ratios; ``batches(task)`` one validation pass;
  ``dims`` (vfeat_dim, vocab_size, max_frm_seq_len, pad/cls/sep/mask ids).
- ``build_video_task_data(task, video_db, sub_db, query_db, ...)`` -> :class:`VideoTaskData` for the downstream
  tasks ``tvr`` (``vcmr_collate``), ``videoqa`` (``video_qa_collate``), ``violin`` (``violin_collate``) and
  ``tvc`` (``tvc_collate``); same source interface.
- Dbs: :class:`VideoFeatDB` / :class:`VideoFeatDBWriter`, :class:`SubtitleDB` / :class:`SubtitleDBWriter`,
  :class:`QueryDB` / :class:`QueryDBWriter`, :class:`CaptionDB` / :class:`CaptionDBWriter`;
  ``align_subtitles`` (temporal-IoU frame alignment) and ``make_video_data`` (npz + subtitles jsonl -> dbs;
  ``fastvl make-data --video --frames DIR --subtitles subs.jsonl --out DIR [--queries a.jsonl --query-task tvr]``).
- Bad records raise :class:`fastvl.data.DataError` naming the db and key, or are counted in ``data.bad`` with
  ``skip_bad_examples=True``.
"""

from .align import align_subtitles, pseudo_subtitles, temporal_iou
from .collate import (
    VideoBatch,
    VideoInput,
    fom_collate,
    mfm_collate,
    mlm_collate,
    tvc_collate,
    vcmr_collate,
    video_collate,
    video_qa_collate,
    violin_collate,
    vsm_collate,
)
from .dataset import VideoSubData
from .downstream import DOWNSTREAM_TASKS, VideoTaskData, build_video_task_data, moment_frames, tvc_eval_collate
from .make_data import MakeVideoDataResult, make_video_data
from .make_queries import QUERY_TASKS, read_query_rows, write_query_db
from .pretrain import DEFAULT_VIDEO_MIX, VIDEO_TASKS, VideoPretrainData, build_video_pretrain_data, parse_video_tasks
from .query_db import CaptionDB, CaptionDBWriter, QueryDB, QueryDBWriter, paired_statement_id
from .synthetic import VideoCorpus, VideoSyntheticConfig, video_synthetic_corpus, write_video_raw
from .video_db import SubtitleDB, SubtitleDBWriter, VideoFeatDB, VideoFeatDBWriter
from .vocab import WordVocab

__all__ = [
    "QUERY_TASKS", "read_query_rows", "write_query_db",
    "align_subtitles", "build_video_pretrain_data", "build_video_task_data", "CaptionDB", "CaptionDBWriter",
    "DEFAULT_VIDEO_MIX", "DOWNSTREAM_TASKS", "fom_collate", "make_video_data", "MakeVideoDataResult", "mfm_collate",
    "mlm_collate", "moment_frames", "paired_statement_id", "parse_video_tasks", "pseudo_subtitles", "QueryDB",
    "QueryDBWriter", "SubtitleDB", "SubtitleDBWriter", "temporal_iou", "tvc_collate", "tvc_eval_collate",
    "vcmr_collate", "video_collate", "video_qa_collate", "video_synthetic_corpus", "VIDEO_TASKS", "VideoBatch",
    "VideoCorpus", "VideoFeatDB", "VideoFeatDBWriter", "VideoInput", "VideoPretrainData", "VideoSubData",
    "VideoSyntheticConfig", "VideoTaskData", "violin_collate", "vsm_collate", "WordVocab", "write_video_raw",
]
