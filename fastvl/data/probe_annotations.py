"""Grounding annotations for the VALUE probes: which caption words name which region, relations between regions and
sentence properties, in one form (:class:`GroundedCaption`) whatever the source.

Sources:

- the synthetic scene corpus (:func:`synthetic_grounding`): every object phrase ("a small red cup") names the one
  kept region whose detector class is that object; the relation a clause states ("... left of the cup": subject the
  clause's object, object the cup, predicate words marked) is a 'caption' relation; besides, every ordered pair of
  grounded regions gets 'derived' relations from the boxes (left of / right of / above / below as the caption
  grammar defines them, bigger than) and the caption's colour words (same colour as);
  sentence properties from the caption template (word count, object count, opening clause, relation clause);
- Flickr30k Entities (:func:`read_flickr30k_sentences`, :func:`read_flickr30k_boxes`, :func:`flickr30k_grounding`):
  ``Sentences/<id>.txt`` with ``[/EN#<entity>/<type>[/<type>...] words]`` markup and ``Annotations/<id>.xml``
  (Pascal-VOC style boxes whose ``<name>`` is the entity id); entity boxes are matched to detector regions by IoU;
- Visual Genome ``relationships.json`` (:func:`read_vg_relationships`, :func:`vg_relations`): subject / object
  boxes matched to detector regions by IoU.

Every reader raises :class:`~fastvl.data.errors.DataError` naming the file and the key (sentence, entity,
relationship) when an annotation names a word, entity or region that does not exist.
"""

from __future__ import annotations

import json
import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import DataError
from .lmdb_db import ImageDB, ImageRecord, TxtDB
from .synthetic import CLASSES, COLOURS, SIZES

__all__ = ["GroundedCaption", "Phrase", "Relation", "box_iou", "check_grounding", "flickr30k_grounding",
           "match_regions", "read_flickr30k_boxes", "read_flickr30k_sentences", "read_vg_relationships",
           "spatial_relation", "synthetic_grounding", "vg_relations"]

_OPENINGS = ("there is", "we see", "here is", "the image has")
_RELATION_WORDS = ("left of", "right of", "above", "below")


@dataclass
class Phrase:
    """Words ``start .. end-1`` of a caption name the regions ``regions`` (indices into the image's kept regions)."""

    start: int
    end: int
    regions: list[int]
    type: str = ""
    entity: str = ""


@dataclass
class Relation:
    """``subject`` (a region index) stands in ``predicate`` to ``object`` (a region index).

    ``source`` says where the fact comes from: 'annotation' (an annotated relation, e.g. Visual Genome's), 'caption'
    (the caption states it: words ``start .. end-1`` are the predicate, e.g. "left of" in "a red cup left of the
    ball") or 'derived' (computed from the boxes / attributes for every pair of grounded regions, whether or not
    anything states it). The relation probe's main figure uses the stated ones ('annotation' and 'caption').
    """

    subject: int
    object: int
    predicate: str
    source: str = "annotation"
    start: int = -1
    end: int = -1


@dataclass
class GroundedCaption:
    """A caption with its grounding: whitespace words, phrases, region relations and sentence properties."""

    id: str
    img_fname: str
    words: list[str]
    phrases: list[Phrase] = field(default_factory=list)
    relations: list[Relation] = field(default_factory=list)
    properties: dict[str, str] = field(default_factory=dict)


