"""HERO-family job helpers: the tiny config, an official config JSON, --init loading and its errors."""

import json

import numpy as np
import pytest
import torch

from fastvl.data.video import VideoSyntheticConfig
from fastvl.data.video.synthetic import generate_videos
from fastvl.models.hero import HeroForPretraining, HeroForVideoQA
from fastvl.recipes.base import SettingsError
from fastvl.recipes.hero_common import hero_config, hero_tiny_config, load_hero_init, video_data_paths


def test_tiny_config_and_official_json(tmp_path):
    raw = hero_tiny_config(61)
    assert raw["f_config"]["vocab_size"] == 64 and raw["q_config"]["num_hidden_layers"] == 0
    assert hero_config(None, 61).f_config.hidden_size == 64
    path = tmp_path / "hero_finetune.json"
    path.write_text(json.dumps(hero_tiny_config(100, hidden=32, heads=2)))
    assert hero_config(str(path), 61).f_config.hidden_size == 32
    with pytest.raises(SettingsError, match="vocab_size 104 is smaller"):
        hero_config(str(path), 200)
    with pytest.raises(SettingsError, match="not 'tiny' nor an official config JSON"):
        hero_config(str(tmp_path / "none.json"), 61)


def test_load_init_from_pretraining_state(tmp_path):
    cfg = hero_config(None, 61)
    pre = HeroForPretraining(cfg, 12, 100)
    qa = HeroForVideoQA(cfg, 12, 100)
    stats = load_hero_init(qa, {k: v.clone() for k, v in pre.state_dict().items()}, log=lambda *a: None)
    assert stats["loaded"] > 0 and stats["missing"] > 0  # the QA heads keep their initialisation
    for k, v in qa.state_dict().items():
        if k in pre.state_dict():
            assert torch.equal(v, pre.state_dict()[k]), k
    other = HeroForPretraining(hero_config(None, 200), 12, 100)
    with pytest.raises(SettingsError, match="another shape"):
        load_hero_init(qa, other.state_dict(), log=lambda *a: None)
    with pytest.raises(SettingsError, match="no weight matches"):
        load_hero_init(qa, {"foo.weight": torch.zeros(1)}, log=lambda *a: None)


def test_video_data_paths_needs_both():
    with pytest.raises(SettingsError, match="both a video db and a subtitle db"):
        video_data_paths("/tmp", None)


def test_video_data_paths_qa_events(tmp_path):
    """--opt qa_events picks the synthetic corpus with that many TVQA questions / VIOLIN pairs per video."""
    with pytest.raises(SettingsError, match="qa_events=x"):
        video_data_paths(None, None, str(tmp_path), "x")
    with pytest.raises(SettingsError, match="qa_events=-1"):
        video_data_paths(None, None, str(tmp_path), -1)
    p = video_data_paths(None, None, str(tmp_path), "0")
    counts = p["corpus"].info["counts"]["train"]
    assert p["corpus"].config.qa_events == 0 and counts["tvqa"] > 2 * counts["videos"]
    assert counts["violin"] == 2 * counts["tvqa"] and counts["tvr"] <= 2 * counts["videos"]


def test_video_data_paths_train_videos(tmp_path):
    """--opt train_videos sizes the synthetic training split; its first videos and the validation split are those
    of the default corpus (per-video seeds)."""
    for bad in ("x", 1):
        with pytest.raises(SettingsError, match=f"train_videos={bad}"):
            video_data_paths(None, None, str(tmp_path), None, bad)
    small = video_data_paths(None, None, str(tmp_path), None, "4")["corpus"]
    bigger = video_data_paths(None, None, str(tmp_path), None, 6)["corpus"]
    assert small.config.n_train_videos == 4 and bigger.config.n_train_videos == 6
    assert small.info["counts"]["train"]["videos"] == 4 and bigger.info["counts"]["train"]["videos"] == 6
    assert small.vids("train") == bigger.vids("train")[:4] and small.vids("val") == bigger.vids("val")
    a, b = (generate_videos(VideoSyntheticConfig(n_train_videos=n), "train")[3] for n in (4, 6))
    assert a["subs"] == b["subs"] and np.array_equal(a["features"], b["features"])
