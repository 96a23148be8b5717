"""LXMERT pre-training end to end: settings -> data -> LxmertForPreTraining -> LXMERT tasks -> the shared Trainer.

``fastvl pretrain --model lxmert`` with no other argument trains a tiny LXMERT on the synthetic corpus: MLM, masked
object feature regression (mrfr) and classification (mrc, the detector's soft labels), image-text matching (itm) on
the pre-training corpus, and QA on the synthetic VQA questions (same world, same vocabulary and features). The run
folder holds ``checkpoints/step_*`` (atomic, resumable), ``model_config.json`` (an LXMERT config.json,
``model_type: lxmert``), ``settings.json`` and ``metrics.jsonl``; :func:`load_lxmert_run` loads it back.
With ``adv`` set, every task runs under VILLA's generic K-step loop (:mod:`fastvl.adversarial`) through its
:class:`~fastvl.tasks.lxmert.LxmertView`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from ..adversarial import AdvConfig, adversarial_tasks
from ..data import BadExampleCounter, PretrainData, build_pretrain_data, parse_tasks, synthetic_corpus
from ..data.finetune_data import FinetuneBatchSource, VQADataset
from ..data.finetune_synthetic import FinetuneSynthConfig, finetune_synthetic
from ..data.synthetic import SyntheticConfig
from ..models.lxmert import (
    LxmertConfig,
    LxmertForPreTraining,
    load_lxmert_state,
    read_state_file,
    resolve_lxmert_config,
)
from ..tasks.lxmert import LXMERT_TASKS, lxmert_tasks
from ..train import checkpoint as ckpt
from ..train import distributed as D
from ..train.loop import TrainConfig, Trainer
from .base import SettingsError, last_losses

__all__ = ["LXMERT_DEFAULTS", "LxmertPretrainSettings", "build_lxmert", "chance_lxmert", "evaluate_lxmert",
           "load_lxmert_run", "lxmert_pretrain", "parse_lxmert_tasks"]

#: The CPU default: a tiny LXMERT (2 language, 1 object-relationship, 2 cross layers, H 128), a few minutes here.
LXMERT_DEFAULTS = dict(steps=1200, lr=1e-3, warmup_steps=100, batch_tokens=512, grad_accum=1, val_every=400,
                       ckpt_every=400, log_every=50, threads=1)


@dataclass
class LxmertPretrainSettings:
    config: str = "tiny"  # tiny | base | path to an LXMERT config.json
    output: str = "runs/pretrain-lxmert"
    tasks: str = "itm:2,mlm:2,mrc:1,mrfr:1,qa:1"
    steps: int | None = None
    lr: float | None = None
    warmup_steps: int | None = None
    batch_tokens: int | None = None
    grad_accum: int | None = None
    grad_clip: float = 5.0
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.98)
    seed: int = 42
    mask_prob: float = 0.15
    itm_neg_prob: float = 0.5
    max_txt_len: int = 60
    val_every: int | None = None
    ckpt_every: int | None = None
    log_every: int | None = None
    val_batches: int = 20
    precision: str = "auto"
    device: str = "auto"
    resume: bool = False
    init_checkpoint: str | None = None
    progress: bool = True
    adv: dict | None = None  # VILLA: AdvConfig fields (None = off)
    threads: int | None = None
    # images of the synthetic corpora (pre-training and QA), train / validation; None: the corpora's defaults
    synthetic_images: int | None = None
    synthetic_val_images: int | None = None

    def resolved(self) -> LxmertPretrainSettings:
        """Unset values filled from :data:`LXMERT_DEFAULTS`."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        for k, v in LXMERT_DEFAULTS.items():
            if values.get(k) is None:
                values[k] = v
        return LxmertPretrainSettings(**values)


