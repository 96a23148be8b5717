"""User errors of the ``fastvl`` command and how :func:`fastvl.cli.main` reports them.

A user error (a bad value, a missing file or folder, the wrong kind of checkpoint, bad data) ends the command with ONE
line on stderr, ``fastvl <command>: error: <message naming the argument and the path>``, and exit code 2. Anything
else is a bug and keeps its traceback (``--debug`` keeps the traceback of user errors too).

User errors are :class:`UserError` (raised by the commands' own checks) and the errors the lower layers raise for
bad input: :class:`fastvl.data.DataError`, :class:`fastvl.recipes.base.SettingsError`,
:class:`fastvl.train.checkpoint.CheckpointError` and the "no such file" family of :class:`OSError`.
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import Any

from ..data import DataError
from ..recipes.base import SettingsError
from ..train.checkpoint import CheckpointError

__all__ = ["USER_ERRORS", "UserError", "argument_of", "error_line", "report"]


class UserError(Exception):
    """A mistake in what the user asked for. ``argument`` (e.g. ``"--checkpoint"``) is named first in the message."""

    def __init__(self, message: str, argument: str | None = None):
        self.argument = argument
        super().__init__(f"argument {argument}: {message}" if argument else message)


#: The exception types that are user errors (exit code 2, one line, no traceback).
USER_ERRORS: tuple[type[BaseException], ...] = (UserError, DataError, SettingsError, CheckpointError,
                                                FileNotFoundError, NotADirectoryError, IsADirectoryError,
                                                FileExistsError, PermissionError)

_PREFIX = re.compile(r"^(fastvl(\.\w+)* [\w-]+( --task \w+)?: (error: )?)+")
_LEADING_FLAG = re.compile(r"^(--[\w-]+):? (?=\S)")


def _paths_in(value: Any) -> list[str]:
    if isinstance(value, str) and value:
        return [value]
    if isinstance(value, list | tuple):
        return [v for v in value if isinstance(v, str) and v]
    return []


def argument_of(args: argparse.Namespace, text: str) -> str | None:
    """The option (``--txt-db``) whose value (a path) ``text`` mentions; the longest such value wins."""
    best, best_len = None, 0
    for dest, value in vars(args).items():
        if dest in ("command", "task", "device", "precision", "opt"):
            continue
        for path in _paths_in(value):
            if len(path) > best_len and (path in text or path.rstrip("/") in text) and len(path.rstrip("/")) > 1:
                best, best_len = "--" + dest.replace("_", "-"), len(path)
    return best


def error_line(command: str, err: BaseException, args: argparse.Namespace | None = None) -> str:
    """The one line reporting user error ``err`` of ``fastvl <command>``."""
    if isinstance(err, OSError) and err.filename is not None and str(err.filename) not in str(err.strerror or ""):
        msg = f"{err.filename}: {err.strerror}" if err.strerror else str(err)
    else:
        msg = str(err.args[0]) if len(err.args) == 1 and isinstance(err.args[0], str) else str(err)
    msg = _PREFIX.sub("", " ".join(msg.split()))
    msg = _LEADING_FLAG.sub(r"argument \1: ", msg)
    if args is not None and not isinstance(err, UserError):
        arg = argument_of(args, msg if not isinstance(err, DataError) else f"{err.db} {msg}")
        if arg is not None and arg not in msg:
            msg = f"argument {arg}: {msg}"
    return f"fastvl {command}: error: {msg}"


def report(command: str, err: BaseException, args: argparse.Namespace | None = None) -> int:
    """Print :func:`error_line` to stderr; returns the exit code 2."""
    print(error_line(command, err, args), file=sys.stderr)
    return 2
