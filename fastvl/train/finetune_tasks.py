"""The built-in UNITER fine-tuning tasks, registered with :func:`fastvl.train.finetune.register_finetune_task`.

=========  =====================================  =====================================  ======================
task       model (``fastvl.models.uniter``)       data (``fastvl.data.finetune_data``)   metric (chance)
=========  =====================================  =====================================  ======================
vqa, gqa   UniterForVisualQuestionAnswering       VQADataset (+ ans2label.json)          VQA soft accuracy
                                                                                         (question-only prior)
ve         UniterForVisualEntailment              VQADataset, 3 labels                   accuracy (majority)
nlvr2      UniterForNlvr2Paired / Triplet /       NLVR2Dataset                           accuracy (majority)
           PairedAttn (``--opt variant=``)
itr        UniterForImageTextRetrieval            ITRDataset                             IR R@1 over the val
                                                                                         text x image matrix
                                                                                         (100 / n_images)
re         UniterForReferringExpression...        REDataset                              accuracy, IoU >= 0.5
                                                                                         (mean 1 / regions)
vcr        UniterForVisualCommonsenseReasoning    VCRDataset, Q->A and QA->R mixed 1:1   Q->AR (1/16); also
                                                                                         Q->A, QA->R
=========  =====================================  =====================================  ======================

Data: ``--data DIR`` (``txt_db/*.db`` + ``img_db/<name>/``, validation txt_dbs named ``*val*``), or
``--txt-db`` / ``--img-db`` / ``--val-txt-db`` / ``--val-img-db``; nothing: the synthetic data of the task
(:func:`fastvl.data.finetune_synthetic.finetune_synthetic`). Task options (``--opt key=value``): ``ans2label``
(vqa / gqa / ve: answer vocabulary file), ``variant`` (nlvr2: paired | triplet | paired-attn), ``num_neg``,
``margin``, ``eval_images``, ``hard_neg`` (itr: true = in-batch hard negatives), ``loss`` (cls | rank), ``mlp``
(re), ``special_tokens`` (vcr, official 81), ``stages`` (vcr: the trained stages, ``qa,qar``),
``synthetic_images`` / ``synthetic_val_images`` (images of the synthetic data's splits).

After loading pre-trained weights each model is prepared as the official scripts do: NLVR2 grows the type table
to 3 rows, VCR to 4 rows plus ``special_tokens`` word rows, retrieval copies the ITM "match" row into its rank head.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data.errors import BadExampleCounter, DataError
from ..data.finetune_data import (
    FinetuneBatchSource,
    FinetuneDataset,
    ITRDataset,
    NLVR2Dataset,
    REDataset,
    VCRDataset,
    VQADataset,
)
from ..data.finetune_synthetic import FinetuneSynthConfig, finetune_synthetic
from ..data.layout import find_dbs
from ..models import uniter as U
from ..tasks.finetune import ITRTask, NLVR2Task, RETask, VCRTask, VQATask
from .finetune import (
    FinetuneData,
    FinetuneSettings,
    FinetuneTaskSpec,
    load_pretrained,
    model_config,
    register_finetune_task,
)

VE_ANSWERS = {"contradiction": 0, "entailment": 1, "neutral": 2}
NLVR2_MODELS = {"paired": U.UniterForNlvr2Paired, "triplet": U.UniterForNlvr2Triplet,
                "paired-attn": U.UniterForNlvr2PairedAttn}


# ----------------------------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------------------------
def _paths(s: FinetuneSettings, task: str) -> dict[str, Any]:
    """train / val txt_db and img_db paths of a run, and whether they are the synthetic data."""
    if s.txt_db:
        if len(s.txt_db) != len(s.img_db):
            raise ValueError(f"fastvl finetune: --txt-db has {len(s.txt_db)} paths but --img-db has {len(s.img_db)}")
        val_img = s.val_img_db or (s.img_db[:1] * len(s.val_txt_db))
        return dict(train_txt=list(s.txt_db), train_img=list(s.img_db), val_txt=list(s.val_txt_db),
                    val_img=list(val_img), synthetic=False, source=str(s.txt_db), root=None)
    if s.data:
        lay = find_dbs(s.data)
        return dict(train_txt=lay.train_txt, train_img=lay.train_img, val_txt=lay.val_txt, val_img=lay.val_img,
                    synthetic=False, source=str(s.data), root=Path(s.data))
    syn = finetune_synthetic(config=FinetuneSynthConfig(
        n_train_images=int(s.options.get("synthetic_images", FinetuneSynthConfig.n_train_images)),
        n_val_images=int(s.options.get("synthetic_val_images", FinetuneSynthConfig.n_val_images))))
    val_txt, val_img = [syn.txt_db(task, "val")], [syn.img_db]
    if s.val_txt_db:  # other validation data for a model trained on the synthetic data
        val_txt, val_img = list(s.val_txt_db), list(s.val_img_db or [syn.img_db] * len(s.val_txt_db))
    return dict(train_txt=[syn.txt_db(task, "train")], train_img=[syn.img_db], val_txt=val_txt, val_img=val_img,
                synthetic=True, source=f"synthetic ({syn.root})", root=syn.root / task, syn=syn)


def _bundle(s: FinetuneSettings, paths: dict, train: dict[str, FinetuneDataset], val: dict[str, FinetuneDataset],
            rank: int, world: int, counter: BadExampleCounter, **dims) -> FinetuneData:
    sources = {k: FinetuneBatchSource(d, s.batch_tokens, seed=s.seed + j, train=True, rank=rank, world_size=world)
               for j, (k, d) in enumerate(train.items())}
    val_src = {k: FinetuneBatchSource(d, s.batch_tokens, seed=0, train=False) for k, d in val.items()}
    first = next(iter(train.values()))
    info = {"source": paths["source"], "train_examples": {k: len(d) for k, d in train.items()},
            "val_examples": {k: len(d) for k, d in val.items()}}
    return FinetuneData(sources=sources, mix={k: 1.0 for k in sources}, val=val_src or None,
                        dims={"img_dim": first.img_dim, "vocab_size": first.vocab_size,
                              "synthetic": paths["synthetic"], **dims}, bad=counter, info=info)


def _open(cls, s: FinetuneSettings, paths: dict, counter: BadExampleCounter, **kw) -> tuple[FinetuneDataset, ...]:
    common = dict(max_txt_len=s.max_txt_len, skip_bad_examples=s.skip_bad_examples, counter=counter, **kw)
    train = cls(paths["train_txt"], paths["train_img"], **common)
    val = cls(paths["val_txt"], paths["val_img"], **common) if paths["val_txt"] else None
    return train, val


def _vqa_data(task: str):
    def build(s: FinetuneSettings, rank: int, world: int) -> FinetuneData:
        paths = _paths(s, task)
        ans = s.options.get("ans2label")
        if ans is None and paths["synthetic"]:
            ans = paths["syn"].ans2label(task)
        if ans is None and task == "ve":
            first = Path(paths["train_txt"][0])
            ans = next((p for p in (first / "ans2label.json", first.parent / "ans2label.json") if p.is_file()),
                       dict(VE_ANSWERS))
        counter = BadExampleCounter()
        train, val = _open(VQADataset, s, paths, counter, ans2label=ans)
        for d in (train, val):
            if d is not None:
                d.task = task
        if task == "ve" and train.num_answers != 3:
            raise ValueError(f"fastvl finetune ve: the answer vocabulary has {train.num_answers} entries; SNLI-VE "
                             "needs 3 (contradiction, entailment, neutral)")
        return _bundle(s, paths, {task: train}, {task: val} if val else {}, rank, world, counter,
                       num_answers=train.num_answers)

    return build


def _nlvr2_data(s, rank, world):
    paths = _paths(s, "nlvr2")
    counter = BadExampleCounter()
    train, val = _open(NLVR2Dataset, s, paths, counter, variant=_variant(s))
    return _bundle(s, paths, {"nlvr2": train}, {"nlvr2": val} if val else {}, rank, world, counter)


def _itr_data(s, rank, world):
    paths = _paths(s, "itr")
    counter = BadExampleCounter()
    train, val = _open(ITRDataset, s, paths, counter)
    data = _bundle(s, paths, {"itr": train}, {"itr": val} if val else {}, rank, world, counter)
    data.info["eval_images"] = int(s.options.get("eval_images", 100))
    return data


def _re_data(s, rank, world):
    paths = _paths(s, "re")
    counter = BadExampleCounter()
    train, val = _open(REDataset, s, paths, counter)
    return _bundle(s, paths, {"re": train}, {"re": val} if val else {}, rank, world, counter)


def _vcr_data(s, rank, world):
    paths = _paths(s, "vcr")
    counter = BadExampleCounter()
    special = int(s.options.get("special_tokens", 81))
    stages = [x.strip() for x in str(s.options.get("stages", "qa,qar")).split(",") if x.strip()]
    if not stages or set(stages) - {"qa", "qar"}:
        raise ValueError(f"fastvl finetune vcr: --opt stages must list qa and/or qar, got {s.options['stages']!r}")
    train, val = {}, {}
    for stage in ("qa", "qar"):
        t, v = _open(VCRDataset, s, paths, counter, stage=stage, special_tokens=special)
        if stage in stages:
            train[f"vcr_{stage}"] = t
        if v is not None:  # both stages are evaluated (Q->AR needs both)
            val[f"vcr_{stage}"] = v
    return _bundle(s, paths, train, val, rank, world, counter, special_tokens=special)


# ----------------------------------------------------------------------------------------------------------------
# models and task modules
# ----------------------------------------------------------------------------------------------------------------
def _variant(s: FinetuneSettings) -> str:
    v = str(s.options.get("variant", "paired"))
    if v not in NLVR2_MODELS:
        raise ValueError(f"fastvl finetune nlvr2: --opt variant must be one of {sorted(NLVR2_MODELS)}, got {v!r}")
    return v


def _model(cls, s: FinetuneSettings, data: FinetuneData, init: dict | None, *args, **kw) -> nn.Module:
    cfg = model_config(s, data.dims)
    model = cls(cfg, cfg.img_dim, *args, **kw)
    load_pretrained(model, init)
    return model


def _vqa_model(s, data, init):
    if s.task == "ve":
        return _model(U.UniterForVisualEntailment, s, data, init)
    return _model(U.UniterForVisualQuestionAnswering, s, data, init, data.dims["num_answers"])


def _nlvr2_model(s, data, init):
    model = _model(NLVR2_MODELS[_variant(s)], s, data, init)
    model.init_type_embedding()
    return model


def _itr_model(s, data, init):
    model = _model(U.UniterForImageTextRetrieval, s, data, init, margin=float(s.options.get("margin", 0.2)))
    if init is not None and "itm_output.weight" in init:
        model.init_output()
    return model


def _re_model(s, data, init):
    return _model(U.UniterForReferringExpressionComprehension, s, data, init, loss=str(s.options.get("loss", "cls")),
                  margin=float(s.options.get("margin", 0.2)), mlp=int(s.options.get("mlp", 2)))


def _vcr_model(s, data, init):
    model = _model(U.UniterForVisualCommonsenseReasoning, s, data, init)
    model.init_type_embedding()
    if data.dims.get("special_tokens", 81):
        model.init_word_embedding(int(data.dims.get("special_tokens", 81)))
    return model


def _single(cls, **kw):
    def build(model, s, data):
        task = cls(model, **kw)
        name = next(iter(data.sources))
        task.name = name if cls is VQATask else task.name
        return {name: task}

    return build


def _itr_tasks(model, s, data):
    return {"itr": ITRTask(model, num_neg=int(s.options.get("num_neg", 1)), hard_neg=s.options.get("hard_neg", False))}


def _vcr_tasks(model, s, data):
    task = VCRTask(model)
    return {k: task for k in {*data.sources, *(data.val or {})}}


# ----------------------------------------------------------------------------------------------------------------
# evaluation
# ----------------------------------------------------------------------------------------------------------------
def _val_batches(data: FinetuneData, key: str, s: FinetuneSettings):
    return data.val[key].iter_epoch(0, s.val_batches)


def _mean(values: list[torch.Tensor]) -> float:
    return float(torch.cat(values).float().mean()) if values else 0.0


def _vqa_eval(tasks, data, device, s):
    key = next(iter(data.val))
    task = tasks[key]
    scores = [task.evaluate(b.to(device))["score"].cpu() for b in _val_batches(data, key, s)]
    return {"accuracy": _mean(scores)}


def _vqa_chance(data: FinetuneData, max_train: int = 50_000) -> float:
    """The VQA score of a model that reads only the question: for each question text (token ids) the answer with
    the highest summed score over the training split (the first ``max_train`` questions), the most frequent answer
    for questions never seen in training; scored on the validation split."""
    if not data.val:
        return 0.0
    key = next(iter(data.val))
    train: VQADataset = data.sources[key].dataset
    per_q: dict[tuple, np.ndarray] = {}
    total = np.zeros(train.num_answers, np.float64)
    for i in range(min(len(train), max_train)):
        try:
            e = train.example(i)
        except DataError:
            continue
        q = tuple(e.rows[0].input_ids.tolist())
        per_q[q] = per_q.get(q, 0) + e.target
        total += e.target
    best = {q: int(np.argmax(v)) for q, v in per_q.items()}
    fallback = int(np.argmax(total))
    got, n = 0.0, 0
    for b in data.val[key].iter_epoch(0):
        for k, q in enumerate(b.input_ids.split(b.txt_lens)):
            got += float(b.extras["targets"][k, best.get(tuple(q.tolist()), fallback)])
            n += 1
    return got / max(n, 1)


def _acc_eval(tasks, data, device, s):
    key = next(iter(data.val))
    return {"accuracy": _mean([tasks[key].evaluate(b.to(device))["accuracy"].cpu()
                               for b in _val_batches(data, key, s)])}


def _majority_chance(data):
    if not data.val:
        return 0.0
    key = next(iter(data.val))
    t = torch.cat([b.extras["targets"] for b in data.val[key].iter_epoch(0)])
    t = t.argmax(1) if t.dim() == 2 else t  # SNLI-VE: soft targets [n, 3]
    return float(torch.bincount(t).max()) / max(t.numel(), 1)


def _itr_eval(tasks, data, device, s):
    """IR / TR recall over the validation text x image matrix (the first ``eval_images`` images and their texts),
    exact: every pair cross-encoded by :func:`fastvl.tasks.retrieval.evaluate_retrieval` (embeddings once, pairs
    packed). ``--opt rerank_k=K`` adds the approximate two-stage figures under ``itr2s_*`` keys."""
    from ..tasks.retrieval import evaluate_retrieval, split_batch

    ds: ITRDataset = data.val["itr"].dataset
    keep, _ = _itr_subset(ds, int(s.options.get("eval_images", 100)))
    batch = ds.make_batch(keep)
    if batch is None:
        return {}
    texts, images, txt2img = split_batch(batch, batch.extras["img_fnames"])
    model = tasks["itr"].model
    amp = "bf16" if device.type == "cuda" else None
    res = evaluate_retrieval(model, texts, images, txt2img, mode="exact", amp=amp, progress=False)
    out = {k: float(v) for k, v in res.items() if k.startswith(("ir_", "tr_", "r_"))}
    out["n_images"] = float(len(images))
    if "rerank_k" in s.options:
        two = evaluate_retrieval(model, texts, images, txt2img, mode="two_stage", k=int(s.options["rerank_k"]),
                                 amp=amp, progress=False)
        out.update({f"itr2s_{k}": float(v) for k, v in two.items() if k.startswith(("ir_", "tr_", "r_"))})
    return out


def _itr_subset(ds: ITRDataset, n_images: int) -> tuple[list[int], list[str]]:
    images: list[str] = []
    keep = []
    for i, (p, id_) in enumerate(ds.items):
        name = f"{p}/{ds.pairs[p][0].txt2img.get(id_)}"
        if name not in images:
            if len(images) >= n_images:
                continue
            images.append(name)
        keep.append(i)
    return keep, images


def _itr_chance(data):
    if not data.val:
        return 0.0
    n = len(_itr_subset(data.val["itr"].dataset, 10**9)[1])
    return 100.0 / max(1, min(n, int(data.info["eval_images"])))


def _re_chance(data):
    """Accuracy of picking a region at random: the mean of 1 / regions over the validation examples."""
    if not data.val:
        return 0.0
    ds: REDataset = data.val["re"].dataset
    return sum(1.0 / ds.n_regions[item] for item in ds.items) / max(len(ds), 1)


def _vcr_eval(tasks, data, device, s):
    right: dict[str, dict[str, float]] = {}
    for key in ("vcr_qa", "vcr_qar"):
        if key not in data.val:
            continue
        for b in _val_batches(data, key, s):
            acc = tasks[key].evaluate(b.to(device))["accuracy"].cpu()
            right.setdefault(key, {}).update(zip(b.extras["ids"], acc.tolist()))
    qa, qar = right.get("vcr_qa", {}), right.get("vcr_qar", {})
    both = [qa[k] * qar[k] for k in qa if k in qar]
    out = {"q2a": sum(qa.values()) / max(len(qa), 1), "qa2r": sum(qar.values()) / max(len(qar), 1)}
    out["q2ar"] = sum(both) / max(len(both), 1)
    return out


# ----------------------------------------------------------------------------------------------------------------
# registration
# ----------------------------------------------------------------------------------------------------------------
_COMMON = dict(steps=1500, lr=1e-3, warmup_steps=100, batch_tokens=1024, val_every=500, ckpt_every=500)
# Defaults: UNITER-tiny on the synthetic data, a few CPU minutes each from a short `fastvl pretrain` checkpoint;
# question answering (vqa, gqa, vcr's Q->A) needs longer to ground its questions than the statement tasks.
_DEFAULTS = {"vqa": dict(_COMMON, steps=8000, val_every=1000, ckpt_every=1000),
             "gqa": dict(_COMMON, steps=4000, val_every=1000, ckpt_every=1000),
             "ve": dict(_COMMON), "nlvr2": dict(_COMMON, steps=3000), "re": dict(_COMMON),
             "itr": dict(_COMMON, val_every=0),  # the exact val matrix is the slow part: evaluate at the end only
             "vcr": dict(_COMMON, steps=4000, val_every=1000, ckpt_every=1000)}

for _name, _help in (("vqa", "VQA (soft-score BCE, VQA accuracy)"),
                     ("gqa", "GQA (relational questions; VQA head and metric)"),
                     ("ve", "SNLI-VE visual entailment (3-way)")):
    register_finetune_task(FinetuneTaskSpec(
        name=_name, build_data=_vqa_data(_name), build_model=_vqa_model, build_tasks=_single(VQATask),
        evaluate=_vqa_eval, metric="accuracy", chance=_vqa_chance if _name != "ve" else _majority_chance,
        defaults=_DEFAULTS[_name], help=_help))

register_finetune_task(FinetuneTaskSpec(
    name="nlvr2", build_data=_nlvr2_data, build_model=_nlvr2_model, build_tasks=_single(NLVR2Task),
    evaluate=_acc_eval, metric="accuracy", chance=_majority_chance, defaults=_DEFAULTS["nlvr2"],
    help="NLVR2 (two images, true/false; --opt variant=paired|triplet|paired-attn)"))

register_finetune_task(FinetuneTaskSpec(
    name="itr", build_data=_itr_data, build_model=_itr_model, build_tasks=_itr_tasks, evaluate=_itr_eval,
    metric="ir_r1", chance=_itr_chance, defaults=_DEFAULTS["itr"],
    help="image-text retrieval (hinge on in-batch negatives; IR/TR R@1/5/10)"))

register_finetune_task(FinetuneTaskSpec(
    name="re", build_data=_re_data, build_model=_re_model, build_tasks=_single(RETask), evaluate=_acc_eval,
    metric="accuracy", chance=_re_chance, defaults=_DEFAULTS["re"],
    help="referring expressions (region CE; accuracy at IoU >= 0.5)"))

register_finetune_task(FinetuneTaskSpec(
    name="vcr", build_data=_vcr_data, build_model=_vcr_model, build_tasks=_vcr_tasks, evaluate=_vcr_eval,
    metric="q2ar", chance=1 / 16, defaults=_DEFAULTS["vcr"],
    help="VCR (Q->A and QA->R mixed; Q->A, QA->R, Q->AR accuracy)"))

__all__: list[str] = []
