"""UNITER pre-training data: conditional masking per task, token-bucket batches, resumable batch sources.

Tasks (each masks one modality only):

- ``mlm``: each text token masked with p=mask_prob (80% [MASK], 10% a random id in v_range, 10% kept), at least
  one ([MASK] then); ``txt_labels`` = original id at masked tokens, -1 elsewhere ([CLS]/[SEP] never masked).
- ``mrfr`` / ``mrc`` / ``mrc-kl``: each region masked with p=mask_prob, at least one; masked raw features are
  zeroed in the batch (the model adds the mask embedding); targets = the masked regions' original features
  (``feat_targets``) or detector soft labels (``soft_labels``, background included).
- ``itm``: with p=itm_neg_prob the image is replaced by another image of the same db pair (target 0), else the
  caption's own image (target 1). The packed layout is the OT input: word-region alignment runs over each
  example's text rows vs region rows (``to_official`` gives the official ``ot_inputs`` when needed).
- ``mlm-words`` (evaluation): exactly one token whose id is in ``eval_word_ids`` replaced by [MASK] per caption
  (captions without such a token are left out) -> "MLM accuracy on object/attribute words" (run as task mlm).

Determinism: every random choice of an example comes from ``(seed, task, epoch, batch position, slot in the
global batch)``, so the batches do not depend on the number of processes, on DataLoader workers, or on where a
run was resumed.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from ..batch import PackedVLBatch
from .collate import Example, collate
from .errors import BadExampleCounter, DataError
from .lmdb_db import ImageDB, TxtDB
from .sampler import TokenBucketSampler

__all__ = ["TASKS", "VLExamples", "PretrainBatchSource", "PretrainData", "build_pretrain_data", "parse_task_mix",
           "parse_tasks"]

TASKS = ("mlm", "mrfr", "mrc", "mrc-kl", "itm")
EVAL_TASKS = ("mlm-words",)


def parse_task_mix(tasks: str | Sequence[str] | dict[str, float], known: Sequence[str], what: str = "parse_tasks"
                   ) -> dict[str, float]:
    """``{"itm": 3, "mlm": 4}``, ``["mlm", "itm"]`` (ratio 1 each) or ``"itm:3,mlm:4"`` -> {task: ratio}, every task in
    ``known``, ratios non-negative with a positive sum (ValueError prefixed with ``what`` otherwise)."""
    if isinstance(tasks, str):
        out = {}
        for part in tasks.split(","):
            name, _, ratio = part.strip().partition(":")
            out[name.strip()] = float(ratio) if ratio else 1.0
        tasks = out
    elif not isinstance(tasks, dict):
        tasks = {t: 1.0 for t in tasks}
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise ValueError(f"{what}: unknown tasks {unknown}; expected some of {tuple(known)}")
    if not tasks or any(float(r) < 0 for r in tasks.values()) or sum(float(r) for r in tasks.values()) <= 0:
        raise ValueError(f"{what}: ratios must be non-negative with a positive sum, got {tasks}")
    return {t: float(r) for t, r in tasks.items()}


def parse_tasks(tasks: str | Sequence[str] | dict[str, float]) -> dict[str, float]:
    """UNITER's pre-training task mix (see :func:`parse_task_mix`)."""
    return parse_task_mix(tasks, TASKS + EVAL_TASKS, "parse_tasks")


def _task_code(task: str) -> int:
    return zlib.crc32(task.encode()) & 0x7FFFFFFF


