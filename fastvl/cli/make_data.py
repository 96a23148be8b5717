"""``fastvl make-data``: official UNITER LMDB dbs from per-image npz files + captions jsonl (or the synthetic
corpus)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..data import make_data, write_synthetic_raw
from .errors import UserError
from .options import check_paths, positive_int

__all__ = ["HELP", "add_arguments", "run"]

HELP = "write official UNITER LMDB dbs from per-image npz files + captions jsonl"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--npz-dir", help="folder of per-image .npz (features, norm_bb, conf, soft_labels)")
    p.add_argument("--captions", nargs="*", default=[], help="captions jsonl file(s): {id, img_fname, caption}")
    p.add_argument("--output", required=True, help="where the img_db and txt_db folders are written")
    p.add_argument("--vocab", default=None, help="WordPiece vocab.txt (default: the synthetic corpus vocab)")
    p.add_argument("--conf-th", type=float, default=0.2)
    p.add_argument("--max-bb", type=positive_int, default=100)
    p.add_argument("--min-bb", type=positive_int, default=10)
    p.add_argument("--no-compress", action="store_true", help="msgpack values instead of compressed npz")
    p.add_argument("--skip-bad-examples", action="store_true")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--synthetic", action="store_true",
                   help="write the synthetic corpus's raw npz + captions into --output/raw first and convert those")


def run(args: argparse.Namespace) -> int:
    """Write the dbs; print what was written."""
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
