"""``fastvl make-data``: a folder of per-image npz files + captions jsonl -> official img_db + txt_db.

Inputs:
- ``npz_dir``: one ``<name>.npz`` per image with ``features`` [n, D], ``norm_bb`` [n, 6] (x1/W, y1/H, x2/W, y2/H,
  w/W, h/H), ``conf`` [n] and optionally ``soft_labels`` [n, C] (background at 0), rows sorted by confidence
  (as BUTD writes them). Other 1-D/2-D arrays are kept.
- ``captions``: jsonl file(s), one object per line with the image (``img_fname``, or ``image`` / ``img``; ".npz"
  added if missing), the text (``caption``, or ``sent`` / ``text``) and optionally ``id`` (default
  ``<file stem>_<line>``); other keys are stored in the example as they are.

Outputs under ``output``: ``img_db/<img_name>/`` (the LMDB ``feat_th…`` + nbb json) and ``txt_db/<stem>.db`` per
captions file (LMDB + meta.json, id2len.json, txt2img.json, img2txts.json).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import BadExampleCounter, DataError
from .lmdb_db import ImageDBWriter, TxtDBWriter, img_db_name
from .synthetic import synthetic_vocab
from .tokenizer import WordPieceTokenizer, write_vocab

__all__ = ["make_data", "MakeDataResult"]

log = logging.getLogger("fastvl.data")


@dataclass
class MakeDataResult:
    img_db: Path
    txt_dbs: list[Path]
    n_images: int
    n_texts: dict[str, int]
    skipped: dict[str, int] = field(default_factory=dict)
    img_dim: int | None = None
    img_label_dim: int | None = None


def _check_npz(path: Path, dump: dict[str, np.ndarray], need_conf: bool, dims: dict) -> None:
    name = path.name
    feat, bb = dump.get("features"), dump.get("norm_bb")
    need = ["features", "norm_bb"] + (["conf"] if need_conf else [])
    if any(k not in dump for k in need):
        raise DataError(str(path.parent), name, f"npz lacks {[k for k in need if k not in dump]} (has {sorted(dump)})",
                        "corrupt_record")
    if feat.ndim != 2 or feat.shape[0] == 0:
        raise DataError(str(path.parent), name, f"'features' must be [n>0, D], got {list(feat.shape)}", "wrong_dim")
    n = feat.shape[0]
    if dims.setdefault("img_dim", feat.shape[1]) != feat.shape[1]:
        raise DataError(str(path.parent), name, f"'features' has dim {feat.shape[1]} but earlier images have "
                        f"{dims['img_dim']}", "wrong_dim")
    if bb.shape != (n, 6):
        raise DataError(str(path.parent), name, f"'norm_bb' must be [{n}, 6], got {list(bb.shape)}", "wrong_dim")
    if "conf" in dump and dump["conf"].shape != (n,):
        raise DataError(str(path.parent), name, f"'conf' must be [{n}], got {list(dump['conf'].shape)}", "wrong_dim")
    soft = dump.get("soft_labels")
    if soft is not None:
        if soft.ndim != 2 or soft.shape[0] != n or dims.setdefault("label_dim", soft.shape[1]) != soft.shape[1]:
            raise DataError(str(path.parent), name, f"'soft_labels' must be [{n}, {dims.get('label_dim')}], got "
                            f"{list(soft.shape)}", "wrong_dim")
    for k in ("features", "norm_bb", "soft_labels"):
        if k in dump and not np.isfinite(dump[k].astype(np.float32)).all():
            raise DataError(str(path.parent), name, f"'{k}' contains NaN/inf", "nonfinite_feature")


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files if k != "allow_pickle"}
    except Exception as e:  # noqa: BLE001  (any read failure is a corrupt file)
        raise DataError(str(path.parent), path.name, f"cannot read npz ({type(e).__name__}: {e})",
                        "corrupt_record") from e


def _caption_fields(rec: dict, src: str, lineno: int) -> tuple[str, str, str]:
    img = next((rec[k] for k in ("img_fname", "image", "img") if k in rec), None)
    text = next((rec[k] for k in ("caption", "sent", "text") if k in rec), None)
    key = str(rec.get("id", f"{Path(src).stem}_{lineno}"))
    if not isinstance(img, str) or not img:
        raise DataError(src, key, "line has no image name ('img_fname', 'image' or 'img')", "corrupt_record")
    if not isinstance(text, str):
        raise DataError(src, key, "line has no caption text ('caption', 'sent' or 'text')", "corrupt_record")
    return key, img if img.endswith(".npz") else img + ".npz", text


def make_data(npz_dir: str | os.PathLike, captions: str | os.PathLike | list[str | os.PathLike],
              output: str | os.PathLike, *, vocab_file: str | os.PathLike | None = None,
              lowercase: bool | None = None, tokenizer_name: str | None = None, img_name: str | None = None,
              conf_th: float = 0.2, max_bb: int = 100, min_bb: int = 10, num_bb: int = 36, compress: bool = True,
              keep_all: bool = False, skip_bad_examples: bool = False, overwrite: bool = False) -> MakeDataResult:
    """Convert ``npz_dir`` + ``captions`` into an img_db and txt_db(s) under ``output`` (see the module doc).

    Args:
        vocab_file: WordPiece vocab (e.g. bert-base-cased vocab.txt); None uses the synthetic corpus's small
            vocab (written to ``output/vocab.txt``; unknown words become letter pieces).
        lowercase: for uncased vocabs (None: guessed from the vocab). tokenizer_name: recorded in meta.json.
        img_name: img_db folder name (default: the npz folder's name).
        conf_th, max_bb, min_bb, num_bb, compress, keep_all: the official img_db options.
        skip_bad_examples: skip unreadable / malformed npz files, captions of missing images and empty captions
            (counted in the result) instead of raising :class:`DataError`.
        overwrite: replace existing dbs of the same names.
    """
    npz_dir, output = Path(npz_dir), Path(output)
    if not npz_dir.is_dir():
        raise FileNotFoundError(f"make_data: 'npz_dir' {str(npz_dir)!r} is not a folder")
    cap_files = [Path(c) for c in (captions if isinstance(captions, list | tuple) else [captions])]
    for c in cap_files:
        if not c.is_file():
            raise FileNotFoundError(f"make_data: captions file {str(c)!r} does not exist")
    files = sorted(npz_dir.glob("*.npz"))
    if not files:
        raise FileNotFoundError(f"make_data: no .npz files in {str(npz_dir)!r}")
    bad = BadExampleCounter()

    if vocab_file is None:
        vocab_file = write_vocab(synthetic_vocab(), output / "vocab.txt")
        log.warning("make_data: no vocab_file given; using the synthetic corpus's small vocab %s", vocab_file)
    tok = WordPieceTokenizer(vocab_file, lowercase=lowercase, name=tokenizer_name)

    img_dir = output / "img_db" / (img_name or npz_dir.name)
    txt_dirs = [output / "txt_db" / f"{c.stem}.db" for c in cap_files]
    targets = [img_dir / img_db_name(conf_th, max_bb, min_bb, num_bb, compress, keep_all), *txt_dirs]
    for t in targets:
        if t.exists():
            if not overwrite:
                raise FileExistsError(f"make_data: {t} exists; pass overwrite=True to replace it")
            shutil.rmtree(t)

    dims: dict = {}
    with ImageDBWriter(img_dir, conf_th=conf_th, max_bb=max_bb, min_bb=min_bb, num_bb=num_bb, compress=compress,
                       keep_all=keep_all) as img_w:
        for path in files:
            try:
                dump = _load_npz(path)
                _check_npz(path, dump, need_conf=not keep_all and conf_th != -1, dims=dims)
            except DataError as e:
                bad.skip_or_raise(e, skip_bad_examples)
                continue
            img_w.put(path.name, dump)
    images = set(img_w.name2nbb)

    meta = {**tok.meta(), "source": "fastvl make-data", "npz_dir": str(npz_dir), "img_db": str(img_dir),
            "img_db_name": img_dir.name}
    n_texts = {}
    for src, db_dir in zip(cap_files, txt_dirs):
        n = 0
        with TxtDBWriter(db_dir, {**meta, "captions": str(src)}) as txt_w, open(src, encoding="utf-8") as f:
            for lineno, line in enumerate(f):
                if not line.strip():
                    continue
                try:
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(str(src), f"line {lineno + 1}", f"invalid JSON: {e}", "corrupt_record") from e
                    if not isinstance(rec, dict):
                        raise DataError(str(src), f"line {lineno + 1}", "line is not a JSON object", "corrupt_record")
                    key, img, text = _caption_fields(rec, str(src), lineno)
                    if key in txt_w.id2len:
                        raise DataError(str(src), key, "duplicate caption id", "duplicate_id")
                    if img not in images:
                        raise DataError(str(img_dir), img, f"image of caption {key!r} ({src}) is not in the img_db",
                                        "missing_image")
                    ids = tok.encode(text)
                    if not ids:
                        raise DataError(str(src), key, f"empty caption {text!r}", "empty_caption")
                except DataError as e:
                    bad.skip_or_raise(e, skip_bad_examples)
                    continue
                txt_w.put(key, {**rec, "id": key, "img_fname": img, "sent": text, "input_ids": ids})
                n += 1
        n_texts[db_dir.name] = n
    return MakeDataResult(img_db=img_dir, txt_dbs=txt_dirs, n_images=len(images), n_texts=n_texts,
                          skipped=bad.as_dict(), img_dim=dims.get("img_dim"), img_label_dim=dims.get("label_dim"))
