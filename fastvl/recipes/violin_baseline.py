"""The VIOLIN baseline job: ``fastvl finetune --model violin-baseline --task violin``.

Data: the VIOLIN statements of the synthetic video corpus by default (``--data`` / ``--opt video_db=.. sub_db=..
query_db=.. val_query_db=..`` as the HERO jobs take them): per clip its frame features (<= 256 frames), all its
subtitle tokens ([CLS] .. [SEP], <= 256) and its paired entailed / contradicted statements (ids ``x-1`` / ``x-0``).

Text encoder: the paper runs frozen BERT-base. ``--opt bert=FILE`` (a BERT state_dict, HuggingFace layout) with
``--opt bert_config=config.json`` loads the user's BERT and freezes it (its vocabulary must be the data's). Without
one, a small BERT (hidden 64, 2 layers) is pre-trained here by masked language modelling on the corpus' subtitle and
statement text, then frozen; it is cached (``~/.cache/fastvl``) so evaluation and later runs reuse it. The run
prints which it used.

Sizes: the paper's BiLSTMs are hsize1 150 / hsize2 300 (``--opt hsize1=150 --opt hsize2=300``); the CPU default
is 64 / 128 (same structure, a quarter of the LSTM weights). The paper trains with dropout 0.5 and Adam lr 3e-4
(``--dropout 0.5 --lr 3e-4``); the CPU default uses dropout 0.1 and lr 1e-3 so that 400 steps suffice (with 0.5 the
loss barely moves in that budget).

Metric: accuracy over both statements of every validation clip (threshold 0.5, as the official ``main.py``);
chance 0.5 (every clip has one statement of each label).
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.rnn import pad_sequence

from ..data.synthetic import default_cache_dir
from ..data.video import QueryDB, SubtitleDB, VideoFeatDB, paired_statement_id
from ..models.violin import (
    TextEncoderConfig,
    TextMlmHead,
    ViolinBaseline,
    ViolinConfig,
    ViolinTextEncoder,
    load_bert_state_dict,
)
from ..tasks.violin import ViolinBaselineTask
from ..train import checkpoint as ckpt
from .base import FinetuneData, FinetuneSettings, Recipe, SettingsError, load_pretrained
from .hero_finetune import video_paths

__all__ = ["RECIPE", "ViolinClips", "pretrain_text_encoder"]

MAX_LEN = 256  # frames, subtitle tokens and statement tokens (paper)


class ViolinClips:
    """The baseline's examples over official dbs: (vid, entailed statement id, contradicted statement id), with
    padded batches (:class:`~fastvl.models.violin.ViolinBaseline`'s dict) and a resumable shuffled batch source."""

    def __init__(self, video_db: str, sub_db: str, query_db: str, batch_size: int, seed: int = 0,
                 train: bool = True):
        self.vdb, self.sdb, self.qdb = VideoFeatDB(video_db), SubtitleDB(sub_db), QueryDB(query_db)
        self.cls_, self.sep = self.sdb.cls_, self.sdb.sep
        self.items: list[tuple[str, str, str]] = []
        for qid in self.qdb.ids:
            if not qid.endswith("-1"):
                continue
            neg = paired_statement_id(qid)
            vid = self.qdb.query2video.get(qid)
            if neg in self.qdb.id2len and vid in self.vdb:
                self.items.append((vid, qid, neg))
        if not self.items:
            raise SettingsError(f"fastvl finetune --model violin-baseline: {query_db} holds no statement pair "
                                "('x-1' entailed with its 'x-0' contradicted) whose video is in the video db")
        self.batch_size, self.seed, self.train = batch_size, seed, train
        self.epoch, self.pos = 0, 0
        self._order = self._perm(0)

    def __len__(self) -> int:
        return len(self.items)

    def _perm(self, epoch: int) -> list[int]:
        order = list(range(len(self.items)))
        if self.train:
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def _text(self, ids: list[int]) -> torch.Tensor:
        return torch.tensor([self.cls_] + list(ids)[:MAX_LEN - 2] + [self.sep], dtype=torch.long)

    def collate(self, idx: list[int]) -> dict[str, Any]:
        vids, subs, pos, neg = [], [], [], []
        for i in idx:
            vid, p, n = self.items[i]
            vids.append(torch.as_tensor(self.vdb.get(vid), dtype=torch.float32)[:MAX_LEN])
            sub_ids, _, _ = self.sdb.read(vid, self.vdb.nframes(vid))
            subs.append(self._text([t for s in sub_ids for t in s]))
            pos.append(self._text(self.qdb[p]["input_ids"]))
            neg.append(self._text(self.qdb[n]["input_ids"]))
        lens = lambda xs: torch.tensor([x.shape[0] for x in xs])  # noqa: E731
        return {"vid_feat": pad_sequence(vids, batch_first=True), "vid_lens": lens(vids),
                "sub_ids": pad_sequence(subs, batch_first=True), "sub_lens": lens(subs),
                "pos_ids": pad_sequence(pos, batch_first=True), "pos_lens": lens(pos),
                "neg_ids": pad_sequence(neg, batch_first=True), "neg_lens": lens(neg)}

    # batch source (the Trainer's protocol) ---------------------------------------------------------------
    def next_batch(self) -> dict[str, Any]:
        if self.pos + self.batch_size > len(self._order):
            self.epoch, self.pos = self.epoch + 1, 0
            self._order = self._perm(self.epoch)
        idx = self._order[self.pos:self.pos + self.batch_size]
        self.pos += self.batch_size
        return self.collate(idx)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._order = self._perm(self.epoch)

    def batches(self, limit: int | None = None):
        """One ordered pass (validation)."""
        for k, start in enumerate(range(0, len(self.items), self.batch_size)):
            if limit is not None and k >= limit:
                return
            yield self.collate(list(range(start, min(start + self.batch_size, len(self.items)))))

    def texts(self) -> list[torch.Tensor]:
        """Every subtitle and statement of these clips as [CLS] .. [SEP] id tensors (for the text encoder's MLM)."""
        out, seen = [], set()
        for vid, p, n in self.items:
            if vid not in seen:
                seen.add(vid)
                for s in self.sdb.read(vid, self.vdb.nframes(vid))[0]:
                    if s:
                        out.append(self._text(s))
            out += [self._text(self.qdb[p]["input_ids"]), self._text(self.qdb[n]["input_ids"])]
        return out


def pretrain_text_encoder(encoder: ViolinTextEncoder, texts: list[torch.Tensor], mask_id: int, v_range: tuple,
                          steps: int = 400, batch_size: int = 64, lr: float = 2e-3, seed: int = 0,
                          log=print) -> float:
    """Masked-LM pre-training of ``encoder`` on ``texts`` (15% of the tokens between [CLS] and [SEP]: 80% [MASK],
    10% random, 10% kept). Returns the last masked-token accuracy."""
    g = torch.Generator().manual_seed(seed)
    head = TextMlmHead(encoder)
    params = [p for p in encoder.parameters()] + [p for n, p in head.named_parameters()
                                                   if not n.endswith("decoder.weight")]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    encoder.train()
    acc = 0.0
    for _ in range(steps):
        idx = torch.randint(len(texts), (batch_size,), generator=g).tolist()
        ids = pad_sequence([texts[i] for i in idx], batch_first=True)
        lens = torch.tensor([texts[i].shape[0] for i in idx])
        inner = (torch.arange(ids.shape[1])[None] > 0) & (torch.arange(ids.shape[1])[None] < (lens - 1)[:, None])
        sel = inner & (torch.rand(ids.shape, generator=g) < 0.15)
        if not bool(sel.any()):
            continue
        r = torch.rand(ids.shape, generator=g)
        rnd = torch.randint(v_range[0], v_range[1], ids.shape, generator=g)
        inp = torch.where(sel & (r < 0.8), torch.full_like(ids, mask_id), ids)
        inp = torch.where(sel & (r >= 0.8) & (r < 0.9), rnd, inp)
        h = encoder(inp, lens)[sel]
        scores = head(h)
        loss = F.cross_entropy(scores, ids[sel])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        acc = float((scores.argmax(-1) == ids[sel]).float().mean())
    encoder.eval()
    log(f"text encoder: masked-LM pre-training, {steps} steps, last masked-token accuracy {acc:.3f}")
    return acc


def _paths(s: FinetuneSettings) -> dict[str, Any]:
    return video_paths(s, "violin")


def build_data(s: FinetuneSettings, rank: int, world: int) -> FinetuneData:
    p = _paths(s)
    bs = int(s.options.get("batch_size", 32))
    train = ViolinClips(p["video_db"], p["sub_db"], p["train"], bs, seed=s.seed + rank, train=True)
    val = ViolinClips(p["video_db"], p["sub_db"], p["val"], 64, train=False) if p["val"] else None
    dims = {"vfeat_dim": train.vdb.vfeat_dim, "vocab_size": train.sdb.vocab_size, "synthetic": p["synthetic"],
            "mask_id": train.sdb.mask, "v_range": list(train.sdb.v_range)}
    info = {"source": p["source"], "train_clips": len(train), "val_clips": len(val) if val else 0}
    return FinetuneData(sources={"violin": train}, mix={"violin": 1.0}, val=val, dims=dims, info=info)


def _text_config(s: FinetuneSettings, dims: dict) -> TextEncoderConfig:
    if s.options.get("bert_config"):
        return TextEncoderConfig.from_json_file(s.options["bert_config"])
    return TextEncoderConfig(vocab_size=int(dims["vocab_size"]), hidden_size=64, num_hidden_layers=2,
                             num_attention_heads=4, intermediate_size=128, hidden_dropout_prob=0.1,
                             attention_probs_dropout_prob=0.1)


def build_model(s: FinetuneSettings, data: FinetuneData, init: dict | None) -> nn.Module:
    tcfg = _text_config(s, data.dims)
    if tcfg.vocab_size < int(data.dims["vocab_size"]):
        raise SettingsError(f"fastvl finetune: the BERT vocabulary ({tcfg.vocab_size}) is smaller than the data's "
                            f"({data.dims['vocab_size']} ids): the text must be tokenised with the BERT's vocabulary")
    o = s.options
    vcfg = ViolinConfig(vid_feat_size=int(data.dims["vfeat_dim"]), embed_size=tcfg.hidden_size,
                        hsize1=int(o.get("hsize1", 150)), hsize2=int(o.get("hsize2", 300)),
                        input_streams=tuple(o.get("input_streams", ("vid", "sub"))))
    model = ViolinBaseline(tcfg, vcfg)
    if s.resume and ckpt.latest_checkpoint(Path(s.output)) is not None:
        print(f"text encoder: from the run's checkpoint in {s.output} (--resume)")
    elif o.get("bert"):
        ignored = load_bert_state_dict(model.text_encoder, o["bert"])
        print(f"text encoder: the BERT weights of {o['bert']} (frozen; {len(ignored)} head / pooler tensors unused)")
    else:
        _small_text_encoder(model.text_encoder, s, data)
    model.freeze_text_encoder()
    if init is not None:
        state = init if any(k.startswith("violin.") for k in init) else {f"violin.{k}": v for k, v in init.items()}
        load_pretrained(model, state)
    return model


def _small_text_encoder(encoder: ViolinTextEncoder, s: FinetuneSettings, data: FinetuneData) -> None:
    steps = int(s.options.get("text_pretrain_steps", 400))
    train = data.sources["violin"]
    key = hashlib.sha256(json.dumps([encoder.config.to_dict(), steps, str(train.qdb.db_dir), len(train),
                                     data.dims["vocab_size"]], sort_keys=True).encode()).hexdigest()[:12]
    path = Path(s.options.get("cache_dir") or default_cache_dir()) / f"violin-text-encoder-{key}.pt"
    if path.is_file():
        encoder.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        print(f"text encoder: no BERT given (--opt bert=FILE); the small BERT (hidden {encoder.config.hidden_size}, "
              f"{encoder.config.num_hidden_layers} layers) pre-trained on this corpus by masked LM, from {path}, "
              "frozen")
        return
    print(f"text encoder: no BERT given (--opt bert=FILE); pre-training a small BERT (hidden "
          f"{encoder.config.hidden_size}, {encoder.config.num_hidden_layers} layers) by masked LM on the corpus text "
          f"({steps} steps), then freezing it")
    torch.manual_seed(s.seed)
    pretrain_text_encoder(encoder, train.texts(), int(data.dims["mask_id"]), tuple(data.dims["v_range"]),
                          steps=steps, seed=s.seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(encoder.state_dict(), tmp)
    tmp.replace(path)


def build_tasks(model: nn.Module, s: FinetuneSettings, data: FinetuneData) -> dict[str, nn.Module]:
    return {"violin": ViolinBaselineTask(model)}


def evaluate(tasks: dict[str, nn.Module], data: FinetuneData, device: torch.device, s: FinetuneSettings
             ) -> dict[str, float]:
    task = tasks["violin"]
    task.eval()
    acc = []
    for b in data.val.batches(s.val_batches):
        acc.append(task.evaluate({k: v.to(device) for k, v in b.items()})["accuracy"].cpu())
    task.train()
    return {"accuracy": float(torch.cat(acc).mean()) if acc else 0.0}


RECIPE = Recipe(name="violin", model="violin-baseline", build_data=build_data, build_model=build_model,
                build_tasks=build_tasks, evaluate=evaluate, metric="accuracy", chance=0.5,
                defaults=dict(steps=400, lr=1e-3, warmup_steps=40, weight_decay=1e-5, grad_clip=5.0, val_every=100,
                              ckpt_every=100, log_every=50, threads=1, dropout=0.1,
                              options=dict(hsize1=64, hsize2=128)),
                help="the VIOLIN baseline (BiLSTM + BiDAF over frozen BERT features), accuracy over both statements")
