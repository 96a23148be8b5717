"""``fastvl pretrain --model hero`` / ``fastvl finetune --model hero|violin-baseline``: user errors are one line naming
the argument (exit 2), and a tiny pre-training run works from the command line."""

import pytest
from cli_run import run_cli


@pytest.mark.parametrize("argv, needle", [
    (["--txt-db", "/tmp"], "argument --txt-db: is a UNITER option"),
    (["--video-db", "/no/such/db"], "argument --video-db: /no/such/db: no such folder"),
    (["--video-db", "/tmp"], "give both --video-db and --sub-db"),
    (["--video-tasks", "mlm:2,itm:1"], "unknown tasks ['itm']"),
    (["--config", "/no/such.json"], "argument --config: /no/such.json: no such file"),
    (["--drop-svmr-prob", "1.5"], "argument --drop-svmr-prob"),
])
def test_pretrain_hero_errors(argv, needle, capsys):
    code, _, err = run_cli(["pretrain", "--model", "hero", *argv], capsys)
    assert code == 2
    assert needle in err and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("argv, needle", [
    (["--model", "hero", "--task", "vqa"], "model 'hero' has no task 'vqa'"),
    (["--model", "hero", "--task", "tvr", "--opt", "video_db=/no/vdb"], "give --opt sub_db=PATH too"),
    (["--model", "hero", "--task", "violin", "--data", "/tmp"], "no video_db"),
    (["--model", "violin-baseline", "--task", "violin", "--opt", "bert=/no/bert.bin"], "/no/bert.bin"),
])
def test_finetune_hero_errors(argv, needle, capsys, tmp_path):
    code, _, err = run_cli(["finetune", *argv, "--steps", "1", "--output", str(tmp_path / "o"), "--opt",
                            "text_pretrain_steps=1", "--opt", f"cache_dir={tmp_path}"], capsys)
    assert code == 2, err
    assert needle in err and "Traceback" not in err


@pytest.mark.slow
def test_pretrain_hero_cli_runs(capsys, tmp_path):
    code, out, _ = run_cli(["pretrain", "--model", "hero", "--steps", "2", "--val-every", "2", "--video-val-batches",
                            "1", "--max-frames", "40", "--output", str(tmp_path), "--no-progress"], capsys)
    assert code == 0
    assert "synthetic video corpus" in out and "final validation:" in out and "vsm_r1" in out
