"""``fastvl pretrain --model hero``: pre-train HERO on the built-in synthetic corpus or the user's data."""

from __future__ import annotations

import argparse

from .errors import UserError

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse._ArgumentGroup) -> None:
    """The options of this model family (the run options of ``fastvl pretrain`` are shared)."""


def run(args: argparse.Namespace) -> int:
    raise UserError("HERO pre-training is being built (issue tracker); it is not available in this version",
                    argument="--model")
