"""HERO pre-training end to end (``fastvl pretrain --model hero``): settings -> video data -> HeroForPretraining ->
task modules (mlm, mfm-nce, mffr, fom, vsm) -> Trainer, with validation lines.

With no data given it pre-trains a tiny HERO (hidden 64, 2 cross-modal + 2 temporal layers) on the synthetic video
corpus (generated into the cache on first use; its train videos for training, its val videos for validation) with
the paper's task mix mlm:2, mfm-nce:2, fom:1, vsm:2, one task per accumulation cycle. Validation reports MLM
accuracy, MFM-NCE accuracy (the masked frame's own feature ranked first among all candidates), FOM accuracy (the
frame's original position), VSM query -> video R@1 within a validation batch, and the VSM span accuracies.
Pointed at official video / subtitle dbs and an official config JSON, the same code pre-trains for real (the
official hyper-parameters: lr 3e-5, warmup 10k, 100k steps, grad-norm 1, VSM weights 1 / 1 / 0.01).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from ..adversarial import AdvConfig, AdversarialTask
from ..data.video import DEFAULT_VIDEO_MIX, build_video_pretrain_data, parse_video_tasks
from ..models.hero import HeroForPretraining
from ..tasks.hero import HeroPretrainTask, summarize_validation
from ..train import distributed as D
from ..train.loop import TrainConfig, Trainer
from .base import SettingsError, last_losses
from .hero_common import HERO_CONFIG_FILE, hero_config, load_hero_init, video_data_paths

__all__ = ["HERO_PRESETS", "HeroPretrainSettings", "evaluate_hero_pretrain", "hero_pretrain"]

#: Defaults for the tiny CPU model (synthetic corpus) and for an official-size config (real data).
HERO_PRESETS = {
    "tiny": dict(steps=900, lr=1e-3, warmup_steps=100, max_frames=160, val_every=300, ckpt_every=300,
                 log_every=50, threads=1, lw_st_ed=0.1, drop_svmr_prob=0.0),
    "official": dict(steps=100_000, lr=3e-5, warmup_steps=10_000, max_frames=32 * 100, val_every=5000,
                     ckpt_every=5000, log_every=100, lw_st_ed=0.01, drop_svmr_prob=0.8),
}


@dataclass
class HeroPretrainSettings:
    """A HERO pre-training run; ``None`` fields take the preset (tiny without a config file, else official)."""

    config: str | None = None  # 'tiny' | path to an official HERO config JSON
    video_db: str | None = None  # None (with sub_db None): the synthetic video corpus
    sub_db: str | None = None
    val_video_db: str | None = None  # None: the synthetic corpus' val videos, else no validation split given
    val_sub_db: str | None = None
    tasks: str = DEFAULT_VIDEO_MIX
    output: str = "runs/pretrain-hero"
    steps: int | None = None
    lr: float | None = None
    warmup_steps: int | None = None
    max_frames: int | None = None  # frame budget per micro-batch and process
    grad_accum: int = 1
    grad_clip: float = 1.0
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.98)
    seed: int = 42
    lw_st_ed: float | None = None
    lw_neg_ctx: float = 1.0
    lw_neg_q: float = 1.0
    margin: float = 0.1
    drop_svmr_prob: float | None = None
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
    adv: dict | None = None
    threads: int | None = None
    cache_dir: str | None = None

    def preset(self) -> str:
        return "tiny" if self.config in (None, "tiny") else "official"

    def resolved(self) -> HeroPretrainSettings:
        """A copy with unset values from the preset."""
        preset = HERO_PRESETS[self.preset()]
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        for k, v in preset.items():
            if values.get(k) is None:
                values[k] = v
        return HeroPretrainSettings(**values)


def _pretrain_data(s: HeroPretrainSettings, rank: int, world: int):
    paths = video_data_paths(s.video_db, s.sub_db, s.cache_dir)
    corpus = paths["corpus"]
    mix = parse_video_tasks(s.tasks)
    common = dict(tasks=mix, max_frames=s.max_frames, seed=s.seed, skip_bad_examples=s.skip_bad_examples)
    train_vids = corpus.vids("train") if corpus is not None else None
    data = build_video_pretrain_data(paths["video_db"], paths["sub_db"], rank=rank, world_size=world,
                                     vids=train_vids, **common)
    val = None
    if corpus is not None:
        val = build_video_pretrain_data(paths["video_db"], paths["sub_db"], vids=corpus.vids("val"), train=False,
                                        **common)
    elif s.val_video_db is not None:
        val = build_video_pretrain_data(s.val_video_db, s.val_sub_db, train=False, **common)
    return data, val, paths


def build_hero_pretrain_model(s: HeroPretrainSettings, dims: dict, init: str | None = None) -> HeroForPretraining:
    """HeroForPretraining with the run's config and VSM settings (``init`` loaded non-strictly)."""
    cfg = hero_config(s.config, dims["vocab_size"])
    max_frm = max(int(dims.get("max_frm_seq_len", 100)), 100)
    model = HeroForPretraining(cfg, dims["vfeat_dim"], max_frm, lw_st_ed=s.lw_st_ed, lw_neg_ctx=s.lw_neg_ctx,
                               lw_neg_q=s.lw_neg_q, margin=s.margin, drop_svmr_prob=s.drop_svmr_prob)
    if init:
        load_hero_init(model, init)
    return model


