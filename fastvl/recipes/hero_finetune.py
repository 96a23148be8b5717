"""HERO fine-tuning jobs: ``fastvl finetune --model hero --task tvr | videoqa | violin | tvc``.

Data: by default the synthetic video corpus (its train split for training, its val split for validation); or
``--data FOLDER`` holding ``video_db/``, ``sub_db/`` and ``<db>_train.db`` / ``<db>_val.db`` query dbs (db = tvr,
tvqa, violin or tvc, the corpus layout), or ``--opt video_db=... --opt sub_db=... --opt query_db=...
--opt val_query_db=...`` (official HERO dbs). Synthetic corpus knobs: ``--opt qa_events=N`` (TVQA questions / VIOLIN
pairs per video, 0 = one per event) and ``--opt train_videos=N`` (training videos; the validation split is the same
60 videos for every N); videoqa defaults to 0 and 300, violin to 0 and 1200, tvr and tvc to 2 and 300.
``--init`` takes a ``fastvl pretrain --model hero`` run folder (its config is then used), a ``fastvl finetune
--model hero`` run folder (VIOLIN starts from a videoqa run, below) or an official HERO checkpoint. Model: the tiny
HERO config unless ``--config`` names an official JSON (TVC needs a ``d_config`` block: the tiny config adds one).

Metrics (chance = the same metric of a model that ignores its input): tvr ``vcmr_r10_iou0.5`` (corpus moment
retrieval, chance from random scores on the validation queries) with VR / SVMR / VCMR R@1/5/10 at IoU 0.5 / 0.7
beside it; videoqa ``accuracy`` (5 answers: 0.2); violin ``accuracy`` (the majority label); tvc ``cider``
(CIDEr-D of greedy captions; chance = the most frequent training caption for every clip).

Measured on the shared 2-core CPU box (tiny HERO, defaults, ``--init`` a default ``fastvl pretrain --model hero``
run): tvr vcmr_r10_iou0.5 0.085 (chance 0.031; svmr_r1_iou0.7 0.36 vs 0.06), 8.8 min; tvc CIDEr 2.04 (chance
0.57), 8.0 min; videoqa accuracy 0.356 on 492 questions (chance 0.20), 12.8 min; violin (``--init`` that videoqa
run) accuracy 0.658 on 984 statements (chance 0.50), 21.3 min (both under load).

What makes QA and VIOLIN learn. The answer (statement) must be compared with the subtitles: "pick an answer that
occurs in the subtitles" gives 0.55 (wrong answers occur in the video 34-42% of the time), "every statement word
occurs in the subtitles" 0.825. At the start the answer moves the fused frames by ~1% of their norm. With a
200-frame batch budget (each video is copied per answer: 2-3 questions a batch) the QA loss stays at ln 5 = 1.609
for 1500 steps, from the pre-trained init or from scratch, at lr 5e-4 to 2e-3, with or without the span loss; with
1500 frames (~20 questions) it falls within a few hundred steps (a question per event of the 300 default videos,
constant lr 5e-4, dropout 0: 0.26 / 0.40 / 0.47 at 500 / 1000 / 2000 steps); with the decaying schedule of the
job, 0.356 (the default). ``--lr 1e-3 --opt train_videos=1200`` reaches 0.400, but that model transfers worse to
VIOLIN (0.553 instead of 0.658; one run each). VIOLIN's per-statement sigmoid has no per-question contrast to cancel
what differs between videos: from the pre-trained init it memorises its pairs (300 videos: train 0.78, val 0.52 at
1000 steps; 1200 videos: val 0.55), while from a videoqa run, which already compares answers with subtitles, it
generalises. The VIOLIN baseline, whose BiDAF compares statement and subtitles directly, reaches 0.83 on the same
data.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.video import WordVocab, build_video_task_data
from ..models.hero import HeroForTvc, HeroForVcmr, HeroForVideoQA, HeroForViolin, TvcGenerator, VideoModelConfig
from ..tasks.caption_metrics import caption_words, cider_d, corpus_bleu
from ..tasks.hero_finetune import HeroVcmrTask, HeroVideoQATask, HeroViolinTask, evaluate_vcmr, vcmr_chance
from .base import FinetuneData, FinetuneSettings, Recipe, SettingsError
from .hero_common import hero_config, load_hero_init, video_data_paths

__all__ = ["HeroTvcTask", "RECIPES", "TVC_RECIPE", "TVR_RECIPE", "VIDEOQA_RECIPE", "VIOLIN_RECIPE", "video_paths"]

_DB = {"tvr": "tvr", "videoqa": "tvqa", "violin": "violin", "tvc": "tvc"}


class _ConfigFile:
    """A HERO config the runner can write as the run's ``model_config.json``."""

    def __init__(self, cfg: VideoModelConfig):
        self.cfg = cfg

    def to_json_file(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.cfg.to_dict(), indent=2))