def check_grounding(cap: GroundedCaption, n_regions: int, source: str = "annotations") -> None:
    """Raise DataError (naming ``source`` and the caption id) unless every phrase spans existing words and names
    regions ``0 .. n_regions-1``, and every relation joins two distinct existing regions."""
    n = len(cap.words)
    for k, p in enumerate(cap.phrases):
        if not 0 <= p.start < p.end <= n:
            raise DataError(source, cap.id, f"phrase {k} spans words [{p.start}, {p.end}) but the caption has {n} "
                            f"words", "bad_annotation")
        for r in p.regions:
            if not 0 <= r < n_regions:
                raise DataError(source, cap.id, f"phrase {k} ({' '.join(cap.words[p.start:p.end])!r}) names region "
                                f"{r} but image {cap.img_fname} has {n_regions} regions", "bad_annotation")
    for k, rel in enumerate(cap.relations):
        for name in ("subject", "object"):
            r = getattr(rel, name)
            if not 0 <= r < n_regions:
                raise DataError(source, cap.id, f"relation {k} ({rel.predicate!r}) has {name} region {r} but image "
                                f"{cap.img_fname} has {n_regions} regions", "bad_annotation")
        if rel.subject == rel.object:
            raise DataError(source, cap.id, f"relation {k} ({rel.predicate!r}) joins region {rel.subject} to itself",
                            "bad_annotation")
        if rel.source not in ("annotation", "caption", "derived"):
            raise DataError(source, cap.id, f"relation {k} ({rel.predicate!r}) has source {rel.source!r}; expected "
                            "'annotation', 'caption' or 'derived'", "bad_annotation")
        if rel.source == "caption" and not 0 <= rel.start < rel.end <= n:
            raise DataError(source, cap.id, f"relation {k} ({rel.predicate!r}) is stated by words [{rel.start}, "
                            f"{rel.end}) but the caption has {n} words", "bad_annotation")