@torch.no_grad()
def evaluate_hero_pretrain(tasks: dict[str, HeroPretrainTask], val, device: torch.device, max_batches: int = 20
                           ) -> dict[str, float]:
    """Validation metrics (see the module docstring) over at most ``max_batches`` batches per task."""
    totals: dict[str, dict[str, float]] = {}
    for name, task in tasks.items():
        task.eval()
        acc: dict[str, float] = {}
        for i, batch in enumerate(val.batches(name)):
            if i >= max_batches:
                break
            for k, v in task.evaluate(batch.to(device)).items():
                acc[k] = acc.get(k, 0.0) + float(v)
        totals[name] = acc
        task.train()
    return summarize_validation(totals)


def hero_pretrain(settings: HeroPretrainSettings, log=print) -> dict:
    """Run HERO pre-training; returns {'history', 'validation', 'seconds', 'chance', ...}."""
    s = settings.resolved()
    info = D.init_distributed(s.device)
    threads = D.set_cpu_threads(s.threads, info.device)
    torch.manual_seed(s.seed)
    data, val, paths = _pretrain_data(s, info.rank, info.world_size)
    model = build_hero_pretrain_model(s, data.dims, s.init_checkpoint)
    plain = {name: HeroPretrainTask(model, name) for name in data.mix}
    tasks: dict = dict(plain)
    if s.adv is not None:
        adv_cfg = AdvConfig(**s.adv)
        tasks = {k: (t if k == "vsm" else AdversarialTask(t, adv_cfg)) for k, t in plain.items()}
        if info.is_main:
            log(f"adversarial pre-training (VILLA) on {[k for k in tasks if k != 'vsm']}: {adv_cfg}"
                + ("; vsm trains without it (no adversarial view)" if "vsm" in tasks else ""))
    cfg = TrainConfig(steps=s.steps, lr=s.lr, warmup_steps=s.warmup_steps, weight_decay=s.weight_decay,
                      betas=tuple(s.betas), grad_accum=s.grad_accum, grad_clip=s.grad_clip, seed=s.seed,
                      precision=s.precision, log_every=s.log_every, val_every=s.val_every, ckpt_every=s.ckpt_every,
                      progress=s.progress)
    chance = _chance(data.dims, val)
    validate = (lambda: evaluate_hero_pretrain(plain, val, info.device, s.val_batches)) if val is not None else None
    if info.is_main:
        n_params = sum(p.numel() for p in model.parameters())
        log(f"fastvl pretrain --model hero: HeroForPretraining ({n_params / 1e6:.2f}M parameters), data "
            f"{'synthetic video corpus' if paths['synthetic'] else paths['video_db']}, mix {data.mix}, {s.steps} "
            f"steps, {info.world_size} process(es) on {info.device}" + (f" ({threads} thread(s) each)" if threads
                                                                         else ""))
        log("chance levels: " + ", ".join(f"{k} {v:.3f}" for k, v in chance.items()))
        out = Path(s.output)
        out.mkdir(parents=True, exist_ok=True)
        (out / "settings.json").write_text(json.dumps(asdict(s), indent=2))
        (out / HERO_CONFIG_FILE).write_text(json.dumps(model.config.to_dict(), indent=2))
        (out / "hero_dims.json").write_text(json.dumps({**data.dims, "max_frm_seq_len": max(
            int(data.dims.get("max_frm_seq_len", 100)), 100)}, indent=2))
    trainer = Trainer(model, tasks, data.sources, data.mix, cfg, s.output, info, validate, log)
    run = trainer.run(resume=s.resume)
    validation = ({k.removeprefix("val/"): v for k, v in run["validation"].items() if k.startswith("val/")}
                  if run["validation"] else None)
    if info.is_main:
        log(f"trained {len(run['history'])} steps in {run['seconds']:.1f} s; final loss: "
            + ", ".join(f"{k} {v:.3f}" for k, v in last_losses(run["history"]).items()))
    D.cleanup()
    return {**run, "validation": validation, "chance": chance}


def _chance(dims: dict, val) -> dict[str, float]:
    """Accuracy of a model that ignores its input, per validation metric (approximate: uniform guessing)."""
    out = {"mlm_acc": 1.0 / max(int(dims["vocab_size"]) - 5, 1)}
    if val is None:
        return out
    frames = [b["c_attn_masks"].sum(1) for b in val.batches("fom")] if "fom" in val.mix else []
    if frames:
        out["fom_acc"] = float(torch.cat(frames).float().reciprocal().mean())
    if "vsm" in val.mix:
        sizes = [int(b["c_v_feats"].shape[0]) for b in val.batches("vsm")]
        out["vsm_r1"] = sum(1.0 / n for n in sizes) / max(len(sizes), 1)
    if "mfm-nce" in val.mix:
        cands = [int(b["c_v_masks"].numel()) for b in val.batches("mfm-nce")]
        out["mfm-nce_acc"] = sum(1.0 / n for n in cands) / max(len(cands), 1)
    return out


def check_settings(s: HeroPretrainSettings) -> None:
    """SettingsError for settings that cannot run (before any work)."""
    if (s.video_db is None) != (s.sub_db is None):
        raise SettingsError("give both --video-db and --sub-db, or neither (the synthetic video corpus)")
    if (s.val_video_db is None) != (s.val_sub_db is None):
        raise SettingsError("give both --val-video-db and --val-sub-db, or neither")