def parse_lxmert_tasks(text: str) -> dict[str, float]:
    """``"itm:2,mlm:2,mrc:1,mrfr:1,qa:1"`` -> {task: ratio}; names from ``LXMERT_TASKS``."""
    out: dict[str, float] = {}
    for part in str(text).split(","):
        name, _, ratio = part.strip().partition(":")
        name = name.strip()
        if name not in LXMERT_TASKS:
            raise SettingsError(f"LXMERT pre-training: unknown task {name!r}; expected some of {list(LXMERT_TASKS)}")
        try:
            out[name] = float(ratio) if ratio else 1.0
        except ValueError:
            raise SettingsError(f"LXMERT pre-training: task {name!r} has ratio {ratio!r}, not a number") from None
    if any(r < 0 for r in out.values()) or sum(out.values()) <= 0:
        raise SettingsError(f"LXMERT pre-training: ratios must be >= 0 with a positive sum, got {out}")
    return {k: v for k, v in out.items() if v > 0}


# ----------------------------------------------------------------------------------------------------------------
def _sizes(s: LxmertPretrainSettings) -> dict[str, int]:
    out = {}
    if s.synthetic_images is not None:
        out["n_train_images"] = s.synthetic_images
    if s.synthetic_val_images is not None:
        out["n_val_images"] = s.synthetic_val_images
    return out


def _qa_data(s: LxmertPretrainSettings, rank: int, world: int, train: bool):
    syn = finetune_synthetic(config=FinetuneSynthConfig(**_sizes(s))) if _sizes(s) else finetune_synthetic()
    ans = syn.ans2label("vqa")
    split = "train" if train else "val"
    ds = VQADataset([syn.txt_db("vqa", split)], [syn.img_db], max_txt_len=s.max_txt_len, counter=BadExampleCounter(),
                    ans2label=ans)
    src = FinetuneBatchSource(ds, s.batch_tokens, seed=s.seed + 7, train=train, rank=rank, world_size=world)
    return src, ds.num_answers, ds.vocab_size


def _data(s: LxmertPretrainSettings, mix: dict[str, float], rank: int, world: int) -> dict:
    """Training sources, validation data and the sizes the model needs."""
    corpus = synthetic_corpus(config=SyntheticConfig(**_sizes(s))) if _sizes(s) else synthetic_corpus()
    common = dict(max_tokens=s.batch_tokens, seed=s.seed, mask_prob=s.mask_prob, itm_neg_prob=s.itm_neg_prob,
                  max_txt_len=s.max_txt_len)
    corpus_tasks = {k: v for k, v in mix.items() if k != "qa"}
    sources, dims = {}, {"vocab_size": corpus.vocab_size, "img_dim": corpus.img_dim,
                         "img_label_dim": corpus.img_label_dim, "num_answers": None}
    train = val = None
    if corpus_tasks:
        train = build_pretrain_data(corpus.txt_train, corpus.img_db, parse_tasks(corpus_tasks), rank=rank,
                                    world_size=world, train=True, **common)
        sources.update(train.sources)
        dims.update({k: v for k, v in train.dims.items() if v is not None})
        val = build_pretrain_data(corpus.txt_val, corpus.img_db, {"itm": 1, "mrc": 1, "mlm-words": 1}, train=False,
                                  eval_word_ids=corpus.content_token_ids, **common)
    qa_val = None
    if "qa" in mix:
        sources["qa"], dims["num_answers"], vocab = _qa_data(s, rank, world, True)
        dims["vocab_size"] = max(dims["vocab_size"], vocab)
        qa_val = _qa_data(s, 0, 1, False)[0]
    return dict(sources=sources, val=val, qa_val=qa_val, dims=dims, bad=train.bad if train is not None else None)


def build_lxmert(s: LxmertPretrainSettings, dims: dict, log=print) -> LxmertForPreTraining:
    """The model of a run: the config (size name or config.json) with the data's sizes; ``init_checkpoint`` loaded
    (an LXMERT state dict; another family's checkpoint is refused naming it)."""
    over = {"vocab_size": dims["vocab_size"], "visual_feat_dim": dims["img_dim"]}
    if dims.get("img_label_dim"):
        over["num_object_labels"] = dims["img_label_dim"]
    if dims.get("num_answers"):
        over["num_qa_labels"] = dims["num_answers"]
    cfg = resolve_lxmert_config(s.config)
    cfg = cfg.replace(**over)
    model = LxmertForPreTraining(cfg)
    if s.init_checkpoint:
        state = read_state_file(s.init_checkpoint)
        missing, unexpected = load_lxmert_state(model, state, source=f"--init-checkpoint {s.init_checkpoint}",
                                                strict=False)
        log(f"init from {s.init_checkpoint}: {len(missing)} missing, {len(unexpected)} unexpected keys")
    return model