class VLExamples:
    """(caption, image) pairs of one or more (txt_db, img_db) pairs, checked on opening.

    Texts whose image is not in its img_db, or with no txt2img entry, raise :class:`DataError` naming the dbs
    and keys (or are dropped and counted with ``skip_bad_examples``).
    """

    def __init__(self, pairs: Sequence[tuple[TxtDB, ImageDB]], skip_bad_examples: bool = False,
                 counter: BadExampleCounter | None = None):
        if not pairs:
            raise ValueError("VLExamples: no (txt_db, img_db) pairs given")
        self.pairs = list(pairs)
        self.skip = skip_bad_examples
        self.bad = counter if counter is not None else BadExampleCounter()
        t0 = self.pairs[0][0]
        for txt, _ in self.pairs[1:]:
            if (txt.cls, txt.sep, txt.mask, txt.v_range) != (t0.cls, t0.sep, t0.mask, t0.v_range):
                raise ValueError(f"VLExamples: txt_db {txt.name} has special ids / v_range "
                                 f"{(txt.cls, txt.sep, txt.mask, txt.v_range)} but {t0.name} has "
                                 f"{(t0.cls, t0.sep, t0.mask, t0.v_range)}; every txt_db must share one tokenizer")
        self.cls, self.sep, self.mask, self.v_range = t0.cls, t0.sep, t0.mask, t0.v_range
        dims = {img.img_dim for _, img in self.pairs}
        if len(dims) > 1:
            raise ValueError(f"VLExamples: img_dbs have different feature dims {sorted(dims)}")
        self.img_dim = dims.pop()
        labels = {img.label_dim for _, img in self.pairs}
        self.label_dim = labels.pop() if len(labels) == 1 else None
        self.items: list[tuple[int, str, str]] = []  # (pair, txt id, img name)
        self.lens: list[int] = []
        self.img_pool: list[list[str]] = []
        for p, (txt, img) in enumerate(self.pairs):
            pool = set()
            for id_ in txt.ids:
                name = txt.txt2img.get(id_)
                try:
                    if not isinstance(name, str):
                        raise DataError(txt.name, id_, f"txt2img.json has no single image for this text (got {name!r})",
                                        "missing_image")
                    if name not in img:
                        raise DataError(img.name, name, f"image referenced by text {id_!r} of {txt.name} is not in "
                                        "the img_db", "missing_image")
                except DataError as e:
                    self.bad.skip_or_raise(e, self.skip)
                    continue
                self.items.append((p, id_, name))
                self.lens.append(txt.id2len[id_] + 2 + img.name2nbb[name])
                pool.add(name)
            self.img_pool.append(sorted(pool))
        if not self.items:
            raise DataError(", ".join(t.name for t, _ in self.pairs), None, "no usable examples", "no_examples")

    def __len__(self) -> int:
        return len(self.items)

    def text(self, i: int) -> list[int]:
        p, id_, _ = self.items[i]
        return [self.cls] + self.pairs[p][0].input_ids(id_) + [self.sep]

    def image(self, p: int, name: str, soft_labels: bool = False):
        return self.pairs[p][1].get(name, soft_labels=soft_labels)


# ----------------------------------------------------------------------------------------------- masking
def mask_text(ids: np.ndarray, rng: np.random.Generator, prob: float, mask_id: int, v_range: tuple[int, int]
              ) -> tuple[np.ndarray, np.ndarray]:
    """BERT masking of ``ids`` [L] (interior tokens only: [CLS] and [SEP] at the ends are kept) -> (ids, labels)."""
    n = len(ids) - 2
    out, labels = ids.copy(), np.full_like(ids, -1)
    if n <= 0:
        return out, labels
    r = rng.random(n)
    chosen = r < prob
    how = r / prob  # uniform in [0, 1) on chosen tokens
    inner = out[1:-1]
    labels[1:-1] = np.where(chosen, inner, -1)
    to_mask = chosen & (how < 0.8)
    to_rand = chosen & (how >= 0.8) & (how < 0.9)
    if not chosen.any():
        k = int(rng.integers(n))
        labels[1 + k] = inner[k]
        to_mask[k] = True
    rand_ids = rng.integers(v_range[0], v_range[1], n)
    inner[:] = np.where(to_mask, mask_id, np.where(to_rand, rand_ids, inner))
    return out, labels


def mask_regions(n: int, rng: np.random.Generator, prob: float) -> np.ndarray:
    """[n] bool: each region with p=prob, at least one."""
    m = rng.random(n) < prob
    if n and not m.any():
        m[int(rng.integers(n))] = True
    return m


# ----------------------------------------------------------------------------------------------- batches
class PretrainBatchSource:
    """Endless batches of one task (the trainer's ``BatchSource``): ``next_batch()``, ``state_dict()``,
    ``load_state_dict()``; epochs follow each other with a fresh order. ``num_workers`` > 0 builds batches in
    DataLoader worker processes (the order and content are the same)."""

    def __init__(self, data: PretrainData, task: str, sampler: TokenBucketSampler, num_workers: int = 0):
        self.data, self.task, self.sampler, self.num_workers = data, task, sampler, num_workers
        self.epoch, self.pos = 0, 0
        self._it: Iterator | None = None

    def state_dict(self) -> dict:
        return {"task": self.task, "epoch": self.epoch, "pos": self.pos, "seed": self.sampler.seed,
                "world_size": self.sampler.world_size}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._it = None

    def _batches(self) -> list[list[int]]:
        return self.sampler.batches(self.epoch)

    def next_batch(self) -> PackedVLBatch:
        empty_in_a_row = 0
        while True:
            n = self.sampler.num_batches(self.epoch)
            if n == 0:
                raise ValueError(f"PretrainBatchSource({self.task}): an epoch has no batch ({len(self.data.examples)} "
                                 f"examples, max_tokens {self.sampler.max_tokens}); use more data or drop_last=False")
            if self.pos >= n:
                self.epoch, self.pos, self._it = self.epoch + 1, 0, None
                continue
            if self.num_workers > 0:
                if self._it is None:
                    self._it = self._worker_iter()
                batch, counts = next(self._it)
                self.data.bad.merge(counts)
            else:
                batch = self.data.make_batch(self.task, self.epoch, self.pos, self._batches()[self.pos],
                                             self.sampler.rank, self.sampler.world_size)
            self.pos += 1
            if batch is not None:
                return batch
            empty_in_a_row += 1
            if empty_in_a_row > n:
                raise DataError("pretrain data", None, f"task {self.task}: every example of a whole epoch was "
                                "skipped as bad", "no_examples")

    def _worker_iter(self) -> Iterator:
        plan = _BatchPlan(self.data, self.task, self.epoch, self.pos, self._batches()[self.pos:],
                          self.sampler.rank, self.sampler.world_size)
        loader = torch.utils.data.DataLoader(plan, batch_size=None, shuffle=False, num_workers=self.num_workers,
                                             collate_fn=_identity, persistent_workers=False)
        return iter(loader)

    def iter_epoch(self, epoch: int = 0) -> Iterator[PackedVLBatch]:
        """One pass over ``epoch`` (validation), independent of the training position."""
        for pos, idx in enumerate(self.sampler.batches(epoch)):
            if idx:
                batch = self.data.make_batch(self.task, epoch, pos, idx, self.sampler.rank, self.sampler.world_size)
                if batch is not None:
                    yield batch