def video_paths(s: FinetuneSettings, task: str) -> dict[str, Any]:
    """Train / val query db, video db and subtitle db of a HERO-family job (see the module docstring)."""
    o, db = s.options, _DB[task]
    if o.get("video_db") or o.get("sub_db") or o.get("query_db"):
        missing = [k for k in ("video_db", "sub_db", "query_db") if not o.get(k)]
        if missing:
            raise SettingsError(f"fastvl finetune --model hero: give --opt {missing[0]}=PATH too (video_db, sub_db "
                                "and query_db together)")
        for k in ("video_db", "sub_db", "query_db", "val_query_db"):
            if o.get(k) and not Path(o[k]).exists():
                raise FileNotFoundError(f"fastvl finetune: --opt {k}={o[k]}: no such folder")
        return {"video_db": o["video_db"], "sub_db": o["sub_db"], "train": o["query_db"],
                "val": o.get("val_query_db"), "synthetic": False, "source": str(o["query_db"]), "vocab": o.get("vocab")}
    if s.data:
        root = Path(s.data)
        need = [root / "video_db", root / "sub_db", root / f"{db}_train.db"]
        for p in need:
            if not p.exists():
                raise FileNotFoundError(f"fastvl finetune: --data {root}: no {p.name} (expected video_db/, sub_db/, "
                                        f"{db}_train.db and optionally {db}_val.db)")
        val = root / f"{db}_val.db"
        return {"video_db": str(root / "video_db"), "sub_db": str(root / "sub_db"), "train": str(need[2]),
                "val": str(val) if val.exists() else None, "synthetic": False, "source": str(root),
                "vocab": o.get("vocab") or (str(root / "vocab.txt") if (root / "vocab.txt").is_file() else None)}
    p = video_data_paths(None, None, o.get("cache_dir"), o.get("qa_events"), o.get("train_videos"))
    corpus = p["corpus"]
    return {"video_db": p["video_db"], "sub_db": p["sub_db"], "train": str(corpus.query_db(db, "train")),
            "val": str(corpus.query_db(db, "val")), "synthetic": True,
            "source": f"synthetic video corpus ({corpus.root})", "vocab": str(corpus.vocab_file)}


def _build_data(task: str):
    def build(s: FinetuneSettings, rank: int, world: int) -> FinetuneData:
        p = video_paths(s, task)
        frames = int(s.options.get("max_frames", 200))
        kw = dict(max_frames=frames, max_txt_len=s.max_txt_len, skip_bad_examples=s.skip_bad_examples)
        try:
            train = build_video_task_data(task, p["video_db"], p["sub_db"], p["train"], seed=s.seed, rank=rank,
                                          world_size=world, train=True, **kw)
            val = (build_video_task_data(task, p["video_db"], p["sub_db"], p["val"], seed=0, train=False, **kw)
                   if p["val"] else None)
        except ValueError as e:
            if "max_frames" not in str(e) or isinstance(e, SettingsError):
                raise
            raise SettingsError(f"fastvl finetune --model hero --task {task}: --opt max_frames={frames}: "
                                f"{str(e).split(': ', 1)[-1]}") from None
        info = {"source": p["source"], "train_examples": len(train), "val_examples": len(val) if val else 0,
                "vocab_file": p["vocab"]}
        dims = {**train.dims, "synthetic": p["synthetic"]}
        if val is not None:
            dims["max_frm_seq_len"] = max(dims["max_frm_seq_len"], val.dims["max_frm_seq_len"])
        return FinetuneData(sources=train.sources, mix=train.mix, val=val, dims=dims, bad=train.bad, info=info)
    return build


def _config(s: FinetuneSettings, dims: dict[str, Any], task: str) -> VideoModelConfig:
    cfg = hero_config(s.config, int(dims["vocab_size"]), s.init)
    if task == "tvc" and cfg.d_config is None:
        raw = cfg.to_dict()
        raw["d_config"] = {**raw["f_config"], "num_hidden_layers": 2}
        cfg = VideoModelConfig(raw)
    return cfg


