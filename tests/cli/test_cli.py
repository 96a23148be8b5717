"""The `fastvl` command line."""

import json

from fastvl import cli


def test_info_json(capsys):
    assert cli.main(["info", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert "ipot" in rep["ops"]


def test_bench_lists_benchmarks(capsys):
    assert cli.main(["bench"]) == 0
    assert "ot" in capsys.readouterr().out


def test_unknown_benchmark_is_an_error(capsys):
    assert cli.main(["bench", "nope"]) == 2
    assert "unknown benchmark 'nope'" in capsys.readouterr().err


def test_no_command_prints_help(capsys):
    assert cli.main([]) == 2
    assert "usage: fastvl" in capsys.readouterr().out
