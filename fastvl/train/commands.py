"""CLI commands for training and data: ``fastvl pretrain``, ``fastvl eval``, ``fastvl make-data``.

Distributed: ``torchrun --nproc_per_node N -m fastvl.cli pretrain ...`` (gloo on CPU, NCCL on GPU).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..cli import command


def _pretrain_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="tiny", help="model config: tiny | base | large | path (.json / .yaml)")
    p.add_argument("--train-config", default=None,
                   help="official UNITER training JSON: its hyper-parameters (data paths come from --txt-db/--img-db)")
    p.add_argument("--data", default=None, help="folder holding txt_db/ and img_db/ (instead of --txt-db/--img-db)")
    p.add_argument("--txt-db", nargs="*", default=[], help="training txt_db folder(s) (default: synthetic corpus)")
    p.add_argument("--img-db", nargs="*", default=[], help="img_db folder(s), one per --txt-db")
    p.add_argument("--val-txt-db", nargs="*", default=[])
    p.add_argument("--val-img-db", nargs="*", default=[])
    p.add_argument("--output", default="runs/pretrain", help="checkpoints, metrics.jsonl, settings.json")
    p.add_argument("--tasks", default=None, help="task mix, e.g. itm:3,mlm:4,mrfr:2,mrc-kl:2")
    p.add_argument("--init-checkpoint", default=None, help="weights to start from (e.g. an official .pt)")
    add_run_arguments(p, "tiny default: 1")
    add_adv_arguments(p, "pre-training")


#: The run options of :func:`add_run_arguments` copied onto the settings when given (None = the settings' default).
RUN_OPTIONS = ("steps", "lr", "warmup_steps", "batch_tokens", "grad_accum", "grad_clip", "seed", "val_every",
               "ckpt_every", "log_every", "precision", "device", "threads")


def add_run_arguments(p: argparse.ArgumentParser, threads_default: str) -> None:
    """The training-run options shared by ``fastvl pretrain`` and ``fastvl finetune`` (schedule, batch, cadence,
    device, resume, bad examples, progress)."""
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--warmup-steps", type=int, default=None)
    p.add_argument("--batch-tokens", type=int, default=None, help="token budget per process and micro-batch")
    p.add_argument("--grad-accum", type=int, default=None)
    p.add_argument("--grad-clip", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--val-every", type=int, default=None)
    p.add_argument("--ckpt-every", type=int, default=None)
    p.add_argument("--log-every", type=int, default=None)
    p.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], default=None)
    p.add_argument("--device", default=None, help="auto | cpu | cuda")
    p.add_argument("--threads", type=int, default=None,
                   help=f"CPU threads per process ({threads_default}; OMP_NUM_THREADS wins)")
    p.add_argument("--skip-bad-examples", action="store_true", help="skip and count bad records instead of failing")
    p.add_argument("--no-progress", action="store_true")


def set_given(settings, args: argparse.Namespace, names) -> None:
    """Copy the options in ``names`` that were given (not None) from ``args`` onto ``settings``."""
    for name in names:
        value = getattr(args, name)
        if value is not None:
            setattr(settings, name, value)


def add_adv_arguments(p: argparse.ArgumentParser, what: str) -> None:
    """The VILLA options (``--adv`` and ``--adv-*``) of ``fastvl pretrain`` / ``fastvl finetune``."""
    adv = p.add_argument_group(f"VILLA adversarial {what} (--adv turns it on; defaults from REFERENCE.md)")
    adv.add_argument("--adv", action="store_true", help=f"adversarial {what} in the embedding space")
    adv.add_argument("--adv-modality", default="text", choices=["text", "image", "both", "alter"])
    adv.add_argument("--adv-norm", default="l2", choices=["l2", "linf"])
    adv.add_argument("--adv-steps", type=int, default=3)
    adv.add_argument("--adv-lr-txt", type=float, default=1e-3)
    adv.add_argument("--adv-lr-img", type=float, default=1e-3)
    adv.add_argument("--adv-init-mag", type=float, default=0.0)
    adv.add_argument("--adv-max-norm", type=float, default=0.0)
    adv.add_argument("--adv-kl-weight", type=float, default=1.5)
    adv.add_argument("--adv-detach-clean", action="store_true",
                     help="opt-in approximation: the clean predictions are a constant consistency target "
                          "(stop-gradient; 3.0x instead of 3.33x a clean step at K=3)")


def adv_from_args(args: argparse.Namespace) -> dict | None:
    """The AdvConfig fields given by :func:`add_adv_arguments`'s options (None without ``--adv``)."""
    if not args.adv:
        return None
    return dict(mode=args.adv_modality, norm=args.adv_norm, adv_steps=args.adv_steps, adv_lr_txt=args.adv_lr_txt,
                adv_lr_img=args.adv_lr_img, adv_init_mag=args.adv_init_mag, adv_max_norm=args.adv_max_norm,
                adv_kl_weight=args.adv_kl_weight, kl_clean_grad=not args.adv_detach_clean)