def _build_model(task: str):
    def build(s: FinetuneSettings, data: FinetuneData, init: dict | None) -> nn.Module:
        cfg = _config(s, data.dims, task)
        d, o = data.dims, s.options
        max_frm = max(int(d.get("max_frm_seq_len", 100)), 100)
        if task == "tvr":
            model: nn.Module = HeroForVcmr(cfg, d["vfeat_dim"], max_frm, lw_st_ed=float(o.get("lw_st_ed", 1.0)),
                                           lw_neg_ctx=float(o.get("lw_neg_ctx", 1.0)),
                                           lw_neg_q=float(o.get("lw_neg_q", 1.0)),
                                           drop_svmr_prob=float(o.get("drop_svmr_prob", 0.0)),
                                           margin=float(o.get("margin", 0.1)))
        elif task == "videoqa":
            model = HeroForVideoQA(cfg, d["vfeat_dim"], max_frm)
        elif task == "violin":
            model = HeroForViolin(cfg, d["vfeat_dim"], max_frm)
        else:
            model = HeroForTvc(cfg, d["vfeat_dim"], max_frm, lsr=float(o.get("lsr", 0.1)))
        load_hero_init(model, init)
        return model
    return build


def _build_tasks(task: str):
    def build(model: nn.Module, s: FinetuneSettings, data: FinetuneData) -> dict[str, nn.Module]:
        if task == "tvr":
            return {"tvr": HeroVcmrTask(model)}
        if task == "videoqa":
            return {"videoqa": HeroVideoQATask(model, lw_st_ed=float(s.options.get("qa_lw_st_ed", 0.4)))}
        if task == "violin":
            return {"violin": HeroViolinTask(model)}
        return {"tvc": HeroTvcTask(model)}
    return build


def _val_batches(data: FinetuneData, s: FinetuneSettings):
    for i, b in enumerate(data.val.batches()):
        if s.val_batches is not None and i >= s.val_batches:
            break
        yield b


def _accuracy_eval(tasks: dict[str, nn.Module], data: FinetuneData, device: torch.device, s: FinetuneSettings
                   ) -> dict[str, float]:
    task = next(iter(tasks.values()))
    task.eval()
    acc = [task.evaluate(b.to(device))["accuracy"].cpu() for b in _val_batches(data, s)]
    task.train()
    return {"accuracy": float(torch.cat(acc).mean()) if acc else 0.0}


def _tvr_eval(tasks, data: FinetuneData, device: torch.device, s: FinetuneSettings) -> dict[str, float]:
    model = tasks["tvr"].model
    was = model.training
    model.eval()
    out = evaluate_vcmr(model, _val_batches(data, s), device)
    model.train(was)
    return out


def _tvr_chance(data: FinetuneData) -> float:
    if data.val is None:
        return 0.0
    names, lens, gts = {}, [], []
    for b in data.val.batches():
        pos = []
        for i, v in enumerate(b["vids"]):
            if v not in names:
                names[v] = len(lens)
                lens.append(int(b["c_attn_masks"][i].sum()))
            pos.append(names[v])
        for q, v in enumerate(b["q_vidx"].tolist()):
            gts.append((pos[v], int(b["targets"][q, 0]), int(b["targets"][q, 1])))
    return vcmr_chance(lens, gts)["vcmr_r10_iou0.5"]


def _violin_chance(data: FinetuneData) -> float:
    if data.val is None:
        return 0.5
    t = torch.cat([b["targets"].reshape(-1) for b in data.val.batches()])
    return float(max((t == 1).float().mean(), (t == 0).float().mean()))


# ----------------------------------------------------------------------------------------------------------------
# TVC (captioning)
# ----------------------------------------------------------------------------------------------------------------
class HeroTvcTask(nn.Module):
    """TVC training (``HeroForTvc``): the label-smoothed token loss, mean over the target tokens (ignore -1)."""

    name = "tvc"

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, Any]) -> dict:
        loss = self.model(batch, compute_loss=True)
        n = (batch["cap_tgt_ids"] != -1).sum()
        loss = loss.sum() / n.clamp_min(1)
        return dict(loss=loss, logs={"tvc_loss": loss.detach()}, count=n)


def _words(ids: list[int], vocab: list[str] | None) -> list[str]:
    return [vocab[i] if vocab is not None and 0 <= i < len(vocab) else str(i) for i in ids]