# ---------------------------------------------------------------------------------------------------- boxes
def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of boxes a [n, 4] and b [m, 4] (x1, y1, x2, y2) -> [n, m]."""
    a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
    x1 = np.maximum(a[:, None, 0], b[None, :, 0])
    y1 = np.maximum(a[:, None, 1], b[None, :, 1])
    x2 = np.minimum(a[:, None, 2], b[None, :, 2])
    y2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = lambda z: np.clip(z[:, 2] - z[:, 0], 0, None) * np.clip(z[:, 3] - z[:, 1], 0, None)  # noqa: E731
    union = area(a)[:, None] + area(b)[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def match_regions(boxes: np.ndarray, norm_bb: np.ndarray, width: float, height: float, iou: float = 0.5
                  ) -> list[int]:
    """Indices of the detector regions (``norm_bb`` [n, >=4], normalised x1, y1, x2, y2) whose IoU with any of
    ``boxes`` [k, 4] (pixels in an image of ``width`` x ``height``) is >= ``iou``; each box also takes its best
    region when that one overlaps at all."""
    if len(boxes) == 0 or len(norm_bb) == 0:
        return []
    scaled = np.asarray(boxes, np.float64) / np.array([width, height, width, height])
    m = box_iou(scaled, np.asarray(norm_bb)[:, :4])
    hit = set(np.nonzero((m >= iou).any(0))[0].tolist())
    return sorted(hit)


def spatial_relation(box_a: Sequence[float], box_b: Sequence[float]) -> str:
    """Where box a (x1, y1, x2, y2; y grows downwards) is relative to box b, by centres: 'left of' / 'right of'
    when the horizontal offset dominates, else 'above' / 'below' (the synthetic caption grammar's rule)."""
    dx = (box_a[0] + box_a[2] - box_b[0] - box_b[2]) / 2
    dy = (box_a[1] + box_a[3] - box_b[1] - box_b[3]) / 2
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


# ---------------------------------------------------------------------------------------------------- synthetic
def _stated_relation(words: list[str], i: int, subject: int, classes: list[int], class_words: list[str],
                     grounded: dict, id_: str, source: str) -> Relation | None:
    """The relation the caption states right after the object phrase ending at word ``i`` ("... cup left of the
    ball"), or None: its predicate words, and the region of the object named after 'the' (an object mentioned
    before, so already grounded)."""
    for pred in _RELATION_WORDS:
        k = len(pred.split())
        if words[i + 1:i + 1 + k] == pred.split() and i + 2 + k < len(words) and words[i + 1 + k] == "the":
            ref = words[i + 2 + k]
            cls = class_words.index(ref) if ref in class_words else -1
            if cls not in classes or classes.index(cls) not in grounded or classes.index(cls) == subject:
                raise DataError(source, id_, f"caption states {' '.join(words[i - 3:i + 3 + k])!r} but the {ref!r} "
                                "names no object phrase grounded before it", "bad_annotation")
            return Relation(subject, classes.index(cls), pred, "caption", i + 1, i + 1 + k)
    return None


def _synthetic_caption(id_: str, img_fname: str, sent: str, classes: list[int], norm_bb: np.ndarray,
                       n_classes: int, source: str) -> GroundedCaption:
    words = sent.split()
    class_words = CLASSES[:n_classes]
    phrases, colour_of, stated = [], {}, []
    for i, w in enumerate(words):
        if w in class_words and i >= 3 and words[i - 1] in COLOURS and words[i - 2] in SIZES \
                and words[i - 3] in ("a", "an"):
            cls = class_words.index(w)
            if cls not in classes:
                raise DataError(source, id_, f"caption names a {w!r} (words {i - 3}..{i}) but no kept region of "
                                f"image {img_fname} has that class (region classes "
                                f"{[class_words[c] for c in classes]})", "bad_annotation")
            r = classes.index(cls)
            phrases.append(Phrase(i - 3, i + 1, [r], type=w, entity=str(r)))
            colour_of[r] = words[i - 1]
            stated.append(_stated_relation(words, i, r, classes, class_words, colour_of, id_, source))
    relations = []
    regions = sorted(colour_of)
    for a in regions:
        for b in regions:
            if a == b:
                continue
            relations.append(Relation(a, b, spatial_relation(norm_bb[a], norm_bb[b]), "derived"))
            area = lambda r: float(norm_bb[r, 2] - norm_bb[r, 0]) * float(norm_bb[r, 3] - norm_bb[r, 1])  # noqa
            if area(a) > area(b):
                relations.append(Relation(a, b, "bigger than", "derived"))
            if colour_of[a] == colour_of[b]:
                relations.append(Relation(a, b, "same colour as", "derived"))
    relations += [r for r in stated if r is not None]
    text = " ".join(words)
    props = {"length": str(len(words)), "objects": str(len(phrases)),
             "opening": "yes" if text.startswith(_OPENINGS) else "no",
             "relation_clause": "yes" if any(f" {r} the " in text for r in _RELATION_WORDS) else "no"}
    return GroundedCaption(id_, img_fname, words, phrases, relations, props)


def synthetic_grounding(txt_db: str | os.PathLike | TxtDB, img_db: str | os.PathLike | ImageDB,
                        n_classes: int, limit: int | None = None) -> Iterator[tuple[GroundedCaption, ImageRecord]]:
    """``(caption, its image's kept regions)`` for the captions of a synthetic-corpus txt_db, in db order.

    The region of each object phrase is the kept region whose detector class (argmax of its soft labels past the
    background) is the phrase's object word (object classes are distinct within a synthetic scene).
    """
    txt = txt_db if isinstance(txt_db, TxtDB) else TxtDB(txt_db, max_txt_len=-1)
    img = img_db if isinstance(img_db, ImageDB) else ImageDB(img_db)
    for k, id_ in enumerate(txt.ids):
        if limit is not None and k >= limit:
            break
        ex = txt[id_]
        if "sent" not in ex or "img_fname" not in ex:
            raise DataError(txt.name, id_, "record has no 'sent' / 'img_fname' (not a synthetic-corpus txt_db?)",
                            "bad_annotation")
        rec = img.get(ex["img_fname"], soft_labels=True)
        classes = (rec.soft_labels[:, 1:].argmax(1)).tolist()
        cap = _synthetic_caption(str(id_), ex["img_fname"], ex["sent"], classes, rec.norm_bb, n_classes, txt.name)
        check_grounding(cap, rec.nbb, txt.name)
        yield cap, rec


# ---------------------------------------------------------------------------------------------------- Flickr30k
_EN = re.compile(r"\[/EN#(\d+)((?:/[^\s\]]+)+)\s+([^\]]*)\]")


def read_flickr30k_sentences(path: str | os.PathLike) -> list[dict]:
    """A Flickr30k Entities ``Sentences/<id>.txt`` file -> one dict per line: ``words`` (markup removed) and
    ``phrases`` [{'start', 'end', 'entity', 'types'}] (word spans). Malformed markup raises DataError naming the
    file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(str(path), None, "Flickr30k Entities sentence file does not exist", "missing_db")
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        words, phrases, pos = [], [], 0
        for m in _EN.finditer(line):
            words += _plain_words(line[pos:m.start()], path, n)
            span = m.group(3).split()
            if not span:
                raise DataError(str(path), f"line {n}", f"entity {m.group(1)} has an empty phrase", "bad_annotation")
            phrases.append({"start": len(words), "end": len(words) + len(span), "entity": m.group(1),
                            "types": [t for t in m.group(2).split("/") if t]})
            words += span
            pos = m.end()
        words += _plain_words(line[pos:], path, n)
        out.append({"words": words, "phrases": phrases})
    return out


def _plain_words(text: str, path: Path, line: int) -> list[str]:
    if "[" in text or "]" in text:
        raise DataError(str(path), f"line {line}", f"malformed entity markup near {text.strip()[:40]!r} (expected "
                        "'[/EN#<id>/<type> words]')", "bad_annotation")
    return text.split()


def read_flickr30k_boxes(path: str | os.PathLike) -> tuple[int, int, dict[str, np.ndarray]]:
    """A Flickr30k Entities ``Annotations/<id>.xml`` -> (width, height, {entity id: boxes [k, 4] x1 y1 x2 y2}).
    Objects without a box (``nobndbox`` / ``scene``) are left out; a box outside the image raises DataError."""
    path = Path(path)
    if not path.is_file():
        raise DataError(str(path), None, "Flickr30k Entities annotation file does not exist", "missing_db")
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise DataError(str(path), None, f"is not valid XML: {e}", "corrupt_db") from e
    size = root.find("size")
    if size is None or size.findtext("width") is None or size.findtext("height") is None:
        raise DataError(str(path), None, "lacks <size><width>/<height>", "bad_annotation")
    width, height = int(size.findtext("width")), int(size.findtext("height"))
    boxes: dict[str, list] = {}
    for obj in root.iter("object"):
        bb = obj.find("bndbox")
        if bb is None:
            continue
        try:
            box = [float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")]
        except (TypeError, ValueError) as e:
            raise DataError(str(path), None, f"an <object> has an incomplete <bndbox> ({e})", "bad_annotation") from e
        if not (0 <= box[0] < box[2] <= width + 1 and 0 <= box[1] < box[3] <= height + 1):
            raise DataError(str(path), None, f"box {box} lies outside the {width}x{height} image", "bad_annotation")
        for name in obj.findall("name"):
            boxes.setdefault(name.text.strip(), []).append(box)
    return width, height, {k: np.asarray(v, np.float32) for k, v in boxes.items()}


def flickr30k_grounding(sentences_file: str | os.PathLike, annotation_file: str | os.PathLike, norm_bb: np.ndarray,
                        img_fname: str, iou: float = 0.5) -> list[GroundedCaption]:
    """Grounded captions of one Flickr30k Entities image against its detector regions ``norm_bb`` [n, >=4].

    A phrase whose entity has boxes in the XML names the regions of IoU >= ``iou`` with one of them (phrases that
    overlap no region are kept with no regions; entity 0 / boxless entities are not visual). A phrase naming an
    entity that the XML does not list at all raises DataError (naming file, line and entity)."""
    sents = read_flickr30k_sentences(sentences_file)
    width, height, boxes = read_flickr30k_boxes(annotation_file)
    listed = _listed_entities(Path(annotation_file))
    stem = Path(sentences_file).stem
    out = []
    for n, s in enumerate(sents):
        cap = GroundedCaption(f"{stem}_{n}", img_fname, s["words"],
                              properties={"length": str(len(s["words"]))})
        for p in s["phrases"]:
            if p["entity"] == "0" or "notvisual" in p["types"]:
                continue
            if p["entity"] not in listed:
                words = " ".join(s["words"][p["start"]:p["end"]])
                raise DataError(str(sentences_file), f"line {n + 1}", f"phrase {words!r} names entity "
                                f"{p['entity']} which {Path(annotation_file).name} does not list",
                                "bad_annotation")
            regions = match_regions(boxes.get(p["entity"], np.zeros((0, 4))), norm_bb, width, height, iou)
            cap.phrases.append(Phrase(p["start"], p["end"], regions, type=p["types"][0], entity=p["entity"]))
        check_grounding(cap, len(norm_bb), str(sentences_file))
        out.append(cap)
    return out


def _listed_entities(path: Path) -> set[str]:
    return {name.text.strip() for name in ET.parse(path).getroot().iter("name") if name.text}


# ---------------------------------------------------------------------------------------------------- Visual Genome
def read_vg_relationships(path: str | os.PathLike) -> dict[str, list[dict]]:
    """Visual Genome ``relationships.json`` -> {image id: [{'id', 'predicate', 'subject': box, 'object': box,
    'subject_name', 'object_name'}]} with boxes x1 y1 x2 y2 in pixels. A relationship whose subject or object has no
    box raises DataError naming the image and relationship ids."""
    path = Path(path)
    if not path.is_file():
        raise DataError(str(path), None, "Visual Genome relationships file does not exist", "missing_db")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise DataError(str(path), None, f"is not valid JSON: {e}", "corrupt_db") from e
    if not isinstance(data, list):
        raise DataError(str(path), None, f"expected a list of images, got {type(data).__name__}", "corrupt_db")
    out: dict[str, list[dict]] = {}
    for img in data:
        iid = str(img.get("image_id", img.get("id")))
        rels = []
        for r in img.get("relationships", []):
            rid = r.get("relationship_id", "?")
            ent = {}
            for role in ("subject", "object"):
                o = r.get(role)
                if not isinstance(o, dict) or any(k not in o for k in ("x", "y", "w", "h")):
                    raise DataError(str(path), f"image {iid} relationship {rid}", f"{role} has no box (x, y, w, h)",
                                    "bad_annotation")
                ent[role] = [float(o["x"]), float(o["y"]), float(o["x"]) + float(o["w"]), float(o["y"]) + float(o["h"])]
                names = o.get("names") or [o.get("name", "")]
                ent[f"{role}_name"] = names[0]
            rels.append({"id": str(rid), "predicate": str(r.get("predicate", "")).strip().lower(), **ent})
        out[iid] = rels
    return out


def vg_relations(relationships: list[dict], norm_bb: np.ndarray, width: float, height: float, iou: float = 0.5,
                 source: str = "relationships.json", image_id: str = "?") -> list[Relation]:
    """Relations between detector regions ``norm_bb`` [n, >=4] of one image: each relationship's subject and object
    take their best-overlapping region (IoU >= ``iou``); pairs that match no region, or the same one, are left out.
    A box outside the ``width`` x ``height`` image raises DataError (naming the image and relationship)."""
    out = []
    for r in relationships:
        for role in ("subject", "object"):
            x1, y1, x2, y2 = r[role]
            if not (x1 >= 0 and y1 >= 0 and x2 <= width + 1 and y2 <= height + 1 and x2 > x1 and y2 > y1):
                raise DataError(source, f"image {image_id} relationship {r['id']}", f"{role} box {r[role]} lies "
                                f"outside the {width}x{height} image", "bad_annotation")
        scaled = np.asarray([r["subject"], r["object"]], np.float64) / np.array([width, height, width, height])
        m = box_iou(scaled, np.asarray(norm_bb)[:, :4])
        s, o = int(m[0].argmax()), int(m[1].argmax())
        if m[0, s] >= iou and m[1, o] >= iou and s != o:
            out.append(Relation(s, o, r["predicate"]))
    return out
