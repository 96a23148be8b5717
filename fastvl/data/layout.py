"""Find the (txt_db, img_db) pairs of a data folder (``fastvl pretrain --data DIR``).

Recognised folders:

- a synthetic corpus root (``corpus.json``, ``img_db/``, ``txt_db/train.db``, ``txt_db/val.db``);
- a ``make_data`` output or any folder shaped like the official layout: ``txt_db/*.db`` and ``img_db/<name>/``.
  Each txt_db is paired with the img_db named in its meta.json (``img_db_name``, written by make_data), else with
  the only img_db. txt_dbs whose name contains "val" (or "dev", "test") form the validation split.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["DataLayout", "find_dbs"]

_VAL_WORDS = ("val", "dev", "test")


@dataclass
class DataLayout:
    """Paired db paths: ``train_txt[i]`` goes with ``train_img[i]`` (same for val)."""

    root: Path
    train_txt: list[Path] = field(default_factory=list)
    train_img: list[Path] = field(default_factory=list)
    val_txt: list[Path] = field(default_factory=list)
    val_img: list[Path] = field(default_factory=list)
    info: dict = field(default_factory=dict)


def find_dbs(data_dir: str | os.PathLike) -> DataLayout:
    """The train / val (txt_db, img_db) pairs under ``data_dir`` (see the module doc)."""
    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"find_dbs: 'data_dir' {str(root)!r} is not a folder")
    if (root / "corpus.json").is_file():
        info = json.loads((root / "corpus.json").read_text())
        img = root / "img_db"
        return DataLayout(root, [root / "txt_db" / "train.db"], [img], [root / "txt_db" / "val.db"], [img], info)
    txts = sorted(p for p in (root / "txt_db").glob("*.db") if (p / "meta.json").is_file()) \
        if (root / "txt_db").is_dir() else []
    imgs = sorted(p for p in (root / "img_db").iterdir() if p.is_dir()) if (root / "img_db").is_dir() else []
    if not txts or not imgs:
        raise FileNotFoundError(f"find_dbs: {str(root)!r} holds no corpus.json and no txt_db/*.db + img_db/<name>/ "
                                f"(found {len(txts)} txt_dbs, {len(imgs)} img_dbs)")
    out = DataLayout(root)
    for txt in txts:
        name = json.loads((txt / "meta.json").read_text()).get("img_db_name")
        if name is not None and (root / "img_db" / name).is_dir():
            img = root / "img_db" / name
        elif len(imgs) == 1:
            img = imgs[0]
        else:
            raise ValueError(f"find_dbs: cannot tell which of {[p.name for p in imgs]} goes with {txt}; record "
                             "'img_db_name' in its meta.json")
        is_val = any(w in txt.stem.lower() for w in _VAL_WORDS)
        (out.val_txt if is_val else out.train_txt).append(txt)
        (out.val_img if is_val else out.train_img).append(img)
    if not out.train_txt:
        raise FileNotFoundError(f"find_dbs: every txt_db under {str(root)!r} looks like a validation split")
    return out
