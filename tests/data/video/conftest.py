"""Fixtures of the HERO data tests: the hand-built dbs of hero_dbs.py and a tiny synthetic video corpus."""

import pytest
from hero_dbs import write_hand_dbs

from fastvl.data.video import VideoSyntheticConfig, video_synthetic_corpus


@pytest.fixture(scope="session")
def hand_dbs(tmp_path_factory):
    return write_hand_dbs(tmp_path_factory.mktemp("hero_hand"))


TINY_VIDEO = VideoSyntheticConfig(seed=5, n_train_videos=40, n_val_videos=12, vfeat_dim=16, max_frames=12)


@pytest.fixture(scope="session")
def tiny_video_corpus(tmp_path_factory):
    return video_synthetic_corpus(tmp_path_factory.mktemp("video_cache"), TINY_VIDEO)
