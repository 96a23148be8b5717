"""`fastvl pretrain --model lxmert` (tiny corpora, a few steps): the run folder (checkpoints, an LXMERT model config
that loads back), validation lines, `--adv` through the generic VILLA loop, bad input (another family's checkpoint)."""

from __future__ import annotations

import json

import pytest
import torch

from fastvl import cli
from fastvl.models.lxmert import LxmertForPreTraining
from fastvl.recipes.lxmert_pretrain import load_lxmert_run
from fastvl.train import checkpoint as ckpt

SMALL = ["--steps", "3", "--batch-tokens", "400", "--warmup-steps", "1", "--log-every", "1", "--val-every", "0",
         "--ckpt-every", "0", "--no-progress", "--lxmert-synthetic-images", "24", "6"]


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("FASTVL_CACHE", str(tmp_path_factory.getbasetemp() / "fastvl-cache"))


def _run(args: list[str], capsys) -> tuple[int, str, str]:
    code = cli.main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.slow
def test_pretrain_lxmert_run_folder_loads_back(tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, err = _run(["pretrain", "--model", "lxmert", "--output", str(out), *SMALL], capsys)
    assert code == 0, stdout + err
    final = json.loads(next(x for x in stdout.splitlines() if x.startswith("final validation:"))
                       .removeprefix("final validation:"))
    for k in ("val/itm_acc", "val/mlm_words_acc", "val/mrc_acc", "val/qa_acc"):
        assert 0.0 <= final[k] <= 1.0
    cfg = json.loads((out / "model_config.json").read_text())
    assert cfg["model_type"] == "lxmert" and cfg["l_layers"] == 2
    model, folder = load_lxmert_run(out)
    assert isinstance(model, LxmertForPreTraining) and folder == ckpt.latest_checkpoint(out)
    from safetensors.torch import load_file

    saved = load_file(str(folder / "model.safetensors"))
    own = model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in saved.items())
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "task" in m]
    assert len(steps) == 3 and all(m["task"] in ("itm", "mlm", "mrc", "mrfr", "qa") for m in steps)
    assert all(m["loss"] == m["loss"] and m["loss"] > 0 for m in steps)


@pytest.mark.slow
def test_pretrain_lxmert_adv(tmp_path, capsys):
    code, stdout, err = _run(["pretrain", "--model", "lxmert", "--output", str(tmp_path / "adv"), "--adv",
                              "--adv-steps", "2", "--lxmert-tasks", "itm:1,mrfr:1", *SMALL], capsys)
    assert code == 0, stdout + err
    assert "adversarial pre-training (VILLA)" in stdout
    metrics = [json.loads(x) for x in (tmp_path / "adv" / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert len(losses) == 3 and all(v == v for v in losses)


def test_bad_input_is_one_line(tmp_path, capsys):
    from fastvl.models.uniter import UniterConfig, UniterForPretraining

    uniter = UniterForPretraining(UniterConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                               num_attention_heads=2, intermediate_size=32), 12, 5)
    path = tmp_path / "uniter.pt"
    torch.save(uniter.state_dict(), path)
    code, _, err = _run(["pretrain", "--model", "lxmert", "--output", str(tmp_path / "x"), "--init-checkpoint",
                         str(path), *SMALL], capsys)
    assert code == 2 and "--init-checkpoint" in err and "looks like a UNITER checkpoint" in err
    code, _, err = _run(["pretrain", "--model", "lxmert", "--lxmert-tasks", "itm:1,mrc-kl:1", *SMALL], capsys)
    assert code == 2 and "--lxmert-tasks" in err and "mrc-kl" in err
    code, _, err = _run(["pretrain", "--model", "lxmert", "--ot-lambda", "0.2", *SMALL], capsys)
    assert code == 2 and "--ot-lambda" in err
    # a UNITER run folder is not an LXMERT run
    run = tmp_path / "uniter-run"
    run.mkdir()
    uniter.config.to_json_file(run / "model_config.json")
    with pytest.raises(ckpt.CheckpointError, match="UNITER run"):
        load_lxmert_run(run)
