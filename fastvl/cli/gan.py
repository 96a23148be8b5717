"""``fastvl gan``: BachGAN: train | synthesize | eval (images from object box layouts).

- ``fastvl gan train [--output DIR] [--no-retrieval] [--data synthetic|cityscapes|ade20k --data-root DIR]
  [--preset small|official]``: trains with the shared trainer (two optimizers, atomic checkpoints, ``--resume``);
  PNG grids (layout | retrieved background | generated | real) go to ``DIR/samples`` every ``--sample-every`` steps.
- ``fastvl gan synthesize --checkpoint RUN --layout boxes.json --out image.png``: an image for user-drawn boxes
  (``{"size": [H, W], "boxes": [{"class": name-or-id, "box": [x0, y0, x1, y1]}, ...]}``).
- ``fastvl gan eval --checkpoint RUN [--checkpoint RUN2 ...]``: segmenter pixel accuracy / mIoU on real and generated
  validation images, and FID (the default feature net is fastvl's segmenter, labelled so; ``--inception FILE`` for
  the user's TorchScript Inception).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from .errors import UserError
from .options import non_negative_int, positive_float, positive_int, probability

__all__ = ["HELP", "add_arguments", "run"]

HELP = "BachGAN: train | synthesize | eval (images from object box layouts)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The sub-commands of ``fastvl gan`` and their options."""
    sub = p.add_subparsers(dest="gan_command", metavar="{train,synthesize,eval}", parser_class=type(p))
    sub.required = True
    t = sub.add_parser("train", help="train BachGAN (or the no-retrieval ablation)")
    t.add_argument("--output", default="runs/bachgan", help="run folder (checkpoints/, samples/, bachgan.json)")
    t.add_argument("--data", default="synthetic", choices=["synthetic", "cityscapes", "ade20k"])
    t.add_argument("--data-root", default=None, help="the dataset folder (cityscapes / ade20k)")
    t.add_argument("--preset", default="small", choices=["small", "official"],
                   help="model sizes: small (CPU minutes at 64x64) or official (ngf 64; Cityscapes 512x256, "
                        "ADE20K 256x256)")
    t.add_argument("--no-retrieval", action="store_true", help="the ablation: SPADE on the box map alone")
    t.add_argument("--steps", type=positive_int, default=None, help="optimizer steps (default 1000)")
    t.add_argument("--batch-size", type=positive_int, default=None, help="images per step (default 8)")
    t.add_argument("--lr-g", type=positive_float, default=None, help="generator lr (TTUR; default 1e-4)")
    t.add_argument("--lr-d", type=positive_float, default=None, help="discriminator lr (TTUR; default 4e-4)")
    t.add_argument("--seg", action="store_true", help="train the hallucination head (NLL, weight 1, ignore 255)")
    t.add_argument("--vgg", default=None, help="VGG19 weights file (torchvision layout) for the perceptual loss")
    t.add_argument("--sample-every", type=positive_int, default=None, help="steps between PNG grids")
    t.add_argument("--ckpt-every", type=non_negative_int, default=None, help="steps between checkpoints (0: end)")
    t.add_argument("--memory-fraction", type=probability, default=None,
                   help="share of the training maps in the memory bank (default 0.25)")
    t.add_argument("--seed", type=non_negative_int, default=None)
    t.add_argument("--resume", action="store_true", help="continue the run in --output from its latest checkpoint")
    _add_common(t)
    t.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                   help="auto: bf16 autocast on GPU, fp32 on CPU")
    t.add_argument("--no-progress", action="store_true")

    s = sub.add_parser("synthesize", help="an image from a boxes.json layout")
    s.add_argument("--checkpoint", required=True, help="a BachGAN run folder or its checkpoints/step_* folder")
    s.add_argument("--layout", required=True, help='boxes JSON: {"size": [H, W], "boxes": [{"class": .., "box": '
                                                   '[x0, y0, x1, y1]}]}')
    s.add_argument("--out", required=True, help="output PNG")
    _add_common(s)

    e = sub.add_parser("eval", help="segmentation accuracy and FID of generated images")
    e.add_argument("--checkpoint", required=True, action="append",
                   help="a BachGAN run folder (repeat to compare runs, e.g. BachGAN and the ablation)")
    e.add_argument("--inception", default=None, help="TorchScript feature network for FID (e.g. the user's "
                                                     "Inception pool3); default: fastvl's segmenter features")
    e.add_argument("--segmenter-steps", type=positive_int, default=400)
    e.add_argument("--json", default=None, help="also write the table as JSON to this file")
    e.add_argument("--no-progress", action="store_true")
    _add_common(e)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--threads", type=positive_int, default=None, help="CPU threads (default 1; OMP_NUM_THREADS wins)")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="show the traceback of a user error too")