def _settings(args: argparse.Namespace):
    from .pretrain import PretrainSettings, settings_from_official

    s = settings_from_official(args.train_config) if args.train_config else PretrainSettings()
    txt, img = list(args.txt_db), list(args.img_db)
    if args.data:
        root = Path(args.data)
        txt = txt or [str(p) for p in sorted(root.glob("txt*db*")) if p.is_dir()]
        img = img or [str(p) for p in sorted(root.glob("img*")) if p.is_dir()]
        if not txt or not img:
            raise SystemExit(f"fastvl pretrain: --data {root} holds no txt_db / img_db folders")
        if len(img) == 1 and len(txt) > 1:
            img = img * len(txt)
    if args.train_config and not txt:
        raise SystemExit("fastvl pretrain: --train-config needs --txt-db/--img-db (its paths are the authors')")
    if args.config != "tiny" or not args.train_config:
        s.config = args.config
    s.txt_db, s.img_db = txt, img
    s.val_txt_db, s.val_img_db = list(args.val_txt_db), list(args.val_img_db)
    s.output, s.resume, s.skip_bad_examples = args.output, args.resume, args.skip_bad_examples
    s.progress = not args.no_progress
    s.adv = adv_from_args(args)
    set_given(s, args, (*RUN_OPTIONS, "tasks", "init_checkpoint"))
    return s


@command("pretrain", "pre-train UNITER (default: UNITER-tiny on the built-in synthetic corpus)", _pretrain_args)
def _pretrain(args: argparse.Namespace) -> int:
    from .pretrain import pretrain

    result = pretrain(_settings(args))
    if result["validation"]:
        print("final validation:", json.dumps({k: round(v, 4) for k, v in result["validation"].items()}))
    return 0


def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="a pretrain output folder or checkpoints/step_* folder")
    p.add_argument("--task", default="pretrain", choices=["pretrain"], help="what to evaluate")
    p.add_argument("--txt-db", nargs="*", default=[], help="validation txt_db(s) (default: synthetic val split)")
    p.add_argument("--img-db", nargs="*", default=[])
    p.add_argument("--batches", type=int, default=50)
    p.add_argument("--device", default="auto")


@command("eval", "evaluate a checkpoint (pre-training metrics: ITM / MLM / MRC accuracy, OT gap)", _eval_args)
def _eval(args: argparse.Namespace) -> int:
    import torch

    from ..data import build_pretrain_data, synthetic_corpus
    from ..models.uniter import UniterForPretraining
    from ..models.uniter.config import UniterConfig
    from . import checkpoint as ckpt
    from .pretrain import evaluate

    folder = Path(args.checkpoint)
    run = folder if (folder / "checkpoints").is_dir() else folder.parent.parent
    if (folder / "checkpoints").is_dir():
        folder = ckpt.latest_checkpoint(folder)
        if folder is None:
            raise SystemExit(f"fastvl eval: no complete checkpoint under {args.checkpoint}")
    cfg = UniterConfig.from_json_file(run / "model_config.json")
    model = UniterForPretraining(cfg, cfg.img_dim, cfg.img_label_dim)
    ckpt.load_checkpoint(folder, model)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    model.to(device).eval()
    settings = json.loads((run / "settings.json").read_text()) if (run / "settings.json").exists() else {}
    common = dict(max_tokens=settings.get("batch_tokens", 2048), seed=0, train=False,
                  max_txt_len=settings.get("max_txt_len", 60))
    if args.txt_db:
        val = build_pretrain_data(args.txt_db, args.img_db, {"itm": 1, "mlm": 1, "mrc": 1}, **common)
    else:
        corpus = synthetic_corpus()
        val = build_pretrain_data(corpus.txt_val, corpus.img_db, {"itm": 1, "mrc": 1, "mlm-words": 1},
                                  eval_word_ids=corpus.content_token_ids, **common)
    metrics = evaluate(model, val, device, args.batches)
    print(json.dumps({"checkpoint": str(folder), **{k: round(v, 4) for k, v in metrics.items()}}, indent=1))
    return 0


def _make_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--npz-dir", help="folder of per-image .npz (features, norm_bb, conf, soft_labels)")
    p.add_argument("--captions", nargs="*", default=[], help="captions jsonl file(s): {id, img_fname, caption}")
    p.add_argument("--output", required=True, help="where the img_db and txt_db folders are written")
    p.add_argument("--vocab", default=None, help="WordPiece vocab.txt (default: the synthetic corpus vocab)")
    p.add_argument("--conf-th", type=float, default=0.2)
    p.add_argument("--max-bb", type=int, default=100)
    p.add_argument("--min-bb", type=int, default=10)
    p.add_argument("--no-compress", action="store_true", help="msgpack values instead of compressed npz")
    p.add_argument("--skip-bad-examples", action="store_true")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--synthetic", action="store_true",
                   help="write the synthetic corpus's raw npz + captions into --output/raw first and convert those")


@command("make-data", "write official UNITER LMDB dbs from per-image npz files + captions jsonl", _make_data_args)
def _make_data(args: argparse.Namespace) -> int:
    from ..data import make_data, write_synthetic_raw

    npz_dir, captions = args.npz_dir, list(args.captions)
    if args.synthetic:
        raw = write_synthetic_raw(Path(args.output) / "raw")
        npz_dir, captions = raw["npz_dir"], [raw[k] for k in sorted(raw) if k.startswith("captions_")]
    if not npz_dir or not captions:
        print("fastvl make-data: give --npz-dir and --captions (or --synthetic)", file=sys.stderr)
        return 2
    result = make_data(npz_dir, captions, args.output, vocab_file=args.vocab, conf_th=args.conf_th,
                       max_bb=args.max_bb, min_bb=args.min_bb, compress=not args.no_compress,
                       skip_bad_examples=args.skip_bad_examples, overwrite=args.overwrite)
    print(result)
    return 0