def _identity(x):
    return x


class _BatchPlan(torch.utils.data.Dataset):
    def __init__(self, data, task, epoch, start, batches, rank, world_size):
        self.data, self.task, self.epoch, self.start = data, task, epoch, start
        self.batches, self.rank, self.world_size = batches, rank, world_size

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, k: int):
        before = self.data.bad.as_dict()
        batch = self.data.make_batch(self.task, self.epoch, self.start + k, self.batches[k], self.rank,
                                     self.world_size)
        after = self.data.bad.as_dict()
        return batch, {r: after[r] - before.get(r, 0) for r in after if after[r] != before.get(r, 0)}


class PretrainData:
    """Examples + per-task batch sources. ``sources`` and ``mix`` plug into ``fastvl.train.Trainer``; ``bad`` counts
    skipped examples; ``dims`` gives the model sizes the data needs (img_dim, img_label_dim, vocab_size)."""

    def __init__(self, examples: VLExamples, tasks: dict[str, float], max_tokens: int, seed: int, rank: int,
                 world_size: int, train: bool, mask_prob: float = 0.15, itm_neg_prob: float = 0.5,
                 bucket_size: int = 8192, size_multiple: int = 8, num_workers: int = 0,
                 eval_word_ids: Sequence[int] | None = None):
        if not 0.0 < mask_prob <= 1.0:
            raise ValueError(f"PretrainData: 'mask_prob' must be in (0, 1], got {mask_prob}")
        if not 0.0 <= itm_neg_prob <= 1.0:
            raise ValueError(f"PretrainData: 'itm_neg_prob' must be in [0, 1], got {itm_neg_prob}")
        if "mlm-words" in tasks and not eval_word_ids:
            raise ValueError("PretrainData: task 'mlm-words' needs 'eval_word_ids'")
        self.examples, self.mix, self.seed = examples, dict(tasks), seed
        self.mask_prob, self.itm_neg_prob = mask_prob, itm_neg_prob
        self.eval_word_ids = np.asarray(sorted(set(eval_word_ids or [])), dtype=np.int64)
        self.bad = examples.bad
        if any(t.startswith("mrc") for t in tasks) and examples.label_dim is None:
            raise ValueError("PretrainData: tasks mrc/mrc-kl need 'soft_labels' in the img_dbs (all of one width)")
        if "itm" in tasks:
            for p, pool in enumerate(examples.img_pool):
                if len(pool) < 2:
                    raise ValueError(f"PretrainData: task itm needs at least 2 images per db pair to draw negatives; "
                                     f"{examples.pairs[p][1].name} has {len(pool)}")
        self.dims = {"img_dim": examples.img_dim, "img_label_dim": examples.label_dim,
                     "vocab_size": examples.v_range[1]}
        self.sources: dict[str, PretrainBatchSource] = {}
        for task in tasks:
            sampler = TokenBucketSampler(examples.lens, max_tokens, bucket_size, size_multiple, drop_last=train,
                                         shuffle=train, seed=seed * 1_000_003 + _task_code(task), rank=rank,
                                         world_size=world_size)
            self.sources[task] = PretrainBatchSource(self, task, sampler, num_workers)

    def batches(self, task: str, epoch: int = 0) -> Iterator[PackedVLBatch]:
        """One pass over the data for ``task`` (validation)."""
        return self.sources[task].iter_epoch(epoch)

    # ------------------------------------------------------------------------------------------ examples
    def make_example(self, task: str, i: int, rng: np.random.Generator) -> Example | None:
        ex = self.examples
        p, id_, name = ex.items[i]
        ids = np.asarray(ex.text(i), dtype=np.int64)
        kw: dict = {}
        if task == "itm":
            target = 0 if rng.random() < self.itm_neg_prob else 1
            if target == 0:
                pool = ex.img_pool[p]
                k = int(rng.integers(len(pool) - 1))
                name = pool[k] if pool[k] != name else pool[-1]
            kw["itm_target"] = target
        elif task == "mlm":
            ids, kw["txt_labels"] = mask_text(ids, rng, self.mask_prob, ex.mask, ex.v_range)
        elif task == "mlm-words":
            cand = np.flatnonzero(np.isin(ids[1:-1], self.eval_word_ids)) + 1
            if cand.size == 0:
                return None
            k = int(cand[rng.integers(cand.size)])
            labels = np.full_like(ids, -1)
            labels[k], ids[k] = ids[k], ex.mask
            kw["txt_labels"] = labels
        img = ex.image(p, name, soft_labels=task.startswith("mrc"))
        if task in ("mrfr", "mrc", "mrc-kl"):
            m = mask_regions(img.nbb, rng, self.mask_prob)
            kw["img_mask"] = m
            if task == "mrfr":
                kw["feat_targets"] = img.feat[m]
            else:
                kw["soft_labels"] = img.soft_labels[m]
        return Example(id=id_, img_fname=name, input_ids=ids, img_feat=img.feat, img_pos=img.pos, **kw)

    def make_batch(self, task: str, epoch: int, pos: int, indices: Sequence[int], rank: int = 0,
                   world_size: int = 1) -> PackedVLBatch | None:
        """The batch of global batch ``pos`` of ``epoch`` holding ``indices`` (this rank's share: global slots
        ``rank, rank + world_size, ...``); None when every example was skipped as bad."""
        examples = []
        code = _task_code(task)
        for k, i in enumerate(indices):
            rng = np.random.default_rng([self.seed, code, epoch, pos, rank + k * world_size])
            try:
                e = self.make_example(task, i, rng)
            except DataError as err:
                self.bad.skip_or_raise(err, self.examples.skip)
                continue
            if e is not None:
                examples.append(e)
        return collate(examples, task) if examples else None