@torch.no_grad()
def evaluate_lxmert(model: LxmertForPreTraining, val: PretrainData | None, qa_val, device: torch.device,
                    max_batches: int = 20) -> dict[str, float]:
    """Validation: ITM accuracy, MLM accuracy on object / colour / size words (``mlm_words_acc``), masked-object
    classification accuracy (``mrc_acc``: argmax vs the detector's top class, on 15% masked regions), QA accuracy
    (``qa_acc``: argmax vs the top-scored answer)."""
    was = model.training
    model.eval()
    hits = {k: [0, 0] for k in ("itm", "mlm_words", "mrc", "qa")}
    sources = [(t, val.batches(t)) for t in (val.mix if val is not None else [])]
    if qa_val is not None:
        sources.append(("qa", qa_val.iter_epoch(0, max_batches)))
    for task, batches in sources:
        for k, batch in enumerate(batches):
            if k >= max_batches:
                break
            batch = batch.to(device)
            if task == "mrc":  # the eval split's mrc batches mask regions: classify them
                out = model.forward_packed(batch)
                rows = batch.img_masks.bool()
                pred = model.obj_predict_head(out.vision_output[rows], ("obj",))["obj"].argmax(-1)
                target = batch.soft_labels.argmax(-1)
            else:
                out = model.forward_packed(batch)
                if task == "itm":
                    pred, target = model.cls.seq_relationship(out.pooled_output).argmax(-1), batch.itm_targets
                elif task == "qa":
                    pred, target = model.answer_scores(out.pooled_output).argmax(-1), batch.targets.argmax(-1)
                else:
                    sel = batch.txt_labels != -1
                    pred = model.cls.predictions(out.language_output[sel]).argmax(-1)
                    target = batch.txt_labels[sel]
            key = "mlm_words" if task in ("mlm", "mlm-words") else task
            hits[key][0] += int((pred == target).sum())
            hits[key][1] += int(target.numel())
    model.train(was)
    return {f"{k}_acc": h / n for k, (h, n) in hits.items() if n}


def chance_lxmert(val: PretrainData | None, qa_val, max_batches: int = 20) -> dict[str, float]:
    """The majority-class baseline of every validation metric of :func:`evaluate_lxmert` (same batches): the share
    of the most frequent target (ITM label, masked word, detector top class, top answer)."""
    counts: dict[str, dict[int, int]] = {k: {} for k in ("itm", "mlm_words", "mrc", "qa")}
    sources = [(t, val.batches(t)) for t in (val.mix if val is not None else [])]
    if qa_val is not None:
        sources.append(("qa", qa_val.iter_epoch(0, max_batches)))
    for task, batches in sources:
        for k, batch in enumerate(batches):
            if k >= max_batches:
                break
            if task == "itm":
                target = batch.itm_targets
            elif task == "qa":
                target = batch.targets.argmax(-1)
            elif task == "mrc":
                target = batch.soft_labels.argmax(-1)
            else:
                target = batch.txt_labels[batch.txt_labels != -1]
            c = counts["mlm_words" if task in ("mlm", "mlm-words") else task]
            for t in target.tolist():
                c[t] = c.get(t, 0) + 1
    return {f"{k}_acc": max(c.values()) / sum(c.values()) for k, c in counts.items() if c}


