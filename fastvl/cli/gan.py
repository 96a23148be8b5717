"""``fastvl gan``: BachGAN: train | synthesize | eval (images from object box layouts)."""

from __future__ import annotations

import argparse

from .errors import UserError

__all__ = ["HELP", "add_arguments", "run"]

HELP = "BachGAN: train | synthesize | eval (images from object box layouts)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``fastvl gan``."""


def run(args: argparse.Namespace) -> int:
    raise UserError("BachGAN are being built (issue tracker); not available in this version")
