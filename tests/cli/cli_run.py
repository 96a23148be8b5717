"""The CLI tests' one way to run ``fastvl``: exit code, stdout and stderr of ``cli.main(argv)``."""

from __future__ import annotations

from fastvl import cli


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``fastvl <argv>``; argparse errors (SystemExit) give their exit code."""
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse errors exit from parse_args
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err
