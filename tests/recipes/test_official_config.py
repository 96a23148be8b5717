"""--train-config for fine-tuning (official UNITER / VILLA VQA JSONs), explicit flags winning over the JSON (pretrain
and finetune), the head's learning-rate multiplier reaching the head, and the JSON's dropout reaching every dropout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fastvl import cli
from fastvl.cli import finetune as finetune_cmd
from fastvl.cli import pretrain as pretrain_cmd
from fastvl.recipes import FinetuneSettings, finetune
from fastvl.recipes import runner as runner_mod

REFERENCE = Path(__file__).resolve().parents[2].parent / "shared" / "reference-configs"
VQA_JSON = REFERENCE / "uniter-train-vqa-base-4gpu.json"
VILLA_JSON = REFERENCE / "villa-train-vqa-base-4gpu-adv.json"
PRETRAIN_JSON = REFERENCE / "uniter-pretrain-alldata-base-8gpu.json"
SMALL = dict(synthetic_images=24, synthetic_val_images=6)

needs_configs = pytest.mark.skipif(not VQA_JSON.exists(), reason="reference configs not present")


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("FASTVL_CACHE", str(tmp_path_factory.getbasetemp() / "fastvl-cache"))


def _args(argv):
    return cli.build_parser().parse_args(argv)


@needs_configs
def test_finetune_train_config_reads_the_official_hyper_parameters():
    s, table = finetune_cmd.resolve(_args(["finetune", "--task", "vqa", "--train-config", str(VQA_JSON)]))
    official = json.loads(VQA_JSON.read_text())
    assert (s.lr, s.steps, s.warmup_steps) == (official["learning_rate"], official["num_train_steps"],
                                               official["warmup_steps"])
    assert s.batch_tokens == official["train_batch_size"]  # VQA counts train_batch_size in tokens, per GPU
    assert (s.grad_accum, s.grad_clip, s.weight_decay) == (5, 2.0, 0.01)
    assert s.betas == (0.9, 0.98) and s.head_lr_mult == 10.0 and s.dropout == 0.1 and s.config == "base"
    assert s.adv is None and s.seed == 42 and s.max_txt_len == 60 and s.val_every == 500
    assert "JSON train_txt_dbs: not used" in table and "JSON checkpoint: not used" in table


@needs_configs
def test_finetune_villa_json_turns_on_the_adversarial_settings():
    s, table = finetune_cmd.resolve(_args(["finetune", "--task", "vqa", "--train-config", str(VILLA_JSON),
                                           "--adv-steps", "2"]))
    assert s.adv is not None and s.adv["mode"] == "text" and s.adv["norm"] == "l2"
    assert (s.adv["adv_lr_txt"], s.adv["adv_lr_img"], s.adv["adv_max_norm"], s.adv["adv_kl_weight"]) == \
        (1e-3, 1e-3, 0.0, 1.5)
    assert s.adv["adv_steps"] == 2  # the flag wins over the JSON's 3
    row = next(x for x in table.splitlines() if x.startswith("adv.adv_steps"))
    assert row.split()[1:] == ["2", "flag", "3"]


@needs_configs
def test_finetune_flags_win_over_the_json():
    s, table = finetune_cmd.resolve(_args(["finetune", "--task", "vqa", "--train-config", str(VQA_JSON),
                                           "--config", "tiny", "--steps", "5", "--lr", "1e-3", "--head-lr-mult", "1"]))
    assert (s.config, s.steps, s.lr, s.head_lr_mult) == ("tiny", 5, 1e-3, 1.0)
    assert s.warmup_steps == 600  # not given: the JSON's
    rows = {r.split()[0]: r.split()[1:] for r in table.splitlines()[1:] if not r.startswith("JSON ")}
    assert rows["config"] == ["tiny", "flag", "base"] and rows["warmup_steps"] == ["600", "JSON", "600"]
    assert rows["val_batches"] == ["None", "default"]


@needs_configs
def test_pretrain_flag_wins_over_the_json():
    args = _args(["pretrain", "--train-config", str(PRETRAIN_JSON), "--config", "tiny", "--steps", "3"])
    s, table = pretrain_cmd.resolve(args)
    assert s.config == "tiny" and s.steps == 3 and s.lr == 5e-5 and s.batch_tokens == 10240
    rows = {r.split()[0]: r.split()[1:] for r in table.splitlines()[1:] if not r.startswith("JSON ")}
    assert rows["config"] == ["tiny", "flag", "base"] and rows["lr"] == ["5e-05", "JSON", "5e-05"]
    s, _ = pretrain_cmd.resolve(_args(["pretrain", "--train-config", str(PRETRAIN_JSON)]))
    assert s.config == "base"


class _Captured(Exception):
    pass


def _capture_trainer(monkeypatch):
    """Patch the runner's Trainer to stop after construction and hand the instance back."""
    real = runner_mod.Trainer

    def build(*a, **kw):
        tr = real(*a, **kw)
        raise _Captured(tr)

    monkeypatch.setattr(runner_mod, "Trainer", build)


def _trainer(monkeypatch, tmp_path, **over):
    _capture_trainer(monkeypatch)
    s = FinetuneSettings(task="vqa", output=str(tmp_path / "run"), steps=1, batch_tokens=400, progress=False,
                         options=dict(SMALL), **over)
    with pytest.raises(_Captured) as info:
        finetune(s, log=lambda m: None)
    return info.value.args[0]


def _mults(trainer):
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    out = {}
    for g in trainer.optimizer.param_groups:
        for p in g["params"]:
            out[names[id(p)]] = g["lr_mult"]
    return out


@pytest.mark.parametrize("adv", [None, {"adv_steps": 1}])
def test_head_lr_mult_reaches_the_head(adv, monkeypatch, tmp_path):
    mults = _mults(_trainer(monkeypatch, tmp_path, head_lr_mult=10.0, adv=adv))
    head = {n: m for n, m in mults.items() if n.startswith("vqa_output.")}
    body = {n: m for n, m in mults.items() if n.startswith("uniter.")}
    assert head and set(head.values()) == {10.0}
    assert body and set(body.values()) == {1.0}


def test_default_head_lr_mult_leaves_the_groups_alone(monkeypatch, tmp_path):
    tr = _trainer(monkeypatch, tmp_path)
    assert {g["lr_mult"] for g in tr.optimizer.param_groups} == {1.0} and len(tr.optimizer.param_groups) == 2


def test_dropout_reaches_every_dropout(monkeypatch, tmp_path):
    tr = _trainer(monkeypatch, tmp_path, dropout=0.25)
    drops = [m.p for m in tr.model.modules() if isinstance(m, torch.nn.Dropout)]
    attn = [m.dropout_p for m in tr.model.modules() if isinstance(getattr(m, "dropout_p", None), float)]
    assert drops and attn and set(drops) == set(attn) == {0.25}
    default = _trainer(monkeypatch, tmp_path / "d")
    cfg = default.model.uniter.config
    assert {m.p for m in default.model.modules() if isinstance(m, torch.nn.Dropout)} == {cfg.hidden_dropout_prob}


@needs_configs
def test_pretrain_settings_from_args_keeps_an_explicit_tiny(tmp_path):
    """`--config tiny` given explicitly with a base JSON trains tiny (it used to be dropped for being the default)."""
    args = _args(["pretrain", "--train-config", str(PRETRAIN_JSON), "--config", "tiny", "--txt-db", str(tmp_path),
                  "--img-db", str(tmp_path)])
    assert pretrain_cmd.settings_from_args(args).config == "tiny"
