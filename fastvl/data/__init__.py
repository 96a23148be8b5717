"""fastvl data: official UNITER LMDB databases (read and write), WordPiece tokenisation, the synthetic default
corpus, token-bucket batching and the pre-training datasets that emit :class:`~fastvl.batch.PackedVLBatch`.

Entry points:

- :func:`synthetic_corpus` -- generate (once) and cache the default corpus; returns its paths and sizes.
- :func:`build_pretrain_data` -- per-task batch sources over (txt_db, img_db) pairs for the trainer.
- :func:`make_data` -- npz folder + captions jsonl -> img_db + txt_db (``fastvl make-data``).
- :mod:`fastvl.data.video` -- HERO: video / subtitle / query dbs, official collate dicts, the synthetic video corpus
  (:func:`video_synthetic_corpus`, :func:`build_video_pretrain_data`).

This package knows no model: it depends on numpy, torch, lmdb, msgpack(-numpy), lz4 and tokenizers only.
"""

from .collate import Example, collate, to_official
from .errors import BadExampleCounter, DataError
from .layout import DataLayout, find_dbs
from .lmdb_db import ImageDB, ImageDBWriter, TxtDB, TxtDBWriter, compute_nbb, position_features
from .make_data import MakeDataResult, make_data
from .pretrain_data import TASKS, PretrainBatchSource, PretrainData, VLExamples, build_pretrain_data, parse_tasks
from .sampler import TaskMixer, TokenBucketSampler
from .synthetic import SyntheticConfig, SyntheticCorpus, default_cache_dir, synthetic_corpus, write_synthetic_raw
from .tokenizer import WordPieceTokenizer
from .video import (
    SubtitleDB,
    VideoCorpus,
    VideoFeatDB,
    VideoSyntheticConfig,
    build_video_pretrain_data,
    video_synthetic_corpus,
)

__all__ = [
    "BadExampleCounter", "DataError", "DataLayout", "Example", "ImageDB", "ImageDBWriter", "MakeDataResult",
    "PretrainBatchSource", "PretrainData", "SyntheticConfig", "SyntheticCorpus", "TASKS", "TaskMixer",
    "TokenBucketSampler", "TxtDB", "TxtDBWriter", "VLExamples", "WordPieceTokenizer", "build_pretrain_data", "collate",
    "compute_nbb", "default_cache_dir", "find_dbs", "make_data", "parse_tasks", "position_features",
    "synthetic_corpus", "to_official", "write_synthetic_raw", "SubtitleDB", "VideoCorpus", "VideoFeatDB",
    "VideoSyntheticConfig", "build_video_pretrain_data", "video_synthetic_corpus",
]