def build_pretrain_data(txt_dbs: str | os.PathLike | Sequence[str | os.PathLike],
                        img_dbs: str | os.PathLike | Sequence[str | os.PathLike],
                        tasks: str | Sequence[str] | dict[str, float] = "itm:3,mlm:4,mrfr:2,mrc-kl:2",
                        max_tokens: int = 4096, seed: int = 42, rank: int = 0, world_size: int = 1,
                        train: bool = True, max_txt_len: int = 60, conf_th: float | None = None,
                        max_bb: int | None = None, min_bb: int | None = None, mask_prob: float = 0.15,
                        itm_neg_prob: float = 0.5, bucket_size: int = 8192, size_multiple: int = 8,
                        num_workers: int = 0, skip_bad_examples: bool = False,
                        eval_word_ids: Sequence[int] | None = None) -> PretrainData:
    """Pre-training data over (txt_db, img_db) pairs (official formats).

    Args:
        txt_dbs, img_dbs: one path each, or equally long lists (pair i = txt_dbs[i] with img_dbs[i]).
        tasks: {task: ratio} (see :func:`parse_tasks`); one batch source per task.
        max_tokens: token budget per rank and batch (padded count: max joint length x examples).
        seed: fixes the order, masking and negatives. rank, world_size: this process's shard (the global batches
            are the same for any world_size with the same max_tokens x world_size).
        train: True: shuffled, drop last; False: one deterministic pass order for validation.
        max_txt_len: longer captions are dropped (official 60; -1 keeps all).
        conf_th, max_bb, min_bb: img_db region rule; all None: read from the img_db folder name.
        skip_bad_examples: skip and count (``data.bad``) bad examples instead of raising.
        eval_word_ids: token ids for the 'mlm-words' evaluation task.
    """
    txts = [txt_dbs] if isinstance(txt_dbs, str | os.PathLike) else list(txt_dbs)
    imgs = [img_dbs] if isinstance(img_dbs, str | os.PathLike) else list(img_dbs)
    if len(txts) != len(imgs):
        raise ValueError(f"build_pretrain_data: 'txt_dbs' has {len(txts)} paths but 'img_dbs' has {len(imgs)}")
    ratios = parse_tasks(tasks)
    pairs = [(TxtDB(t, max_txt_len), ImageDB(i, conf_th, max_bb, min_bb)) for t, i in zip(txts, imgs)]
    examples = VLExamples(pairs, skip_bad_examples=skip_bad_examples)
    return PretrainData(examples, ratios, max_tokens, seed, rank, world_size, train, mask_prob, itm_neg_prob,
                        bucket_size, size_multiple, num_workers, eval_word_ids)
