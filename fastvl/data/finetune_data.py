"""UNITER fine-tuning datasets over official txt_db / img_db folders -> :class:`~fastvl.batch.PackedVLBatch`.

The same classes read the synthetic data (:mod:`fastvl.data.finetune_synthetic`) and users' real databases.
Official txt_db records per task (besides ``input_ids`` without [CLS]/[SEP]):

- VQA / GQA / SNLI-VE (:class:`VQADataset`): ``img_fname``, ``target`` = ``{'labels': [answer ids], 'scores':
  [soft scores]}``; the answer vocabulary is ``ans2label.json`` ({answer: id}) in the txt_db folder, its parent or
  given explicitly. SNLI-VE: 3 labels.
- NLVR2 (:class:`NLVR2Dataset`): ``img_fname`` = [left, right], ``target`` 0/1 (``txt2img.json``: id -> [left,
  right]). Paired / PairedAttn: 2 sequences per statement (left image type 1, right type 2); Triplet: one sequence
  with both images' regions.
- Image-text retrieval (:class:`ITRDataset`): ``img_fname``; one caption per record.
- Referring expressions (:class:`REDataset`): records keyed by sentence id with ``ref_id``, ``ann_id``,
  ``image_id``, ``bbox`` (x, y, w, h pixels); side files ``refs.json``, ``annotations.json`` (``id``, ``bbox``,
  ``image_id``), ``images.json`` (``id``, ``ann_ids`` in region order, ``width``, ``height``), ``categories.json``.
  The image is ``visual_grounding_coco_gt_<image_id:012>.npz`` (or the record's ``img_fname``); region k is
  annotation ``ann_ids[k]``; the target is the region of ``ann_id``.
- VCR (:class:`VCRDataset`): ``input_ids`` (question), ``input_ids_as`` (4 answers), ``input_ids_rs`` (4
  rationales), ``qa_target``, ``qar_target``, ``img_fname`` = [gt image, detected image]; side files
  ``id2len_qa.json`` / ``id2len_qar.json``. Q->A rows: ``[CLS] q [SEP] a [SEP]`` (types 0 / 2); QA->R rows:
  ``[CLS] q [SEP] a* [SEP] r [SEP]`` (types 0 / 2 / 3). With two img_dbs (gt, detected) the regions are
  concatenated, with one the detected image is used.

Bad records raise :class:`~fastvl.data.DataError` naming the database and key (answer id outside the vocabulary,
NLVR2 image missing, RE box outside its image, VCR question without exactly 4 choices, ...), or are skipped and
counted (``skip_bad_examples``; per reason in ``dataset.bad``). Checks that need only side files run when the
dataset opens; the others when the record is read.

Batches: :class:`FinetuneBatchSource` (the trainer's ``BatchSource``: token-bucket batches, deterministic from the
seed, resumable) with targets in ``batch.targets`` as the tasks of :mod:`fastvl.tasks` expect.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..batch import PackedVLBatch, layout_from_lengths
from .errors import BadExampleCounter, DataError
from .lmdb_db import ImageDB, TxtDB
from .sampler import TokenBucketSampler

__all__ = ["FinetuneBatchSource", "FinetuneDataset", "ITRDataset", "NLVR2Dataset", "REDataset", "Row", "TaskTxtDB",
           "VCRDataset", "VQADataset", "FTExample", "load_ans2label", "re_image_name"]

PathLike = str | os.PathLike


class TaskTxtDB(TxtDB):
    """A txt_db whose side files may follow a task's official layout: ``id2len.json`` may be replaced by
    ``id2len_qar.json`` / ``id2len_qa.json`` (VCR), ``txt2img.json`` may be absent (RE)."""

    _FALLBACK = {"id2len.json": ("id2len_qar.json", "id2len_qa.json")}
    _OPTIONAL = ("txt2img.json",)

    def _json(self, name: str):
        if not (self.db_dir / name).is_file():
            for alt in self._FALLBACK.get(name, ()):
                if (self.db_dir / alt).is_file():
                    return super()._json(alt)
            if name in self._OPTIONAL:
                return {}
        return super()._json(name)

    def side(self, name: str, default: Any = None) -> Any:
        """A side file of the db (JSON), or ``default`` when absent (None: an error naming the db)."""
        if not (self.db_dir / name).is_file() and default is not None:
            return default
        return super()._json(name)


@dataclass
class Row:
    """One model sequence: ``input_ids`` [L] with [CLS]/[SEP], regions ``img_feat`` [n, D] / ``img_pos`` [n, 7],
    optional type ids ``txt_type_ids`` [L] / ``img_type_ids`` [n]."""

    input_ids: np.ndarray
    img_feat: np.ndarray
    img_pos: np.ndarray
    txt_type_ids: np.ndarray | None = None
    img_type_ids: np.ndarray | None = None


@dataclass
class FTExample:
    """One example: its rows (1 for most tasks, 2 for paired NLVR2, 4 for VCR), the target, and side inputs."""

    id: str
    rows: list[Row]
    target: Any
    extra: dict = field(default_factory=dict)


def load_ans2label(path: PathLike) -> dict[str, int]:
    """An answer vocabulary file: JSON {answer: id} (ids 0..A-1, each once)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"answer vocabulary {p} does not exist")
    try:
        table = json.loads(p.read_text())
    except ValueError as e:
        raise DataError(str(p), None, f"is not valid JSON: {e}", "corrupt_db") from e
    if not isinstance(table, dict) or not table:
        raise DataError(str(p), None, "must be a non-empty JSON object {answer: id}", "corrupt_db")
    ids = sorted(int(v) for v in table.values())
    if ids != list(range(len(ids))):
        raise DataError(str(p), None, f"answer ids must be 0..{len(ids) - 1}, each once", "corrupt_db")
    return {str(k): int(v) for k, v in table.items()}


