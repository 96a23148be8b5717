"""``fastvl probe``: VALUE probes of a pre-trained UNITER or LXMERT (what the model learned), each beside a
random-weights control of the same architecture; writes probes.json, probes.csv and PNG plots."""

from __future__ import annotations

import argparse

from ..probe.run import probe_checkpoint
from ..probe.suite import ProbeSettings
from .errors import UserError
from .options import check_paths, positive_int

__all__ = ["HELP", "add_arguments", "run"]

HELP = "VALUE probes of a pre-trained UNITER or LXMERT (what the model learned)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``fastvl probe``."""
    p.add_argument("--model", default="uniter", choices=["uniter", "lxmert"], help="model family (default uniter)")
    p.add_argument("--checkpoint", required=True,
                   help="a fastvl pretrain run folder (or its checkpoints/step_*), or a checkpoint file (.pt / "
                        ".safetensors, e.g. an official one)")
    p.add_argument("--out", required=True, help="folder for probes.json, probes.csv and the plots")
    p.add_argument("--config", default=None, help="model config JSON for a checkpoint file (default: a "
                                                  "model_config.json / config.json beside it, else sizes read from "
                                                  "the weights)")
    p.add_argument("--split", default="val", choices=["val", "train"], help="synthetic-corpus split to probe on")
    p.add_argument("--examples", type=positive_int, default=None, help="captions to probe (default: the whole split)")
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--folds", type=positive_int, default=5, help="cross-validation folds of the linear probes")
    p.add_argument("--seed", type=int, default=0, help="control weights, k-means, folds, negative sampling")
    p.add_argument("--controls", type=positive_int, default=3, help="random-weights controls (seeds seed, seed+1, "
                                                                    "...); the headline gives their mean and std")
    p.add_argument("--compare", nargs="*", default=[], help="probes.json of other runs to draw in the NMI plot")
    p.add_argument("--save-maps", default=None, help="also stream the trained model's attention maps and hidden "
                                                     "states to this folder (one shard per batch)")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    """Probe the checkpoint and print the headline figures."""
    check_paths("--checkpoint", args.checkpoint, kind="any")
    check_paths("--compare", args.compare, kind="file")
    check_paths("--config", args.config, kind="file")
    if args.folds < 2:
        raise UserError(f"must be >= 2, got {args.folds}", argument="--folds")
    s = ProbeSettings(batch_size=args.batch_size, seed=args.seed, folds=args.folds, controls=args.controls)
    doc = probe_checkpoint(args.model, args.checkpoint, args.out, s, args.split, args.examples, args.device,
                           args.compare, not args.no_progress, args.config, args.save_maps)
    print(f"{'figure':38s} {'trained':>8s} {'control (mean +- std)':>22s} {'chance':>8s}")
    for name, v in doc["headline"].items():
        if "skipped" in v:
            print(f"{name:38s} skipped: {v['skipped']}")
            continue
        ctrl = f"{v['control']:.3f} +- {v['control_std']:.3f}" if v.get("control") is not None else ""
        chance = f"{v['chance']:8.3f}" if v.get("chance") is not None else ""
        print(f"{name:38s} {v['trained']:8.3f} {ctrl:>22s} {chance:>8s}" + (f"  of {v['of']} heads" if "of" in v
                                                                            else ""))
    print(f"(control: {args.controls} random-weights draw(s) of the same architecture, seeds {args.seed}.."
          f"{args.seed + args.controls - 1})")
    print("plots:\n  " + "\n  ".join(doc["plots"]))
    return 0
