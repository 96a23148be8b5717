"""`fastvl finetune` and `fastvl eval` on every fine-tuning task (tiny shapes, synthetic data), from a pretrain-shaped
run folder, with bad input; `fastvl eval --task pretrain` still works."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from fastvl import cli
from fastvl.data import TxtDB, TxtDBWriter
from fastvl.data.finetune_synthetic import FinetuneSynthConfig, finetune_synthetic
from fastvl.data.synthetic import SyntheticConfig, synthetic_corpus
from fastvl.models.uniter import UniterForPretraining
from fastvl.models.uniter.testing import tiny_config
from fastvl.train import checkpoint as ckpt

TASKS = ("vqa", "gqa", "ve", "nlvr2", "itr", "re", "vcr")
SMALL = ["--opt", "synthetic_images=24", "--opt", "synthetic_val_images=6", "--opt", "eval_images=6"]


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("FASTVL_CACHE", str(tmp_path_factory.getbasetemp() / "fastvl-cache"))


def _run(args: list[str], capsys) -> tuple[int, str, str]:
    code = cli.main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def _finetune(task, out, capsys, *extra):
    args = ["finetune", "--task", task, "--output", str(out), "--steps", "3", "--batch-tokens", "400",
            "--warmup-steps", "1", "--log-every", "1", "--val-every", "0", "--ckpt-every", "0", "--no-progress",
            *SMALL, *extra]
    code, stdout, err = _run(args, capsys)
    line = next((x for x in stdout.splitlines() if x.startswith("final: ")), None)
    return code, (json.loads(line.removeprefix("final: ")) if line else None), stdout + err


@pytest.fixture(scope="module")
def pretrain_run(tmp_path_factory):
    """A `fastvl pretrain`-shaped run folder of a random tiny model fitting the synthetic data, plus a tiny
    pre-training corpus for `fastvl eval --task pretrain`."""
    root = tmp_path_factory.mktemp("pt")
    corpus = synthetic_corpus(root / "cache", SyntheticConfig(n_train_images=6, n_val_images=4))
    cfg = tiny_config(vocab_size=corpus.vocab_size, img_dim=corpus.img_dim, img_label_dim=corpus.img_label_dim)
    torch.manual_seed(0)
    run = root / "run"
    run.mkdir()
    cfg.to_json_file(run / "model_config.json")
    ckpt.save_checkpoint(run, 7, UniterForPretraining(cfg, cfg.img_dim, cfg.img_label_dim), {"step": 7})
    return run, corpus


@pytest.mark.parametrize("task", TASKS)
def test_finetune_and_eval_every_task(task, tmp_path, pretrain_run, capsys):
    run, _ = pretrain_run
    code, final, text = _finetune(task, tmp_path / task, capsys, "--init", str(run))
    assert code == 0, text
    assert "init: loaded" in text and final["task"] == task
    assert final["value"] is not None and final["chance"] > 0
    assert (tmp_path / task / "metrics.jsonl").is_file() and ckpt.latest_checkpoint(tmp_path / task) is not None
    code, stdout, err = _run(["eval", "--task", task, "--checkpoint", str(tmp_path / task)], capsys)
    assert code == 0, err
    got = json.loads(stdout)
    assert got[final["metric"]] == pytest.approx(final["value"], abs=1e-4)  # printed to 4 decimals


def test_same_command_same_weights(tmp_path, capsys):
    from safetensors.torch import load_file

    for name in ("a", "b"):
        assert _finetune("ve", tmp_path / name, capsys)[0] == 0
    a = load_file(str(ckpt.latest_checkpoint(tmp_path / "a") / "model.safetensors"))
    b = load_file(str(ckpt.latest_checkpoint(tmp_path / "b") / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_adversarial_finetune(tmp_path, capsys):
    code, final, text = _finetune("vqa", tmp_path / "adv", capsys, "--adv", "--adv-steps", "2",
                                  "--adv-modality", "both")
    assert code == 0, text
    assert "adversarial fine-tuning (VILLA)" in text
    recs = [json.loads(x) for x in (tmp_path / "adv" / "metrics.jsonl").read_text().splitlines()]
    assert any("vqa/adv_kl" in r for r in recs)
    assert json.loads((tmp_path / "adv" / "settings.json").read_text())["adv"]["adv_steps"] == 2


def test_eval_pretrain_still_works(pretrain_run, capsys):
    run, corpus = pretrain_run
    code, stdout, err = _run(["eval", "--checkpoint", str(run), "--txt-db", str(corpus.txt_val), "--img-db",
                              str(corpus.img_db), "--batches", "2"], capsys)
    assert code == 0, err
    assert "itm_acc" in json.loads(stdout)


def test_unknown_task(capsys):
    with pytest.raises(SystemExit):
        cli.main(["finetune", "--task", "nope"])
    assert "invalid choice: 'nope'" in capsys.readouterr().err


def _nlvr2_data_with_a_missing_image(root):
    """A --data folder (txt_db/{train,val}.db + img_db/img_db) whose training split has one NLVR2 statement with its
    right image missing from the img_db."""
    syn = finetune_synthetic(config=FinetuneSynthConfig(n_train_images=24, n_val_images=6))
    shutil.copytree(syn.img_db, root / "img_db" / "img_db")
    for split in ("train", "val"):
        src = TxtDB(syn.txt_db("nlvr2", split), -1)
        with TxtDBWriter(root / "txt_db" / f"{split}.db", src.meta) as w:
            for id_ in src.ids:
                w.put(id_, src[id_])
            if split == "train":
                rec = dict(src[src.ids[0]])
                rec["img_fname"] = [rec["img_fname"][0], "no_such_image.npz"]
                w.put("broken", rec)
    return root


def test_bad_input_error_and_skip(tmp_path, capsys):
    data = _nlvr2_data_with_a_missing_image(tmp_path / "data")
    code, final, text = _finetune("nlvr2", tmp_path / "run", capsys, "--data", str(data))
    assert code == 2 and final is None
    assert "no_such_image.npz" in text and "NLVR2 example 'broken'" in text and "img_db" in text
    code, final, text = _finetune("nlvr2", tmp_path / "run2", capsys, "--data", str(data), "--skip-bad-examples")
    assert code == 0, text
    assert final["bad_examples"] == {"missing_image": 1}


def test_option_parsing():
    from fastvl.cli.options import parse_options

    assert parse_options(["a=1", "b=0.5", "c=triplet", "d=true", "e=[1, 2]"]) == \
        {"a": 1, "b": 0.5, "c": "triplet", "d": True, "e": [1, 2]}
    with pytest.raises(cli.UserError, match="argument --opt: expects key=value"):
        parse_options(["novalue"])
