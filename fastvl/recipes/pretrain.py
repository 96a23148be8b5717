"""UNITER pre-training end to end: settings -> data -> model -> tasks -> Trainer, plus validation metrics.

``fastvl pretrain`` with no arguments trains UNITER-tiny on the synthetic corpus (generated into the cache on
first use). Pointed at official txt_db / img_db folders and a base config, the same code pre-trains for real.
An official training JSON (``uniter-pretrain-alldata-base-8gpu.json``) can be given with ``--train-config``:
its hyper-parameters are taken (token budget, accumulation, lr, schedule, mix ratios, masking, OT weight),
its data paths are replaced by ``--txt-db`` / ``--img-db``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from ..adversarial import AdvConfig, adversarial_tasks
from ..data import PretrainData, build_pretrain_data, synthetic_corpus
from ..models.uniter import UniterConfig, UniterForPretraining, resolve_config
from ..tasks.pretrain import pretrain_tasks
from ..train import checkpoint as ckpt
from ..train import distributed as D
from ..train.loop import TrainConfig, Trainer
from .base import SettingsError, last_losses
from .official import pretrain_from_official, read_official

#: Defaults per model size (CPU-friendly for tiny; the official recipe for base / large).
PRESETS = {
    "tiny": dict(steps=12_000, lr=1e-3, warmup_steps=300, batch_tokens=512, grad_accum=1, weight_decay=0.01,
                 tasks="itm:2,mlm:2,mrc:1,mrfr:1", val_every=2000, ckpt_every=2000, log_every=50, threads=1),
    "base": dict(steps=200_000, lr=5e-5, warmup_steps=10_000, batch_tokens=10240, grad_accum=6,
                 tasks="itm:3,mlm:4,mrfr:2,mrc-kl:2", val_every=5000, ckpt_every=5000, log_every=100),
    "large": dict(steps=500_000, lr=5e-5, warmup_steps=10_000, batch_tokens=6144, grad_accum=4,
                  tasks="itm:3,mlm:4,mrfr:2,mrc-kl:2", val_every=5000, ckpt_every=5000, log_every=100),
}


@dataclass
class PretrainSettings:
    config: str = "tiny"  # model config: tiny | base | large | path (.json official / .yaml fastvl)
    txt_db: list[str] = field(default_factory=list)  # empty: the synthetic corpus
    img_db: list[str] = field(default_factory=list)
    val_txt_db: list[str] = field(default_factory=list)
    val_img_db: list[str] = field(default_factory=list)
    output: str = "runs/pretrain"
    steps: int | None = None
    lr: float | None = None
    warmup_steps: int | None = None
    batch_tokens: int | None = None
    grad_accum: int | None = None
    grad_clip: float = 5.0
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.98)
    seed: int = 42
    tasks: str | None = None  # "itm:3,mlm:4,..."
    ot_lambda: float = 0.1
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
    skip_bad_examples: bool = False
    init_checkpoint: str | None = None
    progress: bool = True
    adv: dict | None = None  # VILLA adversarial pre-training: AdvConfig fields (None = off)
    # CPU intra-op threads per process (None: torch's default; OMP_NUM_THREADS, when set, wins). The tiny preset
    # uses 1: its matrices are too small for threading to pay, and 2 threads ran 2.4x slower on a busy 2-core box.
    threads: int | None = None

    def resolved(self) -> PretrainSettings:
        """Unset values filled from the preset of the model size (tiny for paths)."""
        preset = PRESETS.get(self.config, PRESETS["base"] if self.txt_db else PRESETS["tiny"])
        values = {k: (preset[k] if getattr(self, k) is None and k in preset else getattr(self, k))
                  for k in (f.name for f in fields(self))}
        return PretrainSettings(**values)


def settings_from_official(path: str | Path, **overrides) -> PretrainSettings:
    """Hyper-parameters of an official UNITER pre-training JSON (data paths are not taken: they point into
    the authors' containers; give ``txt_db`` / ``img_db``).
    See :func:`fastvl.recipes.official.pretrain_from_official`."""
    values, _ = pretrain_from_official(read_official(path))
    s = PretrainSettings(**values)
    for k, v in overrides.items():
        setattr(s, k, v)
    return s


# ----------------------------------------------------------------------------------------------------------------
def _data(s: PretrainSettings, rank: int, world: int) -> tuple[PretrainData, PretrainData, list[int] | None]:
    """Training data, validation data and the content-word ids (synthetic corpus only)."""
    common = dict(max_tokens=s.batch_tokens, seed=s.seed, mask_prob=s.mask_prob, itm_neg_prob=s.itm_neg_prob,
                  max_txt_len=s.max_txt_len, skip_bad_examples=s.skip_bad_examples)
    if not s.txt_db:
        corpus = synthetic_corpus()
        words = corpus.content_token_ids
        train = build_pretrain_data(corpus.txt_train, corpus.img_db, s.tasks, rank=rank, world_size=world,
                                    train=True, **common)
        val_tasks = {t: 1 for t in ("itm", "mrc", "mlm-words")}
        val = build_pretrain_data(corpus.txt_val, corpus.img_db, val_tasks, train=False, eval_word_ids=words,
                                  **common)
        return train, val, words
    if len(s.txt_db) != len(s.img_db):
        raise SettingsError(f"pretrain: --txt-db has {len(s.txt_db)} paths but --img-db has {len(s.img_db)}")
    train = build_pretrain_data(s.txt_db, s.img_db, s.tasks, rank=rank, world_size=world, train=True, **common)
    val = None
    if s.val_txt_db:
        val = build_pretrain_data(s.val_txt_db, s.val_img_db or s.img_db, {t: 1 for t in ("itm", "mlm", "mrc")},
                                  train=False, **common)
    return train, val, None


def build_model(s: PretrainSettings, dims: dict) -> UniterForPretraining:
    cfg = resolve_config(s.config)
    over = {"vocab_size": max(cfg.vocab_size, dims["vocab_size"]) if s.txt_db else dims["vocab_size"]}
    cfg = cfg.replace(**over, img_dim=dims["img_dim"], img_label_dim=dims["img_label_dim"] or cfg.img_label_dim)
    model = UniterForPretraining(cfg, cfg.img_dim, cfg.img_label_dim)
    if s.init_checkpoint:
        path = Path(s.init_checkpoint)
        if not path.is_file():
            raise FileNotFoundError(f"--init-checkpoint {path}: no such file")
        try:  # tensors only: a pickled object in a file someone handed over is refused, never run
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001  (UnpicklingError, RuntimeError of a corrupt zip, EOFError ...)
            raise ckpt.CheckpointError(f"--init-checkpoint {path}: not a loadable state dict of tensors "
                                       f"({' '.join(str(e).split())[:160]})") from None
        if isinstance(state, dict) and isinstance(state.get("model"), dict):
            state = state["model"]
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ckpt.CheckpointError(f"--init-checkpoint {path}: not a state dict (name -> tensor)")
        missing, unexpected = model.load_state_dict(state, strict=False)
        print(f"init from {s.init_checkpoint}: {len(missing)} missing, {len(unexpected)} unexpected keys")
    return model


@torch.no_grad()
def evaluate(model: UniterForPretraining, val: PretrainData, device: torch.device, max_batches: int = 20
             ) -> dict[str, float]:
    """Validation metrics: ITM accuracy and OT distance gap (negative - positive), MLM accuracy (``mlm_acc``; on
    the synthetic corpus ``mlm_words_acc``: object, colour and size words masked one at a time), MRC accuracy
    (argmax over detector classes 1..)."""
    out: dict[str, float] = {}
    hits = {"itm": [0, 0], "mlm": [0, 0], "mlm_words": [0, 0], "mrc": [0, 0]}
    ot = {0: [0.0, 0], 1: [0.0, 0]}
    for task in val.mix:
        for k, batch in enumerate(val.batches(task)):
            if k >= max_batches:
                break
            batch = batch.to(device)
            if task == "itm":
                scores, dist = model(batch, "itm", compute_loss=False)
                t = batch.itm_targets
                hits["itm"][0] += int((scores.argmax(-1) == t).sum())
                hits["itm"][1] += t.numel()
                if dist is not None:
                    for v in (0, 1):
                        ot[v][0] += float(dist[t == v].sum())
                        ot[v][1] += int((t == v).sum())
            elif task in ("mlm", "mlm-words"):
                logits = model(batch, "mlm", compute_loss=False)
                labels = batch.txt_labels[batch.txt_labels != -1]
                key = "mlm_words" if task == "mlm-words" else "mlm"
                hits[key][0] += int((logits.argmax(-1) == labels).sum())
                hits[key][1] += labels.numel()
            elif task == "mrc":
                logits = model(batch, "mrc", compute_loss=False)
                target = batch.soft_labels[:, 1:].argmax(-1) + 1
                hits["mrc"][0] += int((logits.argmax(-1) == target).sum())
                hits["mrc"][1] += target.numel()
    for name, (h, n) in hits.items():
        if n:
            out[f"{name}_acc"] = h / n
    if ot[0][1] and ot[1][1]:
        out["ot_pos"], out["ot_neg"] = ot[1][0] / ot[1][1], ot[0][0] / ot[0][1]
        out["ot_gap"] = out["ot_neg"] - out["ot_pos"]
    return out


def pretrain(settings: PretrainSettings, log=print) -> dict:
    """Run pre-training; returns {'history', 'validation', 'checkpoint', 'tokens_per_s', 'seconds'}."""
    s = settings.resolved()
    info = D.init_distributed(s.device)
    threads = D.set_cpu_threads(s.threads, info.device)
    torch.manual_seed(s.seed)
    train, val, _ = _data(s, info.rank, info.world_size)
    model = build_model(s, train.dims)
    if info.is_main:
        n_params = sum(p.numel() for p in model.parameters())
        log(f"fastvl pretrain: model {s.config} ({n_params / 1e6:.2f}M parameters), data "
            f"{'synthetic corpus' if not s.txt_db else s.txt_db}, tasks {train.mix}, {s.steps} steps, "
            f"{info.world_size} process(es) on {info.device}"
            + (f" ({threads} thread(s) each)" if threads else ""))
    tasks = {k: v for k, v in pretrain_tasks(model, s.ot_lambda).items() if k in train.mix}
    if s.adv is not None:  # VILLA: every task under the K-step adversarial loop (one flag on any task)
        adv_cfg = AdvConfig(**s.adv)
        tasks = adversarial_tasks(tasks, adv_cfg)
        if info.is_main:
            log(f"adversarial pre-training (VILLA): {adv_cfg}")
    cfg = TrainConfig(steps=s.steps, lr=s.lr, warmup_steps=s.warmup_steps, weight_decay=s.weight_decay,
                      betas=tuple(s.betas), grad_accum=s.grad_accum, grad_clip=s.grad_clip, seed=s.seed,
                      precision=s.precision, log_every=s.log_every, val_every=s.val_every, ckpt_every=s.ckpt_every,
                      progress=s.progress)
    validate = (lambda: evaluate(model, val, info.device, s.val_batches)) if val is not None else None
    trainer = Trainer(model, tasks, train.sources, train.mix, cfg, s.output, info, validate, log)
    if info.is_main:
        Path(s.output).mkdir(parents=True, exist_ok=True)
        (Path(s.output) / "settings.json").write_text(json.dumps(asdict(s), indent=2))
        model.config.to_json_file(Path(s.output) / "model_config.json")
    result = {**trainer.run(resume=s.resume), "bad_examples": train.bad.as_dict()}
    if info.is_main:
        log(f"trained {len(result['history'])} steps in {result['seconds']:.1f} s: {result['tokens_per_s']:.0f} "
            f"tokens/s (all processes), final loss per task: "
            + ", ".join(f"{k} {v:.3f}" for k, v in last_losses(result["history"]).items()))
        if result["bad_examples"]:
            log(f"skipped bad examples (reason: count): {result['bad_examples']}")
    D.cleanup()
    return result


def evaluate_checkpoint(checkpoint: str | Path, txt_db: list[str] | None = None, img_db: list[str] | None = None,
                        batches: int = 50, device: str = "auto") -> dict:
    """The validation metrics of a ``fastvl pretrain`` run folder or one of its ``checkpoints/step_*`` folders, on
    ``txt_db`` / ``img_db`` (default: the synthetic validation split). Returns {'checkpoint', metric: value}."""
    folder = Path(checkpoint)
    if not folder.exists():
        raise FileNotFoundError(f"fastvl eval: --checkpoint {folder}: no such file or folder")
    run = folder if (folder / "checkpoints").is_dir() or (folder / "model_config.json").is_file() \
        else folder.parent.parent
    if (run / "finetune.json").is_file():
        task = json.loads((run / "finetune.json").read_text()).get("task", "?")
        raise ckpt.CheckpointError(f"fastvl eval: --checkpoint {folder} is a fastvl finetune run (task {task}), not a "
                                   f"pretrain run: evaluate it with --task {task}")
    if not (run / "model_config.json").is_file():
        raise ckpt.CheckpointError(f"fastvl eval: --checkpoint {folder} is not a fastvl pretrain run folder nor one of "
                                   f"its checkpoints/step_* folders (no model_config.json in {run})")
    if folder == run:
        folder = ckpt.latest_checkpoint(run)
        if folder is None:
            raise ckpt.CheckpointError(f"fastvl eval: --checkpoint {run} holds no complete checkpoint")
    cfg = UniterConfig.from_json_file(run / "model_config.json")
    model = UniterForPretraining(cfg, cfg.img_dim, cfg.img_label_dim)
    ckpt.load_checkpoint(folder, model, trainer_state=False)
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    model.to(dev).eval()
    settings = json.loads((run / "settings.json").read_text()) if (run / "settings.json").exists() else {}
    common = dict(max_tokens=settings.get("batch_tokens", 2048), seed=0, train=False,
                  max_txt_len=settings.get("max_txt_len", 60))
    if txt_db:
        val = build_pretrain_data(txt_db, img_db, {"itm": 1, "mlm": 1, "mrc": 1}, **common)
    else:
        corpus = synthetic_corpus()
        val = build_pretrain_data(corpus.txt_val, corpus.img_db, {"itm": 1, "mrc": 1, "mlm-words": 1},
                                  eval_word_ids=corpus.content_token_ids, **common)
    return {"checkpoint": str(folder), **evaluate(model, val, dev, batches)}