def lxmert_pretrain(settings: LxmertPretrainSettings, log=print) -> dict:
    """Run LXMERT pre-training; returns {'history', 'validation', 'checkpoint', 'tokens_per_s', 'seconds'}."""
    s = settings.resolved()
    mix = parse_lxmert_tasks(s.tasks)
    info = D.init_distributed(s.device)
    threads = D.set_cpu_threads(s.threads, info.device)
    torch.manual_seed(s.seed)
    data = _data(s, mix, info.rank, info.world_size)
    model = build_lxmert(s, data["dims"], log)
    if info.is_main:
        c = model.config
        log(f"fastvl pretrain --model lxmert: {s.config} (H {c.hidden_size}, {c.l_layers} language / {c.r_layers} "
            f"object-relationship / {c.x_layers} cross layers, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
            f"parameters), synthetic corpus, tasks {mix}, {s.steps} steps, {info.world_size} process(es) on "
            f"{info.device}" + (f" ({threads} thread(s) each)" if threads else ""))
    tasks = lxmert_tasks(model, tuple(mix))
    if s.adv is not None:
        adv_cfg = AdvConfig(**s.adv)
        tasks = adversarial_tasks(tasks, adv_cfg)
        if info.is_main:
            log(f"adversarial pre-training (VILLA): {adv_cfg}")
    cfg = TrainConfig(steps=s.steps, lr=s.lr, warmup_steps=s.warmup_steps, weight_decay=s.weight_decay,
                      betas=tuple(s.betas), grad_accum=s.grad_accum, grad_clip=s.grad_clip, seed=s.seed,
                      precision=s.precision, log_every=s.log_every, val_every=s.val_every, ckpt_every=s.ckpt_every,
                      progress=s.progress)

    def validate() -> dict[str, float]:
        return evaluate_lxmert(model, data["val"], data["qa_val"], info.device, s.val_batches)

    trainer = Trainer(model, tasks, data["sources"], mix, cfg, s.output, info, validate, log)
    if info.is_main:
        chance = chance_lxmert(data["val"], data["qa_val"], s.val_batches)
        log("chance (majority class) on the validation batches: "
            + "  ".join(f"{k} {v:.4f}" for k, v in chance.items()))
        out = Path(s.output)
        out.mkdir(parents=True, exist_ok=True)
        (out / "settings.json").write_text(json.dumps({"model": "lxmert", **asdict(s)}, indent=2))
        model.config.to_json_file(out / "model_config.json")
    result = trainer.run(resume=s.resume)
    if info.is_main:
        log(f"trained {len(result['history'])} steps in {result['seconds']:.1f} s: {result['tokens_per_s']:.0f} "
            f"tokens/s, final loss per task: "
            + ", ".join(f"{k} {v:.3f}" for k, v in last_losses(result["history"]).items()))
    D.cleanup()
    return result


def load_lxmert_run(path: str | Path, device: str | torch.device = "cpu") -> tuple[LxmertForPreTraining, Path]:
    """(the model, the checkpoint folder) of a ``fastvl pretrain --model lxmert`` run folder or one of its
    ``checkpoints/step_*`` folders. A run of another model family is refused naming it."""
    folder = Path(path)
    if not folder.exists():
        raise FileNotFoundError(f"LXMERT run {folder}: no such file or folder")
    run = folder if (folder / "model_config.json").is_file() else folder.parent.parent
    cfg_file = run / "model_config.json"
    if not cfg_file.is_file():
        raise ckpt.CheckpointError(f"{folder} is not a fastvl LXMERT run folder nor one of its checkpoints/step_* "
                                   f"folders (no model_config.json in {run})")
    raw = json.loads(cfg_file.read_text())
    if raw.get("model_type") != "lxmert":
        kind = "a UNITER" if "num_hidden_layers" in raw and "l_layers" not in raw else "another model's"
        raise ckpt.CheckpointError(f"{run} is {kind} run (model_config.json has no model_type 'lxmert'), not an "
                                   f"LXMERT one")
    model = LxmertForPreTraining(LxmertConfig.from_dict(raw))
    if folder == run:
        folder = ckpt.latest_checkpoint(run)
        if folder is None:
            raise ckpt.CheckpointError(f"LXMERT run {run} holds no complete checkpoint")
    ckpt.load_checkpoint(folder, model, trainer_state=False)
    return model.to(device), folder
