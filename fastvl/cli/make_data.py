"""``fastvl make-data``: official UNITER LMDB dbs from per-image npz files + captions jsonl (or the synthetic
corpus); with ``--video`` the official HERO video db + subtitle db from per-video npz frame features + a subtitle
jsonl (or the synthetic video corpus)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..data import make_data, write_synthetic_raw
from ..data.video import make_video_data, write_video_raw
from .errors import UserError
from .options import check_paths, positive_float, positive_int

__all__ = ["HELP", "add_arguments", "run"]

HELP = "write official UNITER LMDB dbs (or, with --video, HERO video + subtitle dbs) from npz + jsonl"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--npz-dir", help="folder of per-image .npz (features, norm_bb, conf, soft_labels)")
    p.add_argument("--captions", nargs="*", default=[], help="captions jsonl file(s): {id, img_fname, caption}")
    p.add_argument("--output", "--out", required=True, help="where the db folders are written")
    p.add_argument("--vocab", default=None, help="WordPiece vocab.txt (default: the synthetic corpus vocab); with "
                   "--video a word list (default: the words of the subtitles)")
    p.add_argument("--conf-th", type=float, default=0.2)
    p.add_argument("--max-bb", type=positive_int, default=100)
    p.add_argument("--min-bb", type=positive_int, default=10)
    p.add_argument("--no-compress", action="store_true", help="msgpack values instead of compressed npz")
    p.add_argument("--skip-bad-examples", action="store_true")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--synthetic", action="store_true",
                   help="write the synthetic corpus's raw inputs into --output/raw first and convert those")
    v = p.add_argument_group("video (HERO)")
    v.add_argument("--video", action="store_true", help="write a HERO video db + subtitle db")
    v.add_argument("--frames", help="folder of per-video <vid>.npz: 'features' [n, D] (+ 'interval' seconds)")
    v.add_argument("--subtitles", help="subtitle jsonl: {vid, start, end, text} per line (seconds)")
    v.add_argument("--frame-interval", type=positive_float, default=1.5,
                   help="seconds per frame when an npz has no 'interval' (default 1.5)")
    v.add_argument("--feat-version", default="resnet_slowfast", help="video LMDB name prefix (official default)")
    v.add_argument("--fp16", action="store_true", help="store frame features as float16 (read back as float32)")
    v.add_argument("--queries", help="annotation jsonl of --query-task, written as <out>/<task>_db (TVR {desc_id, "
                   "desc, vid_name, ts}, TVQA {qid, q, a0..a4, answer_idx, vid_name, ts}, VIOLIN {qid, statement, "
                   "vid_name}, TVC {clip_id, vid_name, ts, descs})")
    v.add_argument("--query-task", choices=["tvr", "tvqa", "violin", "tvc"], help="the task of --queries")


def _run_video(args: argparse.Namespace) -> int:
    frames, subtitles = args.frames, args.subtitles
    if args.synthetic:
        raw = write_video_raw(Path(args.output) / "raw")
        frames, subtitles = raw["frames"], raw["subtitles"]
    else:
        if not frames:
            raise UserError("give --frames (or --synthetic)", argument="--frames")
        check_paths("--frames", frames)
        if subtitles is not None:
            check_paths("--subtitles", subtitles, kind="file")
    if args.vocab is not None:
        check_paths("--vocab", args.vocab, kind="file")
    if (args.queries is None) != (args.query_task is None):
        raise UserError("give --queries together with --query-task", argument="--queries")
    if args.queries is not None:
        check_paths("--queries", args.queries, kind="file")
    result = make_video_data(frames, subtitles, args.output, frame_interval=args.frame_interval,
                             feat_version=args.feat_version, vocab_file=args.vocab, compress=not args.no_compress,
                             fp16=args.fp16, skip_bad_examples=args.skip_bad_examples, overwrite=args.overwrite,
                             queries=args.queries, query_task=args.query_task)
    print(result)
    return 0


def run(args: argparse.Namespace) -> int:
    """Write the dbs; print what was written."""
    if args.video:
        return _run_video(args)
    npz_dir, captions = args.npz_dir, list(args.captions)
    if not args.synthetic:
        if not npz_dir or not captions:
            raise UserError("give --npz-dir and --captions (or --synthetic)", argument="--npz-dir")
        check_paths("--npz-dir", npz_dir)
        check_paths("--captions", captions, kind="file")
    if args.min_bb > args.max_bb:
        raise UserError(f"{args.min_bb} is larger than --max-bb {args.max_bb}", argument="--min-bb")
    if args.synthetic:
        raw = write_synthetic_raw(Path(args.output) / "raw")
        npz_dir, captions = raw["npz_dir"], [raw[k] for k in sorted(raw) if k.startswith("captions_")]
    result = make_data(npz_dir, captions, args.output, vocab_file=args.vocab, conf_th=args.conf_th,
                       max_bb=args.max_bb, min_bb=args.min_bb, compress=not args.no_compress,
                       skip_bad_examples=args.skip_bad_examples, overwrite=args.overwrite)
    print(result)
    return 0