def re_image_name(image_id: int) -> str:
    """The official RE feature file name of a COCO image id (ground-truth boxes)."""
    return f"visual_grounding_coco_gt_{int(image_id):012d}.npz"


def _as_list(x: PathLike | Sequence[PathLike]) -> list[PathLike]:
    return [x] if isinstance(x, str | os.PathLike) else list(x)


# ----------------------------------------------------------------------------------------------------------------
class FinetuneDataset:
    """Base: (txt_db, img_db) pairs, example ids with token lengths, bad-example handling, packed collate.

    Subclasses implement :meth:`_open` (per-id checks on side files; returns the token length of the example or
    raises DataError), :meth:`example` and :meth:`_targets`.

    Args:
        txt_dbs, img_dbs: one path each or equally long lists (pair i = txt_dbs[i] with img_dbs[i]).
        max_txt_len: texts longer than this are dropped (-1: keep all).
        skip_bad_examples: skip and count bad records instead of raising.
    """

    task = ""
    size_multiple = 8

    def __init__(self, txt_dbs: PathLike | Sequence[PathLike], img_dbs: PathLike | Sequence[PathLike],
                 max_txt_len: int = 60, skip_bad_examples: bool = False, counter: BadExampleCounter | None = None):
        txts, imgs = _as_list(txt_dbs), _as_list(img_dbs)
        if not txts:
            raise ValueError(f"{type(self).__name__}: no txt_db given")
        if len(txts) != len(imgs):
            raise ValueError(f"{type(self).__name__}: 'txt_dbs' has {len(txts)} paths but 'img_dbs' has {len(imgs)}")
        self.skip = skip_bad_examples
        self.bad = counter if counter is not None else BadExampleCounter()
        self.pairs = [(TaskTxtDB(t, max_txt_len), self._img_db(i)) for t, i in zip(txts, imgs)]
        t0 = self.pairs[0][0]
        for txt, _ in self.pairs[1:]:
            if (txt.cls, txt.sep, txt.v_range) != (t0.cls, t0.sep, t0.v_range):
                raise ValueError(f"{type(self).__name__}: txt_db {txt.name} and {t0.name} use different tokenizers")
        self.cls, self.sep, self.v_range = t0.cls, t0.sep, t0.v_range
        dims = {self._primary(img).img_dim for _, img in self.pairs}
        if len(dims) > 1:
            raise ValueError(f"{type(self).__name__}: img_dbs have different feature dims {sorted(dims)}")
        self.img_dim = dims.pop()
        self.items: list[tuple[int, str]] = []
        self.lens: list[int] = []
        for p, (txt, img) in enumerate(self.pairs):
            self._prepare(p, txt, img)
            for id_ in txt.ids:
                try:
                    n = self._open(p, txt, img, id_)
                except DataError as e:
                    self.bad.skip_or_raise(e, self.skip)
                    continue
                self.items.append((p, id_))
                self.lens.append(int(n))
        if not self.items:
            raise DataError(", ".join(t.name for t, _ in self.pairs), None, "no usable examples", "no_examples")

    # hooks ----------------------------------------------------------------------------------------------------
    def _img_db(self, path: PathLike) -> Any:
        return ImageDB(path)

    @staticmethod
    def _primary(img: Any) -> ImageDB:
        return img

    def _prepare(self, p: int, txt: TaskTxtDB, img: Any) -> None:
        """Per-pair setup before the ids are opened (side files)."""

    def _open(self, p: int, txt: TaskTxtDB, img: Any, id_: str) -> int:
        name = txt.txt2img.get(id_)
        if not isinstance(name, str):
            raise DataError(txt.name, id_, f"txt2img.json has no single image for this text (got {name!r})",
                            "missing_image")
        if name not in img:
            raise DataError(img.name, name, f"image referenced by text {id_!r} of {txt.name} is not in the img_db",
                            "missing_image")
        return txt.id2len[id_] + 2 + img.name2nbb[name]

    def example(self, i: int) -> FTExample:
        raise NotImplementedError

    def _targets(self, examples: list[FTExample]) -> dict[str, Any]:
        raise NotImplementedError

    # common ---------------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.items)

    @property
    def vocab_size(self) -> int:
        return self.v_range[1]

    def text(self, txt: TaskTxtDB, id_: str, record: dict | None = None, key: str = "input_ids") -> list[int]:
        """Validated token ids (without [CLS]/[SEP]) of ``record[key]``."""
        record = txt[id_] if record is None else record
        ids = record.get(key)
        if ids is None:
            raise DataError(txt.name, id_, f"record has no '{key}'", "corrupt_record")
        ids = [int(t) for t in ids]
        if not ids:
            raise DataError(txt.name, id_, f"'{key}' is empty (no tokens)", "empty_caption")
        if min(ids) < 0 or max(ids) >= self.token_limit:
            raise DataError(txt.name, id_, f"'{key}' has token ids outside [0, {self.token_limit}): min {min(ids)}, "
                            f"max {max(ids)}", "corrupt_record")
        return ids

    @property
    def token_limit(self) -> int:
        return self.v_range[1]

    def image(self, img: ImageDB, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(feat [n, D], pos [n, 7], norm_bb [n, 6]) of image ``name``."""
        rec = img.get(name)
        return rec.feat, rec.pos, rec.norm_bb

    def row(self, ids: list[int], feat: np.ndarray, pos: np.ndarray, txt_types: list[int] | None = None,
            img_types: np.ndarray | None = None) -> Row:
        return Row(np.asarray([self.cls, *ids, self.sep], dtype=np.int64), feat, pos,
                   None if txt_types is None else np.asarray(txt_types, dtype=np.int64), img_types)

    def collate(self, examples: list[FTExample]) -> PackedVLBatch:
        """Concatenate the examples' rows into a packed batch with its task fields (``targets`` ...; see the task)."""
        if not examples:
            raise ValueError(f"{type(self).__name__}.collate: no examples")
        rows = [r for e in examples for r in e.rows]
        cat = lambda xs, dt: torch.from_numpy(np.ascontiguousarray(np.concatenate(xs, 0), dtype=dt))  # noqa: E731
        txt_types = img_types = None
        if any(r.txt_type_ids is not None for r in rows):
            txt_types = cat([r.txt_type_ids if r.txt_type_ids is not None else np.zeros(len(r.input_ids), np.int64)
                             for r in rows], np.int64)
        if any(r.img_type_ids is not None for r in rows):
            img_types = cat([r.img_type_ids if r.img_type_ids is not None else np.ones(len(r.img_feat), np.int64)
                             for r in rows], np.int64)
        txt_lens, img_lens = [len(r.input_ids) for r in rows], [len(r.img_feat) for r in rows]
        return PackedVLBatch(input_ids=cat([r.input_ids for r in rows], np.int64), txt_lens=txt_lens,
                             img_feat=cat([r.img_feat for r in rows], np.float32),
                             img_pos=cat([r.img_pos for r in rows], np.float32), img_lens=img_lens,
                             txt_type_ids=txt_types, img_type_ids=img_types, task=self.task,
                             ids=[e.id for e in examples], layout=layout_from_lengths(txt_lens, img_lens, "cpu"),
                             **self._targets(examples))

    def make_batch(self, indices: Sequence[int]) -> PackedVLBatch | None:
        """The batch of examples ``indices``; bad ones are skipped (or raise); None when all were skipped."""
        examples = []
        for i in indices:
            try:
                examples.append(self.example(i))
            except DataError as e:
                self.bad.skip_or_raise(e, self.skip)
        return self.collate(examples) if examples else None


# ----------------------------------------------------------------------------------------------------------------
class VQADataset(FinetuneDataset):
    """VQA / GQA / SNLI-VE: one sequence per question; ``targets`` [B, A] soft scores.

    Args:
        ans2label: {answer: id} or a path to ``ans2label.json``; None: ``ans2label.json`` beside the first txt_db
            or in its parent folder.
    """

    task = "vqa"

    def __init__(self, txt_dbs, img_dbs, ans2label: dict[str, int] | PathLike | None = None, **kw):
        first = Path(_as_list(txt_dbs)[0])
        if ans2label is None:
            found = [p for p in (first / "ans2label.json", first.parent / "ans2label.json",
                                 first.parent.parent / "ans2label.json") if p.is_file()]
            if not found:
                raise FileNotFoundError(f"{type(self).__name__}: no ans2label.json in {first}, its parent or "
                                        "grandparent; pass 'ans2label' (a file or a dict {answer: id})")
            ans2label = found[0]
        self.ans2label = ans2label if isinstance(ans2label, dict) else load_ans2label(ans2label)
        self.ans2label_file = None if isinstance(ans2label, dict) else str(ans2label)
        self.num_answers = len(self.ans2label)
        super().__init__(txt_dbs, img_dbs, **kw)

    def example(self, i: int) -> FTExample:
        p, id_ = self.items[i]
        txt, img = self.pairs[p]
        rec = txt[id_]
        ids = self.text(txt, id_, rec)
        target = rec.get("target")
        if not isinstance(target, dict) or "labels" not in target or "scores" not in target:
            raise DataError(txt.name, id_, f"record needs 'target' = {{'labels': [...], 'scores': [...]}}, got "
                            f"{target!r}", "bad_target")
        labels, scores = list(target["labels"]), list(target["scores"])
        if len(labels) != len(scores):
            raise DataError(txt.name, id_, f"target has {len(labels)} labels but {len(scores)} scores", "bad_target")
        soft = np.zeros(self.num_answers, np.float32)
        for a, s in zip(labels, scores):
            if not 0 <= int(a) < self.num_answers:
                raise DataError(txt.name, id_, f"answer id {int(a)} is outside the answer vocabulary [0, "
                                f"{self.num_answers}) of {self.ans2label_file or 'ans2label'}", "bad_answer")
            if not 0.0 <= float(s) <= 1.0:
                raise DataError(txt.name, id_, f"score {float(s)} of answer {int(a)} is outside [0, 1]", "bad_answer")
            soft[int(a)] = float(s)
        feat, pos, _ = self.image(img, rec["img_fname"])
        return FTExample(id_, [self.row(ids, feat, pos)], soft)

    def _targets(self, examples):
        return {"targets": torch.from_numpy(np.stack([e.target for e in examples]))}


# ----------------------------------------------------------------------------------------------------------------
class NLVR2Dataset(FinetuneDataset):
    """NLVR2: a statement about two images; ``targets`` [n] long (1 = true).

    Args:
        variant: 'paired' / 'paired-attn' (2 sequences per statement: [txt | left] type 1, [txt | right] type 2) or
            'triplet' (one sequence [txt | left | right]).
    """

    task = "nlvr2"
    size_multiple = 4
    VARIANTS = ("paired", "triplet", "paired-attn")

    def __init__(self, txt_dbs, img_dbs, variant: str = "paired", **kw):
        if variant not in self.VARIANTS:
            raise ValueError(f"NLVR2Dataset: 'variant' must be one of {self.VARIANTS}, got {variant!r}")
        self.variant = variant
        super().__init__(txt_dbs, img_dbs, **kw)

    def _open(self, p, txt, img, id_):
        names = txt.txt2img.get(id_)
        if not isinstance(names, list | tuple) or len(names) != 2:
            raise DataError(txt.name, id_, f"an NLVR2 example needs img_fname = [left, right] (txt2img.json), got "
                            f"{names!r}", "missing_image")
        missing = [n for n in names if n not in img]
        if missing:
            side = "left" if missing[0] == names[0] else "right"
            raise DataError(img.name, missing[0], f"the {side} image of NLVR2 example {id_!r} ({txt.name}) is not in "
                            "the img_db; both images are needed", "missing_image")
        tl = txt.id2len[id_] + 2
        nbb = sum(img.name2nbb[n] for n in names)
        return (tl if self.variant == "triplet" else 2 * tl) + nbb

    def example(self, i):
        p, id_ = self.items[i]
        txt, img = self.pairs[p]
        rec = txt[id_]
        ids = self.text(txt, id_, rec)
        target = rec.get("target", rec.get("label"))
        if target in ("True", "False", True, False):
            target = int(target in ("True", True))
        if target not in (0, 1):
            raise DataError(txt.name, id_, f"'target' must be 0 or 1, got {target!r}", "bad_target")
        names = list(rec.get("img_fname") or txt.txt2img[id_])
        if len(names) != 2:
            raise DataError(txt.name, id_, f"img_fname must list 2 images, got {names!r}", "missing_image")
        imgs = [self.image(img, n) for n in names]
        if self.variant == "triplet":
            feat = np.concatenate([imgs[0][0], imgs[1][0]])
            pos = np.concatenate([imgs[0][1], imgs[1][1]])
            types = np.concatenate([np.full(len(imgs[0][0]), 1), np.full(len(imgs[1][0]), 2)]).astype(np.int64)
            rows = [self.row(ids, feat, pos, img_types=types)]
        else:
            rows = [self.row(ids, f, ps, img_types=np.full(len(f), k + 1, np.int64))
                    for k, (f, ps, _) in enumerate(imgs)]
        return FTExample(id_, rows, int(target))

    def _targets(self, examples):
        return {"targets": torch.tensor([e.target for e in examples], dtype=torch.long)}


# ----------------------------------------------------------------------------------------------------------------
class ITRDataset(FinetuneDataset):
    """Image-text retrieval: (caption, image) pairs; negatives are drawn by the task (in-batch).

    ``img_fnames`` names each example's image (retrieval evaluation groups texts by image).
    """

    task = "itr"

    def example(self, i):
        p, id_ = self.items[i]
        txt, img = self.pairs[p]
        rec = txt[id_]
        name = rec.get("img_fname", txt.txt2img.get(id_))
        feat, pos, _ = self.image(img, name)
        return FTExample(id_, [self.row(self.text(txt, id_, rec), feat, pos)], None, {"img_fname": f"{p}/{name}"})

    def _targets(self, examples):
        return {"img_fnames": [e.extra["img_fname"] for e in examples]}


# ----------------------------------------------------------------------------------------------------------------
class REDataset(FinetuneDataset):
    """Referring expressions (RefCOCO layout, see the module doc): ``targets`` [B] region index,
    ``boxes`` [T_img, 4] region boxes and ``gt_boxes`` [B, 4] (x1, y1, x2, y2 pixels),
    ``image_sizes`` [B, 2] (width, height).

    Checks on opening: the referred annotation is one of its image's ``ann_ids``; the image's region count equals
    ``len(ann_ids)``; every box (annotation and record ``bbox``) lies inside its image (1-pixel tolerance).
    """

    task = "re"

    def __init__(self, txt_dbs, img_dbs, **kw):
        self.n_regions: dict[tuple[int, str], int] = {}  # regions of each example's image
        super().__init__(txt_dbs, img_dbs, **kw)

    def _prepare(self, p, txt, img):
        images = txt.side("images.json")
        anns = txt.side("annotations.json")
        txt.Images = {int(x["id"]): x for x in images}
        txt.Anns = {int(x["id"]): x for x in anns}

    def _check_box(self, txt: TaskTxtDB, key: str, what: str, box, image: dict) -> None:
        w, h = float(image["width"]), float(image["height"])
        ok = isinstance(box, list | tuple) and len(box) == 4 and all(np.isfinite(float(v)) for v in box)
        if ok:
            x, y, bw, bh = (float(v) for v in box)
            ok = bw > 0 and bh > 0 and x >= -1 and y >= -1 and x + bw <= w + 1 and y + bh <= h + 1
        if not ok:
            raise DataError(txt.name, key, f"{what} box {box} (x, y, w, h) lies outside its image {image['id']} "
                            f"of size {w:g} x {h:g} (or is empty)", "bad_box")

    def _open(self, p, txt, img, id_):
        rec = txt[id_]
        for k in ("image_id", "ann_id"):
            if k not in rec:
                raise DataError(txt.name, id_, f"RE record lacks '{k}'", "corrupt_record")
        image = txt.Images.get(int(rec["image_id"]))
        if image is None:
            raise DataError(txt.name, id_, f"image_id {rec['image_id']} is not in images.json", "missing_image")
        ann_ids = [int(a) for a in image["ann_ids"]]
        if int(rec["ann_id"]) not in ann_ids:
            raise DataError(txt.name, id_, f"ann_id {rec['ann_id']} is not among the ann_ids of image "
                            f"{rec['image_id']}", "bad_target")
        name = rec.get("img_fname") or re_image_name(rec["image_id"])
        if name not in img:
            raise DataError(img.name, name, f"image of RE example {id_!r} ({txt.name}) is not in the img_db",
                            "missing_image")
        if img.name2nbb[name] != len(ann_ids):
            raise DataError(img.name, name, f"has {img.name2nbb[name]} regions but images.json lists "
                            f"{len(ann_ids)} ann_ids (RE needs the ground-truth-box features, one region per "
                            "annotation)", "bad_target")
        for a in ann_ids:
            ann = txt.Anns.get(a)
            if ann is None:
                raise DataError(txt.name, id_, f"annotation {a} is not in annotations.json", "bad_target")
            self._check_box(txt, id_, f"annotation {a}", ann["bbox"], image)
        if "bbox" in rec:
            self._check_box(txt, id_, "the target", rec["bbox"], image)
        self.n_regions[(p, id_)] = len(ann_ids)
        return txt.id2len[id_] + 2 + len(ann_ids)

    def example(self, i):
        p, id_ = self.items[i]
        txt, img = self.pairs[p]
        rec = txt[id_]
        image = txt.Images[int(rec["image_id"])]
        ann_ids = [int(a) for a in image["ann_ids"]]
        name = rec.get("img_fname") or re_image_name(rec["image_id"])
        feat, pos, bb = self.image(img, name)
        w, h = float(image["width"]), float(image["height"])
        boxes = bb[:, :4] * np.asarray([w, h, w, h], np.float32)
        x, y, bw, bh = (float(v) for v in rec.get("bbox", txt.Anns[int(rec["ann_id"])]["bbox"]))
        return FTExample(id_, [self.row(self.text(txt, id_, rec), feat, pos)], ann_ids.index(int(rec["ann_id"])),
                         {"boxes": boxes, "gt_box": np.asarray([x, y, x + bw, y + bh], np.float32), "size": (w, h)})

    def _targets(self, examples):
        return {"targets": torch.tensor([e.target for e in examples], dtype=torch.long),
                "boxes": torch.from_numpy(np.concatenate([e.extra["boxes"] for e in examples])),
                "gt_boxes": torch.from_numpy(np.stack([e.extra["gt_box"] for e in examples])),
                "image_sizes": torch.tensor([e.extra["size"] for e in examples], dtype=torch.float32)}


# ----------------------------------------------------------------------------------------------------------------
class _VCRImages:
    """The img_dbs of a VCR pair: (gt, detected) concatenated, or one."""

    def __init__(self, paths: Sequence[PathLike]):
        self.dbs = [ImageDB(p) for p in paths]
        self.name = " + ".join(d.name for d in self.dbs)

    def pick(self, names: Sequence[str]) -> list[tuple[ImageDB, str]]:
        if len(self.dbs) == 2:
            return [(self.dbs[0], names[0]), (self.dbs[1], names[1])]
        return [(self.dbs[0], names[-1])]


class VCRDataset(FinetuneDataset):
    """VCR, one stage: ``stage='qa'`` (Q->A: 4 rows [CLS] q [SEP] a_i [SEP]) or ``'qar'`` (QA->R: 4 rows
    [CLS] q [SEP] a* [SEP] r_i [SEP]); ``targets`` [4B] long (1 = right choice), ``num_choices``.

    Args:
        img_dbs: per txt_db a path, or a pair [gt img_db, detected img_db] (regions concatenated).
        special_tokens: extra word ids above the txt_db's v_range allowed in the text (official: 81 tags).
    """

    task = "vcr"
    size_multiple = 2
    num_choices = 4

    def __init__(self, txt_dbs, img_dbs, stage: str = "qa", special_tokens: int = 81, **kw):
        if stage not in ("qa", "qar"):
            raise ValueError(f"VCRDataset: 'stage' must be 'qa' or 'qar', got {stage!r}")
        self.stage, self.special_tokens = stage, int(special_tokens)
        txts = _as_list(txt_dbs)
        imgs = [img_dbs] if isinstance(img_dbs, str | os.PathLike) else list(img_dbs)
        if len(txts) == 1 and len(imgs) == 2 and all(isinstance(x, str | os.PathLike) for x in imgs):
            imgs = [imgs]  # one txt_db with (gt, detected)
        super().__init__(txts, imgs, **kw)

    def _img_db(self, path):
        return _VCRImages(_as_list(path))

    @staticmethod
    def _primary(img):
        return img.dbs[0]

    @property
    def token_limit(self) -> int:
        return self.v_range[1] + self.special_tokens

    def _prepare(self, p, txt, img):
        txt.stage_lens = txt.side(f"id2len_{self.stage}.json", default={})

    def _open(self, p, txt, img, id_):
        names = txt.txt2img.get(id_)
        if isinstance(names, str):
            names = [names, names]
        if not isinstance(names, list | tuple) or len(names) != 2:
            raise DataError(txt.name, id_, f"a VCR example needs img_fname = [gt image, detected image], got "
                            f"{names!r}", "missing_image")
        nbb = 0
        for db, name in img.pick(names):
            if name not in db:
                raise DataError(db.name, name, f"image of VCR example {id_!r} ({txt.name}) is not in the img_db",
                                "missing_image")
            nbb += db.name2nbb[name]
        tl = int(txt.stage_lens.get(id_, txt.id2len[id_] * 3))
        return self.num_choices * (tl + 4 + nbb)

    def example(self, i):
        p, id_ = self.items[i]
        txt, img = self.pairs[p]
        rec = txt[id_]
        q = self.text(txt, id_, rec)
        for key in ("input_ids_as",) + (("input_ids_rs",) if self.stage == "qar" else ()):
            n = len(rec.get(key) or [])
            if n != self.num_choices:
                raise DataError(txt.name, id_, f"'{key}' has {n} choices; VCR needs exactly {self.num_choices}",
                                "bad_choices")
        answers = [self.text(txt, id_, {"a": a}, "a") for a in rec["input_ids_as"]]
        target = rec.get(f"{self.stage}_target")
        if not isinstance(target, int) or not 0 <= target < self.num_choices:
            raise DataError(txt.name, id_, f"'{self.stage}_target' must be an int in [0, 4), got {target!r}",
                            "bad_target")
        q_types = [0] * len(q)
        if self.stage == "qar":
            qa = rec.get("qa_target")
            if not isinstance(qa, int) or not 0 <= qa < self.num_choices:
                raise DataError(txt.name, id_, f"'qa_target' must be an int in [0, 4), got {qa!r}", "bad_target")
            q = q + [self.sep] + answers[qa]
            q_types = q_types + [2] * (len(answers[qa]) + 1)
            choices = [self.text(txt, id_, {"r": r}, "r") for r in rec["input_ids_rs"]]
        else:
            choices = answers
        parts = [db.get(name) for db, name in img.pick(rec.get("img_fname") or txt.txt2img[id_])]
        feat = np.concatenate([r.feat for r in parts])
        pos = np.concatenate([r.pos for r in parts])
        ctype = 3 if self.stage == "qar" else 2
        rows = [self.row(q + [self.sep] + c, feat, pos, txt_types=[0] + q_types + [ctype] * (len(c) + 2))
                for c in choices]
        return FTExample(id_, rows, target)

    def _targets(self, examples):
        t = torch.zeros(len(examples) * self.num_choices, dtype=torch.long)
        for k, e in enumerate(examples):
            t[k * self.num_choices + e.target] = 1
        return {"targets": t, "num_choices": [self.num_choices] * len(examples)}


# ----------------------------------------------------------------------------------------------------------------
class FinetuneBatchSource:
    """Endless token-bucket batches of a dataset (the trainer's ``BatchSource``), resumable.

    Args:
        dataset: a :class:`FinetuneDataset`.
        max_tokens: token budget per rank and batch (padded count, as the official sampler).
        seed: fixes the order (with the epoch). train: shuffle + drop last (False: one fixed pass, all examples).
        rank, world_size: this process's shard of every global batch.
    """

    def __init__(self, dataset: FinetuneDataset, max_tokens: int, seed: int = 0, train: bool = True, rank: int = 0,
                 world_size: int = 1, size_multiple: int | None = None):
        self.dataset = dataset
        mult = size_multiple or dataset.size_multiple
        self.sampler = TokenBucketSampler(dataset.lens, max_tokens, size_multiple=mult, drop_last=train,
                                          shuffle=train, seed=seed, rank=rank, world_size=world_size)
        self.epoch, self.pos = 0, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, "seed": self.sampler.seed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])

    def next_batch(self) -> PackedVLBatch:
        empty = 0
        while True:
            batches = self.sampler.batches(self.epoch)
            if not batches:
                raise ValueError(f"FinetuneBatchSource: an epoch has no batch ({len(self.dataset)} examples, "
                                 f"max_tokens {self.sampler.max_tokens}); use more data or a larger budget")
            if self.pos >= len(batches):
                self.epoch, self.pos = self.epoch + 1, 0
                continue
            idx = batches[self.pos]
            self.pos += 1
            batch = self.dataset.make_batch(idx) if idx else None
            if batch is not None:
                return batch
            empty += 1
            if empty > len(batches):
                raise DataError(type(self.dataset).__name__, None, "every example of a whole epoch was skipped as bad",
                                "no_examples")

    def iter_epoch(self, epoch: int = 0, max_batches: int | None = None) -> Iterator[PackedVLBatch]:
        """One pass (evaluation), independent of the training position."""
        for k, idx in enumerate(self.sampler.batches(epoch)):
            if max_batches is not None and k >= max_batches:
                return
            if idx:
                batch = self.dataset.make_batch(idx)
                if batch is not None:
                    yield batch
