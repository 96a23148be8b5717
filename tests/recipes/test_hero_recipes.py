"""HERO-family jobs end to end, a few steps each on the synthetic video corpus: HERO pre-training (plain and VILLA),
each HERO fine-tuning task (one from the pre-training run via --init), and the VIOLIN baseline."""

import json

import pytest

from fastvl.recipes import FinetuneSettings, finetune
from fastvl.recipes.hero_pretrain import HeroPretrainSettings, hero_pretrain

pytestmark = pytest.mark.slow


def _quiet(*a, **k):
    pass


@pytest.fixture(scope="module")
def pretrain_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("hero-pre")
    res = hero_pretrain(HeroPretrainSettings(steps=4, val_every=4, ckpt_every=4, val_batches=1, max_frames=60,
                                             output=str(out), progress=False), log=_quiet)
    return out, res


def test_pretrain_runs_and_validates(pretrain_run):
    out, res = pretrain_run
    assert len(res["history"]) == 4
    assert {h["task"] for h in res["history"]} <= {"mlm", "mfm-nce", "fom", "vsm"}
    v = res["validation"]
    assert {"mlm_acc", "mfm-nce_acc", "fom_acc", "vsm_r1"} <= set(v)
    assert all(0.0 <= v[k] <= 1.0 for k in ("mlm_acc", "mfm-nce_acc", "fom_acc", "vsm_r1"))
    assert (out / "model_config.json").is_file() and (out / "checkpoints").is_dir()
    assert json.loads((out / "model_config.json").read_text())["f_config"]["hidden_size"] == 64


def test_pretrain_villa(tmp_path):
    res = hero_pretrain(HeroPretrainSettings(steps=2, val_every=0, ckpt_every=2, val_batches=1, max_frames=40,
                                             tasks="mlm:1,mfm-nce:1", output=str(tmp_path), progress=False,
                                             adv={"adv_steps": 2, "mode": "both"}), log=_quiet)
    assert len(res["history"]) == 2
    assert any("adv_task_loss" in k for h in res["history"] for k in h)


@pytest.mark.parametrize("task", ["tvr", "videoqa", "violin", "tvc"])
def test_hero_finetune_runs(task, tmp_path, pretrain_run):
    init = str(pretrain_run[0]) if task == "videoqa" else None
    s = FinetuneSettings(model="hero", task=task, steps=2, val_every=2, ckpt_every=2, val_batches=1,
                         output=str(tmp_path), progress=False, init=init,
                         options={"max_frames": 160 if task == "videoqa" else 64, "max_gen_step": 4,
                                  "train_videos": 24})  # VIOLIN defaults to 1200 videos
    res = finetune(s, log=_quiet)
    assert res["metric"] is not None and 0.0 <= res["metric"] <= 1e3
    assert res["chance"] >= 0.0
    assert (tmp_path / "model_config.json").is_file()


def test_violin_baseline_runs(tmp_path):
    s = FinetuneSettings(model="violin-baseline", task="violin", steps=2, val_every=2, ckpt_every=2, val_batches=1,
                         output=str(tmp_path / "run"), progress=False,
                         options={"text_pretrain_steps": 3, "cache_dir": str(tmp_path), "batch_size": 4})
    res = finetune(s, log=_quiet)
    assert res["chance"] == 0.5 and 0.0 <= res["metric"] <= 1.0
    assert list(tmp_path.glob("violin-text-encoder-*.pt"))  # the small text encoder is cached
