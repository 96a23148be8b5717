"""``fastvl probe``: VALUE probes of a pre-trained UNITER or LXMERT (what the model learned)."""

from __future__ import annotations

import argparse

from .errors import UserError

__all__ = ["HELP", "add_arguments", "run"]

HELP = "VALUE probes of a pre-trained UNITER or LXMERT (what the model learned)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``fastvl probe``."""


def run(args: argparse.Namespace) -> int:
    raise UserError("the VALUE probes are being built (issue tracker); not available in this version")