def _tvc_eval(tasks, data: FinetuneData, device: torch.device, s: FinetuneSettings) -> dict[str, float]:
    model = tasks["tvc"].model
    was = model.training
    model.eval()
    dims = data.dims
    gen = TvcGenerator(model, int(s.options.get("max_gen_step", 20)), int(dims.get("cls_id", 0)),
                       int(dims.get("sep_id", 2)))
    beam = int(s.options.get("beam", 1))
    hyps, refs = [], []
    vocab = _vocab(data)
    for b in _val_batches(data, s):
        b = b.to(device)
        out = gen.beam_search(b, beam) if beam > 1 else gen.greedy_decode(b)
        hyps += [_words(ids, vocab) for ids in out]
        refs += [[caption_words(t)] for t in b["gts"]]
    model.train(was)
    bleu = corpus_bleu(hyps, refs)
    return {"cider": float(cider_d(hyps, refs)["cider"]), "bleu4": float(bleu.get("bleu4", bleu.get("bleu", 0.0)))}


def _vocab(data: FinetuneData) -> list[str] | None:
    """The id -> word table (``vocab_file``: the synthetic corpus' word list, ``--opt vocab=FILE`` or
    ``--data``/vocab.txt, one token per line), or None (generated ids are then compared as numbers)."""
    path = data.info.get("vocab_file")
    return WordVocab.from_file(path).tokens if path else None


def _tvc_chance(data: FinetuneData) -> float:
    if data.val is None:
        return 0.0
    refs = [[caption_words(t)] for b in data.val.batches() for t in b["gts"]]
    common = Counter(tuple(r[0]) for r in refs).most_common(1)[0][0]
    return float(cider_d([list(common)] * len(refs), refs)["cider"])


_COMMON = dict(steps=1200, lr=5e-4, warmup_steps=100, val_every=400, ckpt_every=400, log_every=50, threads=1,
               grad_clip=1.0)

TVR_RECIPE = Recipe(name="tvr", model="hero", build_data=_build_data("tvr"), build_model=_build_model("tvr"),
                    build_tasks=_build_tasks("tvr"), evaluate=_tvr_eval, metric="vcmr_r10_iou0.5",
                    chance=_tvr_chance, defaults=dict(_COMMON),
                    model_config=lambda s, dims: _ConfigFile(_config(s, dims, "tvr")),
                    help="moment retrieval (TVR): HeroForVcmr, VR / SVMR / VCMR R@k at IoU 0.5 / 0.7")
#: QA / VIOLIN learn the answer (statement) <-> subtitle comparison only from large batches (a 200-frame budget
#: holds 2-3 questions: the QA loss then stays at ln 5) and many examples (a question / statement pair per event;
#: VIOLIN on 1200 synthetic training videos), without dropout. See the module docstring for the measurements.
_QA_COMMON = dict(_COMMON, steps=2000, val_every=500, ckpt_every=500, dropout=0.0,
                  options={"max_frames": 1500, "qa_events": 0})

VIDEOQA_RECIPE = Recipe(name="videoqa", model="hero", build_data=_build_data("videoqa"),
                        build_model=_build_model("videoqa"), build_tasks=_build_tasks("videoqa"),
                        evaluate=_accuracy_eval, metric="accuracy", chance=0.2,
                        defaults=dict(_QA_COMMON),
                        model_config=lambda s, dims: _ConfigFile(_config(s, dims, "videoqa")),
                        help="video QA (TVQA): 5-way CE + 0.4 x span loss, accuracy")
VIOLIN_RECIPE = Recipe(name="violin", model="hero", build_data=_build_data("violin"),
                       build_model=_build_model("violin"), build_tasks=_build_tasks("violin"),
                       evaluate=_accuracy_eval, metric="accuracy", chance=_violin_chance,
                       defaults=dict(_QA_COMMON, options={**_QA_COMMON["options"], "train_videos": 1200}),
                       model_config=lambda s, dims: _ConfigFile(_config(s, dims, "violin")),
                       help="VIOLIN with HERO: sigmoid over (video, statement), accuracy")
TVC_RECIPE = Recipe(name="tvc", model="hero", build_data=_build_data("tvc"), build_model=_build_model("tvc"),
                    build_tasks=_build_tasks("tvc"), evaluate=_tvc_eval, metric="cider", chance=_tvc_chance,
                    defaults=dict(_COMMON), model_config=lambda s, dims: _ConfigFile(_config(s, dims, "tvc")),
                    help="video captioning (TVC): 2-layer decoder, label smoothing 0.1, greedy (beam: --opt beam=4)")

RECIPES = (TVR_RECIPE, VIDEOQA_RECIPE, VIOLIN_RECIPE, TVC_RECIPE)