def _setup(args: argparse.Namespace) -> None:
    import torch

    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(args.threads or 1)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"{args.device!r} was asked for but no CUDA device is available", argument="--device")
    if args.device != "cpu" and not args.device.startswith("cuda"):
        raise UserError(f"must be cpu or cuda[:N], got {args.device!r}", argument="--device")


def run(args: argparse.Namespace) -> int:
    _setup(args)
    return {"train": _train, "synthesize": _synthesize, "eval": _eval}[args.gan_command](args)


def _train(args: argparse.Namespace) -> int:
    from ..recipes.bachgan import GanSettings, train_bachgan
    from ..train.checkpoint import latest_checkpoint

    s = GanSettings(output=args.output, data=args.data, data_root=args.data_root, preset=args.preset,
                    retrieval=not args.no_retrieval, seg=args.seg, vgg=args.vgg, device=args.device,
                    precision=args.precision, progress=not args.no_progress)
    for name in ("steps", "batch_size", "lr_g", "lr_d", "sample_every", "ckpt_every", "memory_fraction", "seed"):
        if getattr(args, name) is not None:
            setattr(s, name, getattr(args, name))
    if args.vgg is not None and not Path(args.vgg).is_file():
        raise UserError(f"{args.vgg}: no such VGG19 weights file", argument="--vgg")
    if args.data_root is not None and not Path(args.data_root).is_dir():
        raise UserError(f"{args.data_root}: no such dataset folder", argument="--data-root")
    if not args.resume and latest_checkpoint(Path(args.output)) is not None:
        raise UserError(f"{args.output} already holds a run; pass --resume to continue it or choose a new folder",
                        argument="--output")
    t0 = time.perf_counter()
    result = train_bachgan(s, resume=args.resume)
    wall = time.perf_counter() - t0
    final = {k.split("/")[-1] if k.startswith("bachgan/") else k: round(v, 4) for k, v in result["final"].items()}
    print(json.dumps({"what": "BachGAN" if s.retrieval else "no-retrieval ablation", "steps": s.steps,
                      "seconds": round(wall, 1), "final_losses": final,
                      "grid": str(result["grid"]) if result["grid"] else None,
                      "checkpoints": str(Path(s.output) / "checkpoints")}, indent=1))
    return 0


def _synthesize(args: argparse.Namespace) -> int:
    from ..data.layouts import read_boxes_json
    from ..recipes.bachgan import load_gan_run, synthesize_boxes, to_uint8

    if not Path(args.layout).is_file():
        raise UserError(f"{args.layout}: no such boxes file", argument="--layout")
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise UserError(f"{args.out}: the output must be a .png file", argument="--out")
    if not out.parent.is_dir():
        raise UserError(f"{out.parent}: no such folder for the output image", argument="--out")
    run_ = load_gan_run(args.checkpoint, args.device)
    cfg = run_.model.cfg
    boxes, _ = read_boxes_json(args.layout, run_.class_names, cfg.foreground, (cfg.height, cfg.width))
    image, _ = synthesize_boxes(run_, boxes)
    from PIL import Image

    Image.fromarray(to_uint8(image[None])[0]).save(out)
    print(json.dumps({"out": str(out), "boxes": len(boxes), "size": [cfg.height, cfg.width],
                      "checkpoint": str(run_.folder)}))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from ..recipes.bachgan import evaluate_gan_runs, format_table, load_gan_run

    if args.inception is not None and not Path(args.inception).is_file():
        raise UserError(f"{args.inception}: no such feature-network file", argument="--inception")
    runs = {}
    for path in args.checkpoint:
        r = load_gan_run(path, args.device)
        name = ("BachGAN" if r.model.cfg.retrieval else "no-retrieval ablation") + f" ({Path(path).name})"
        runs[name] = r
    rows = evaluate_gan_runs(runs, args.inception, args.segmenter_steps, progress=not args.no_progress)
    print(format_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0
