"""User errors of every kind end a command with ONE stderr line ``fastvl <command>: error: ...`` naming the argument
and the path, and exit code 2 (no traceback); ``--debug`` re-raises."""

from __future__ import annotations

import json

import pytest
import torch
from cli_run import run_cli

from fastvl import cli
from fastvl.models.uniter import UniterForPretraining
from fastvl.models.uniter.testing import tiny_config
from fastvl.train import checkpoint as ckpt


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A pretrain-shaped run folder, a finetune-shaped run folder (task vqa) and a txt_db folder without meta.json."""
    root = tmp_path_factory.mktemp("runs")
    cfg = tiny_config()
    torch.manual_seed(0)
    pre = root / "pretrain-run"
    pre.mkdir()
    cfg.to_json_file(pre / "model_config.json")
    ckpt.save_checkpoint(pre, 3, UniterForPretraining(cfg, cfg.img_dim, cfg.img_label_dim), {"step": 3})
    fin = root / "finetune-run"
    fin.mkdir()
    cfg.to_json_file(fin / "model_config.json")
    (fin / "finetune.json").write_text(json.dumps({"task": "vqa", "dims": {}, "info": {}}))
    (fin / "settings.json").write_text(json.dumps({"task": "vqa"}))
    ckpt.save_checkpoint(fin, 3, torch.nn.Linear(2, 2), {"step": 3})
    nometa = root / "txt_without_meta.db"
    nometa.mkdir()
    return {"pretrain": pre, "finetune": fin, "nometa": nometa, "root": root}


def _cases(r):
    missing = r["root"] / "no_such_dir"
    return {
        # bad values (parser range checks and names)
        "negative steps": (["pretrain", "--steps", "-5"], "--steps", "-5"),
        "zero batch tokens": (["finetune", "--task", "vqa", "--batch-tokens", "0"], "--batch-tokens", "0"),
        "unknown config": (["pretrain", "--config", "nosuch"], "--config", "nosuch"),
        "bad --opt": (["finetune", "--task", "vqa", "--opt", "novalue"], "--opt", "novalue"),
        "bad task mix": (["pretrain", "--tasks", "itm:x"], "--tasks", "itm:x"),
        # missing files
        "missing checkpoint": (["eval", "--checkpoint", str(missing / "run")], "--checkpoint", str(missing / "run")),
        "missing train config": (["pretrain", "--train-config", str(missing / "x.json")], "--train-config",
                                 str(missing / "x.json")),
        "missing init": (["finetune", "--task", "vqa", "--init", str(missing / "w.pt")], "--init",
                         str(missing / "w.pt")),
        # missing folders
        "missing txt_db": (["pretrain", "--txt-db", str(missing), "--img-db", str(r["root"])], "--txt-db",
                           str(missing)),
        "missing data": (["finetune", "--task", "vqa", "--data", str(missing)], "--data", str(missing)),
        # wrong kind of checkpoint
        "finetune run to eval pretrain": (["eval", "--task", "pretrain", "--checkpoint", str(r["finetune"])],
                                          "--checkpoint", str(r["finetune"])),
        "pretrain run to eval vqa": (["eval", "--task", "vqa", "--checkpoint", str(r["pretrain"])], "--checkpoint",
                                     str(r["pretrain"])),
        "vqa run to eval ve": (["eval", "--task", "ve", "--checkpoint", str(r["finetune"])], "--checkpoint",
                               str(r["finetune"])),
        # bad data
        "txt_db without meta": (["pretrain", "--txt-db", str(r["nometa"]), "--img-db", str(r["root"]), "--steps", "1",
                                 "--no-progress", "--output", str(r["root"] / "out")], "--txt-db", str(r["nometa"])),
    }


CASES = ["negative steps", "zero batch tokens", "unknown config", "bad --opt", "bad task mix", "missing checkpoint",
         "missing train config", "missing init", "missing txt_db", "missing data", "finetune run to eval pretrain",
         "pretrain run to eval vqa", "vqa run to eval ve", "txt_db without meta"]


@pytest.mark.parametrize("case", CASES)
def test_user_error_is_one_line_naming_the_argument(case, runs, capsys):
    argv, argument, path = _cases(runs)[case]
    code, _, err = run_cli(argv, capsys)
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith(f"fastvl {argv[0]}: error: "), lines[0]
    assert f"argument {argument}" in lines[0] and path in lines[0], lines[0]
    assert "Traceback" not in err


def test_wrong_kind_of_checkpoint_says_which_task(runs, capsys):
    _, _, err = run_cli(["eval", "--task", "pretrain", "--checkpoint", str(runs["finetune"])], capsys)
    assert "finetune run (task vqa)" in err and "--task vqa" in err
    _, _, err = run_cli(["eval", "--task", "vqa", "--checkpoint", str(runs["pretrain"])], capsys)
    assert "pretrain run" in err and "--task pretrain" in err


def test_debug_keeps_the_traceback(runs):
    with pytest.raises(cli.UserError, match="--checkpoint"):
        cli.main(["eval", "--debug", "--checkpoint", str(runs["root"] / "no_such_dir")])


def test_a_bug_is_not_a_user_error(monkeypatch):
    from fastvl.cli import info

    def broken(args):
        raise KeyError("a bug")

    monkeypatch.setattr(info, "run", broken)
    with pytest.raises(KeyError):
        cli.main(["info"])
